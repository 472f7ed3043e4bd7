"""This process's resident memory (Linux /proc, getrusage where /proc lacks it), for the benches'
peak-memory cases: benches/speed_memory.py, benches/quantized.py and benches/inject.py.

The peak of a block of work: `reset_peak()` before it, `peak_rss_mb(reset)` after it. Without the
reset the peak of importing torch and building the model would hide the peak of the work.
"""

from __future__ import annotations

import os
import resource
import threading
from pathlib import Path


def status_mb(field: str) -> float:
    """A field of /proc/self/status in MiB: VmRSS (resident now), VmHWM (the resident peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def max_rss_mb() -> float:
    """The process's resident peak since it started (getrusage), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Resets the resident peak (VmHWM) to the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb(reset: bool) -> float:
    """The resident peak since `reset_peak()` when it succeeded (`reset`), else since the start."""
    return status_mb("VmHWM") if reset else max_rss_mb()


def rss_bytes() -> int:
    """The resident set size now (/proc/self/statm: cheap enough to sample every few ms)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Samples this process's RSS every 5 ms in a thread while the block runs; `.peak` in bytes."""

    def __enter__(self):
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
