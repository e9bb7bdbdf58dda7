"""``EPConfig`` (parallel/config.py): frozen, keyword-only, every bad field named; and how the
layers read ``ep=`` and its shorthand ``ep_mode=`` (parallel/expert_parallel.py), without a
process group."""

from __future__ import annotations

import dataclasses

import pytest

import moe_replay as mr
from moe_replay.parallel.expert_parallel import DEFAULT_EP_MODE, ep_config_of

CFG = mr.MoEConfig(num_experts=4, top_k=2, hidden_size=8, intermediate_size=4)


def test_defaults_are_the_collectives_transport_in_one_chunk() -> None:
    config = mr.EPConfig()
    assert (config.mode, config.transport, config.chunks) == ("allgather", "collectives", 1)
    assert config.overlap_backward is True and config.comm_sms is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.chunks = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        mr.EPConfig("alltoall")  # type: ignore[misc]  # keyword-only


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mode": "ring"}, ValueError, r"ep_mode must be one of \('allgather', 'alltoall'\), got 'ring'"),
        ({"mode": None}, TypeError, r"ep_mode must be a str.*got NoneType None"),
        (
            {"transport": "nccl"},
            ValueError,
            r"transport must be one of \('collectives', 'peers'\), got 'nccl'",
        ),
        ({"chunks": 0}, ValueError, r"chunks must be an int >= 1, got 0"),
        ({"chunks": True}, ValueError, r"chunks must be an int >= 1, got True"),
        ({"transport": "peers", "chunks": 2}, ValueError, "the peers transport runs one chunk per call"),
        ({"overlap_backward": 1}, TypeError, r"overlap_backward must be a bool, got 1"),
        ({"comm_sms": -1}, ValueError, r"comm_sms must be None or an int >= 0, got -1"),
    ],
)
def test_bad_fields_are_named(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        mr.EPConfig(mode=kwargs.pop("mode", "alltoall"), **kwargs)


def test_ep_mode_is_a_shorthand_for_ep() -> None:
    assert ep_config_of(None, DEFAULT_EP_MODE) == mr.EPConfig()
    assert ep_config_of(None, "alltoall") == mr.EPConfig(mode="alltoall")
    config = mr.EPConfig(mode="alltoall", chunks=2)
    assert ep_config_of(config, DEFAULT_EP_MODE) is config
    assert ep_config_of(config, "alltoall") is config
    with pytest.raises(ValueError, match=r"ep_mode='allgather' contradicts ep=EPConfig\(mode='alltoall'\)"):
        ep_config_of(config, "allgather")
    with pytest.raises(TypeError, match=r"ep must be a moe_replay\.EPConfig or None, got dict"):
        ep_config_of({"mode": "alltoall"}, DEFAULT_EP_MODE)


def test_a_config_without_a_group_is_refused() -> None:
    with pytest.raises(ValueError, match=r"ep_mode='alltoall' needs an ep_group.*got ep_group=None"):
        mr.MoE(CFG, ep=mr.EPConfig(mode="alltoall"))
    with pytest.raises(ValueError, match=r"ep=EPConfig\(.*transport='peers'.*needs an ep_group"):
        mr.MoE(CFG, ep=mr.EPConfig(transport="peers"))
    assert mr.MoE(CFG, ep=mr.EPConfig()).ep is None
