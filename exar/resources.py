"""What a process used: the one peak-memory reader every stage and benchmark shares."""

from __future__ import annotations

import sys
from pathlib import Path


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB, on Linux, macOS and Windows.

    On Linux VmHWM (not getrusage's ru_maxrss, which keeps the peak of the parent a process was
    forked from, across exec); on Windows the peak working set; elsewhere getrusage. ``resource``
    is imported only where it exists (not on Windows).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    if sys.platform == "win32":
        import psutil

        return psutil.Process().memory_info().peak_wset / 2**20
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, kB elsewhere
