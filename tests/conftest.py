"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the operator tests run their backends: ``SATTN_TEST_DEVICE`` (default "cpu").

    ``SATTN_TEST_DEVICE=cuda pytest tests/ops`` runs the backend-against-reference comparisons
    on a GPU; inputs are drawn on the CPU and moved, so each device sees the same numbers.
    """
    name = os.environ.get("SATTN_TEST_DEVICE", "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise pytest.UsageError(f"SATTN_TEST_DEVICE={name!r} is not a torch device ({err})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("SATTN_TEST_DEVICE=cuda, but this PyTorch sees no CUDA device")
    return dev


@pytest.fixture
def fresh_dynamo():
    """torch.compile tests start from an empty dynamo cache and zeroed counters (and leave one)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
