"""Backends: implementations of every pipeline stage, chosen through ``registry``."""

from moe_replay.backends.base import Backend, ExpertBuckets
from moe_replay.backends.registry import available_backends, get_backend, register, registered_backends

__all__ = ["Backend", "ExpertBuckets", "available_backends", "get_backend", "register", "registered_backends"]
