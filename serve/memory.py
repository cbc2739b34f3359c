"""Resident memory of this process, for ``GET /healthz``: what each replica costs, read where it runs."""

from __future__ import annotations

import os
import resource
import sys


def rss_bytes() -> int:
    """Resident set size now (Linux ``/proc/self/statm``); elsewhere the peak, which is what the OS offers."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux
