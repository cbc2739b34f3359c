"""Resident memory of this process: read for ``GET /healthz`` where each replica runs, and given back after a load."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys

import pyarrow as pa


def rss_bytes() -> int:
    """Resident set size now (Linux ``/proc/self/statm``); elsewhere the peak, which is what the OS offers."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def return_freed_memory() -> None:
    """Hand what was freed back to the OS: Arrow's allocator's cached pages, then glibc's heap.

    A shard's load frees several times what it keeps (row groups, the sort,
    temporaries of numpy). Measured on one of two shards of 10^8
    codes, without glibc's ``malloc_trim`` about 350 MiB of it stayed resident
    (1.58x the shard's share of codes and ids instead of 1.30x).
    """
    pa.default_memory_pool().release_unused()
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:  # glibc only (not musl, not macOS)
        trim(0)
