"""Where time and memory are measured: a synchronised stopwatch and the peak-memory probe. Nothing else times code.

On CUDA every reading synchronises the device first, so a step's time includes its kernels, not only their launch.
"""

from __future__ import annotations

import resource
import sys
import time

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


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are): CUDA peak allocated since the last reset, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024), "process_peak_rss"
