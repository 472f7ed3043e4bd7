"""Speed case d, memory: peak memory of case b's training steps, each case in a fresh process
(`benches/speed.py --memory-case CASE --latent N`; see benches/speed.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from memory import max_rss_mb, peak_rss_mb, reset_peak, status_mb
from speed_common import md_table
from speed_train import UNET, train_step_fn

SPEED = Path(__file__).resolve().with_name("speed.py")


def memory_case(case: str, latent: int, steps: int = 3) -> dict:
    """Runs in a fresh process: peak memory of `steps` training steps. The peak resident set size
    is reset (Linux /proc/self/clear_refs) after the model is built, so that the peak of the steps
    is not hidden under the peak of importing torch."""
    step = train_step_fn(case, latent)
    setup_mb = status_mb("VmRSS")
    reset = reset_peak()
    for _ in range(steps):
        step()
    peak = peak_rss_mb(reset)
    out = {
        "case": case,
        "latent": latent,
        "setup_rss_mb": setup_mb,
        "peak_rss_mb": peak,
        "step_peak_mb": peak - setup_mb,
        "hwm_reset": reset,
        "ru_maxrss_mb": max_rss_mb(),
    }
    if torch.cuda.is_available():
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def memory_section(latents) -> list[dict]:
    rows = []
    for latent in latents:
        res = {}
        for case in ("bare", "peft", "tlora", "reference"):
            proc = subprocess.run(
                [
                    sys.executable,
                    str(SPEED),
                    "--memory-case",
                    case,
                    "--latent",
                    str(latent),
                    "--train-rank",
                    str(UNET["rank"]),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            res[case] = json.loads(proc.stdout.strip().splitlines()[-1])
        row = {
            "latent": latent,
            **{f"{c}_peak_rss_mb": res[c]["peak_rss_mb"] for c in res},
            **{f"{c}_step_peak_mb": res[c]["step_peak_mb"] for c in res},
            "tlora_vs_peft_peak_rss": res["tlora"]["peak_rss_mb"] / res["peft"]["peak_rss_mb"],
            "tlora_vs_peft_step_peak": res["tlora"]["step_peak_mb"] / res["peft"]["step_peak_mb"],
            "tlora_vs_reference_peak_rss": res["tlora"]["peak_rss_mb"] / res["reference"]["peak_rss_mb"],
        }
        if "cuda_max_allocated_mb" in res["tlora"]:
            row.update({f"{c}_cuda_max_allocated_mb": res[c]["cuda_max_allocated_mb"] for c in res})
        rows.append(row)
        print("memory", json.dumps(row), flush=True)
    return rows


def report(rows: list[dict]) -> str:
    return (
        "### d. Peak memory of 3 training steps (fresh process per case; peak RSS after the model is "
        "built, and that peak minus the RSS before the first step), MB\n\n"
        + md_table(
            rows,
            [
                "latent",
                "bare_peak_rss_mb",
                "peft_peak_rss_mb",
                "tlora_peak_rss_mb",
                "bare_step_peak_mb",
                "peft_step_peak_mb",
                "tlora_step_peak_mb",
                "reference_peak_rss_mb",
                "tlora_vs_peft_peak_rss",
                "tlora_vs_peft_step_peak",
                "tlora_vs_reference_peak_rss",
            ],
        )
    )
