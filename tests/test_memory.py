"""Memory a replica freed goes back to the OS, so its resident size is what it keeps."""

from __future__ import annotations

import ctypes.util
import sys

import numpy as np
import pytest

from serve.memory import return_freed_memory, rss_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None, reason="glibc")
def test_freed_heap_blocks_between_live_ones_are_returned() -> None:
    # 64 KiB blocks sit in glibc's heap (below its mmap threshold); one in 50 stays
    # alive, so the heap cannot shrink from its top and only a trim returns the rest.
    blocks = [np.ones(8192) for _ in range(4000)]
    kept = blocks[::50]
    freed = (len(blocks) - len(kept)) * blocks[0].nbytes
    del blocks
    before = rss_bytes()
    return_freed_memory()
    assert before - rss_bytes() > freed / 2, f"{(before - rss_bytes()) / 2**20:.0f} MiB of {freed / 2**20:.0f} returned"
    assert all(block[0] == 1.0 for block in kept)
