"""The training step of speed_train.py (the SD-XL-structured tiny UNet) for bare, PEFT LoRA and
tlora, plus tlora with the folded training path switched off ("tlora_factored", where the native
module has it), in interleaved rounds in one process: wall-clock and process CPU time per step.

    python benches/train_ab.py LATENTS ROUNDS [RANK]     # e.g. 64,128 16 16

CPU time is printed next to wall time because on a shared, loaded machine (load 4-6 on 2 cores)
a step's wall time also counts the time other processes hold the core; a one-thread step's CPU
time varies much less from round to round (benches/RESULTS.md, issue 28). Prints one JSON line of
medians and per-round ratios against PEFT per latent and clock.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import speed_train
import torch

import tlora


def rounds_of(fns: dict, rounds: int) -> tuple[dict, dict]:
    for fn in fns.values():
        fn()  # warm-up
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            c, tic = time.process_time(), time.perf_counter()
            fn()
            wall[key].append(time.perf_counter() - tic)
            cpu[key].append(time.process_time() - c)
    return wall, cpu


def main() -> None:
    latents = [int(v) for v in sys.argv[1].split(",")]
    rounds = int(sys.argv[2])
    speed_train.UNET["rank"] = int(sys.argv[3]) if len(sys.argv) > 3 else speed_train.UNET["rank"]
    torch.set_num_threads(1)
    plan = getattr(tlora._native, "fold_plan", None)
    for latent in latents:
        fns = {case: speed_train.train_step_fn(case, latent) for case in ("bare", "peft", "tlora")}
        if plan is not None:
            factored_step = speed_train.train_step_fn("tlora", latent)

            def factored(step=factored_step):
                tlora._native.fold_plan = lambda *a: None  # every call factored
                try:
                    step()
                finally:
                    tlora._native.fold_plan = plan

            fns["tlora_factored"] = factored
        load = os.getloadavg()[0]
        for clock, times in zip(("wall", "cpu"), rounds_of(fns, rounds)):
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {
                "latent": latent,
                "rank": speed_train.UNET["rank"],
                "rounds": rounds,
                "clock": clock,
                "load": [load, os.getloadavg()[0]],
                "ms": {k: round(v * 1e3, 1) for k, v in med.items()},
                **{f"{k}_vs_peft": round(med[k] / med["peft"], 3) for k in med if k not in ("peft", "bare")},
                "peft_vs_bare": round(med["peft"] / med["bare"], 3),
                **{
                    f"per_round_{k}_vs_peft": sorted(round(a / b, 3) for a, b in zip(times[k], times["peft"]))
                    for k in med
                    if k not in ("peft", "bare")
                },
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
