"""Where time and memory are measured: a synchronised stopwatch and the peak-memory probe. Nothing else times code.

On CUDA every reading synchronises the device first, so a step's time includes its kernels, not only their launch.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from pathlib import Path

import torch


class Stopwatch:
    """Wall-clock milliseconds between `start()` and `stop()`, synchronised with the device's queue."""

    def __init__(self, device: torch.device):
        self.synchronise = torch.cuda.synchronize if device.type == "cuda" else _no_sync
        self._started = 0.0

    def start(self) -> None:
        self.synchronise()
        self._started = time.perf_counter()

    def stop(self) -> float:
        self.synchronise()
        return (time.perf_counter() - self._started) * 1000.0


def _no_sync() -> None:
    return None


PROC_SELF = Path("/proc/self")
_rss_peak_was_reset = False


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or on Linux the process's high-water RSS (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # "5" resets VmHWM to the current RSS (Linux >= 4.0). Elsewhere, or if not allowed, peak_memory_bytes reports
    # the lifetime peak instead, and says so.
    global _rss_peak_was_reset
    _rss_peak_was_reset = False
    with contextlib.suppress(OSError):
        (PROC_SELF / "clear_refs").write_text("5")
        _rss_peak_was_reset = True


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are): CUDA peak allocated since the reset; on CPU the peak RSS since the reset, or else the
    process's lifetime peak RSS (which, in a worker that ran other runs before, may belong to an earlier run)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    try:
        if not _rss_peak_was_reset:
            raise OSError("the peak was not reset")
        status = (PROC_SELF / "status").read_text()
        high_water_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
        return high_water_kib * 1024, "peak_rss_since_run_start"
    except (OSError, StopIteration, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024), "process_lifetime_peak_rss"
