"""Shared fixtures of the pdx_transfer pytest suite (crates/pdx-python/tests)."""

import numpy as np
import pytest

import pdx_transfer as pt

MiB = 1 << 20


def pattern(n: int, seed: int) -> np.ndarray:
    """n bytes that differ from block to block and from seed to seed, so a misplaced block is caught."""
    return ((np.arange(n, dtype=np.uint64) * 2654435761 + seed) % 251).astype(np.uint8)


@pytest.fixture
def agents():
    """Two agents in this process ("target" owns the remote memory, "initiator" posts), closed afterwards."""
    tgt, ini = pt.Agent("target"), pt.Agent("initiator")
    yield tgt, ini
    ini.close()
    tgt.close()
