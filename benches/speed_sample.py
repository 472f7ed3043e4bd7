"""Speed case c, sample: 25 denoising steps with classifier-free guidance on case b's UNet (see
benches/speed.py).
"""

from __future__ import annotations

import json
import time

import torch
from speed_common import T, md_table
from speed_train import TARGETS, UNET, sdxl_like_unet, setup, unet_inputs

import tlora


def sample_timesteps(steps: int) -> list[int]:
    # "leading" spacing, as SD-XL's Euler / DDIM: 999 // steps apart, offset 1
    stride = T // steps
    return [i * stride + 1 for i in reversed(range(steps))]


def sampling_run(unet, latent: int, steps: int) -> float:
    """Seconds per denoising step of one CFG sampling run."""
    inputs = unet_inputs(2, latent)
    x = inputs["sample"][:1]
    tic = time.perf_counter()
    with torch.no_grad():
        for t in sample_timesteps(steps):
            both = unet(
                torch.cat([x, x]), t, inputs["encoder_hidden_states"], added_cond_kwargs=inputs["added_cond_kwargs"]
            ).sample
            uncond, cond = both.chunk(2)
            x = x - 0.01 * (uncond + 5.0 * (cond - uncond))
    return (time.perf_counter() - tic) / steps


def sample_section(quick: bool, latents, steps: int = 25) -> list[dict]:
    rounds = 1 if quick else 3
    rows = []
    for latent in latents:
        unets = {case: sdxl_like_unet().eval() for case in ("bare", "tlora", "peft")}
        adapter = tlora.inject(unets["tlora"], rank=UNET["rank"], min_rank=UNET["rank"] // 2, target_modules=TARGETS)
        with torch.no_grad():
            for p in adapter.parameters():
                p.add_(0.01 * torch.randn_like(p))
        setup("peft", unets["peft"])

        def tlora_run(cached: bool, fast: bool = True):
            def run():
                if not cached:
                    adapter.state.fold_cache.clear()
                adapter.fast_path = fast
                try:
                    return sampling_run(unets["tlora"], latent, steps)
                finally:
                    adapter.fast_path = True

            return run

        # tlora: a first run after training (no folded weights yet); tlora-cached: the same
        # schedule again, every folded weight cached; tlora-factored: the fast path switched off.
        cases = {
            "bare": lambda: sampling_run(unets["bare"], latent, steps),
            "tlora": tlora_run(False),
            "tlora-cached": tlora_run(True),
            "tlora-factored": tlora_run(True, fast=False),
            "peft": lambda: sampling_run(unets["peft"], latent, steps),
        }
        for unet in unets.values():  # warm-up
            sampling_run(unet, latent, 2)
        per_step: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(rounds):
            for key, fn in cases.items():
                per_step[key].append(fn())
        res = {k: min(v) for k, v in per_step.items()}
        row = {
            "latent": latent,
            "steps": steps,
            "rounds": rounds,
            **{k: v * 1e3 for k, v in res.items()},
            **{f"{k}_vs_bare": v / res["bare"] for k, v in res.items() if k != "bare"},
        }
        rows.append(row)
        print("sample", json.dumps(row), flush=True)
    return rows


def report(rows: list[dict]) -> str:
    return "### c. Sampling, 25 steps with CFG (batch 2), ms per step (best of the rounds)\n\n" + md_table(
        rows,
        [
            "latent",
            "bare",
            "tlora",
            "tlora-cached",
            "tlora-factored",
            "peft",
            "tlora_vs_bare",
            "tlora-cached_vs_bare",
            "tlora-factored_vs_bare",
            "peft_vs_bare",
        ],
    )
