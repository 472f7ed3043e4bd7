"""What the speed benchmarks (benches/speed.py and its cases speed_*.py) share: timing (medians,
interleaved rounds, seeded timesteps), the one-projection model the layer cases adapt, and the
reporting (markdown tables, the machine's description).
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import tlora

T = 1000


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def interleaved(fns: dict, rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin so that drifts of the machine hit
    every case alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            tic = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - tic)
    return times


class Cycle:
    """Seeded timesteps, uniform on [0, T), the same sequence for every method."""

    def __init__(self, batch: int, seed: int = 0, n: int = 64):
        g = torch.Generator().manual_seed(seed)
        self.ts = [torch.randint(0, T, (batch,), generator=g) for _ in range(n)]
        self.i = 0

    def next(self) -> torch.Tensor:
        t = self.ts[self.i % len(self.ts)]
        self.i += 1
        return t


class Holder(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.to_q = lin

    def forward(self, x, timestep):
        return self.to_q(x)


def _fmt(v) -> str:
    if not isinstance(v, float):
        return str(v)
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def md_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def machine_info() -> dict:
    import diffusers
    import peft

    try:
        import lycoris

        lyc = getattr(lycoris, "__version__", "4.1.3")
    except ImportError:
        lyc = None
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "lycoris": lyc,
        "tlora": tlora.__version__,
        "load_avg_at_start": os.getloadavg(),
    }
