"""Test-wide settings.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The interpreter is
chosen when a kernel is decorated, so the variable must be set before any kernel module is
imported: here, before collection.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests pick backends explicitly; an inherited MOE_REPLAY_BACKEND would silently change what runs.
os.environ.pop("MOE_REPLAY_BACKEND", None)
