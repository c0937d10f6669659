import os

import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU. This must be set before any
# kernel module (or triton itself) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
