"""Speed case e, scaling: adapter cost of one layer against tokens and rank, next to its FLOP count
(see benches/speed.py).
"""

from __future__ import annotations

import json

import torch
from speed_common import Holder, md_table, median_time
from torch import nn

import tlora


def adapter_flops(kind: str, tokens: int, in_f: int, out_f: int, k: int) -> float:
    """Forward + backward FLOPs (2 per multiply-add) of the adapter alone at active rank k, on the
    path tlora takes for a float32 training step. PEFT LoRA: k wide everywhere (3 products each
    way). tlora T-LoRA, factored: [Q;Q0] and [P,P0] are 2k wide forward and for the input's
    gradient, k wide for the factor gradients; with the frozen branch folded into the weight
    (tokens (in + out) > in out): the trainable branch as LoRA plus one k-deep fold forward and
    one backward."""
    if kind == "peft":
        return 2.0 * 3 * tokens * k * (in_f + out_f)
    if tokens * (in_f + out_f) > in_f * out_f:
        return 2.0 * (3 * tokens * k * (in_f + out_f) + 2 * k * in_f * out_f)
    return 2.0 * 5 * tokens * k * (in_f + out_f)


def with_flops(row: dict) -> dict:
    t, d, r = row["tokens"], row["dim"], row["rank"]
    f_t, f_p = adapter_flops("tlora", t, d, d, r), adapter_flops("peft", t, d, d, r)
    row.update(
        {
            "tlora_adapter_gflop": f_t / 1e9,
            "peft_adapter_gflop": f_p / 1e9,
            "bare_gflop": 4.0 * t * d * d / 1e9,
            "tlora_adapter_gflops": f_t / max(row["tlora_adapter_ms"] * 1e-3, 1e-9) / 1e9,
            "peft_adapter_gflops": f_p / max(row["peft_adapter_ms"] * 1e-3, 1e-9) / 1e9,
        }
    )
    return row


def scaling_section(quick: bool) -> list[dict]:
    from peft import LoraConfig, inject_adapter_in_model

    repeats = 3 if quick else 7
    dim = 640 if quick else 1280
    token_sweep = [256, 1024, 4096] if quick else [256, 1024, 4096, 16384]
    rank_sweep = [4, 16, 64] if quick else [4, 8, 16, 32, 64, 128]
    cases = [(t, 64) for t in token_sweep] + [(4096, r) for r in rank_sweep if r != 64]
    rows = []
    for tokens, r in cases:
        torch.manual_seed(0)
        x = torch.randn(1, tokens, dim)

        gout = torch.randn(*x.shape[:-1], dim)

        def run(fn, params):
            def step():
                xi = x.clone().requires_grad_(True)
                fn(xi).backward(gout)
                for p in params:
                    p.grad = None

            return median_time(step, repeats)

        base = nn.Linear(dim, dim).requires_grad_(False)
        bare = run(base, [])
        m = Holder(nn.Linear(dim, dim))
        ad = tlora.inject(m, rank=r, min_rank=r // 2)
        with ad.rank(r):
            tl = run(lambda xi: m(xi, None), ad.parameters())
        pm = inject_adapter_in_model(
            LoraConfig(r=r, lora_alpha=r, target_modules=["to_q"], init_lora_weights="gaussian"),
            Holder(nn.Linear(dim, dim).requires_grad_(False)),
        )
        pe = run(lambda xi: pm(xi, None), [p for p in pm.parameters() if p.requires_grad])
        row = with_flops(
            {
                "tokens": tokens,
                "dim": dim,
                "rank": r,
                "bare_ms": bare * 1e3,
                "tlora_adapter_ms": (tl - bare) * 1e3,
                "peft_adapter_ms": (pe - bare) * 1e3,
            }
        )
        rows.append(row)
        print("scaling", json.dumps(row), flush=True)
    return rows


def report(rows: list[dict]) -> str:
    return "### e. Adapter cost (minus bare) of one layer, forward + backward, full rank\n\n" + md_table(
        rows,
        [
            "tokens",
            "dim",
            "rank",
            "bare_ms",
            "tlora_adapter_ms",
            "peft_adapter_ms",
            "tlora_adapter_gflop",
            "peft_adapter_gflop",
            "bare_gflop",
            "tlora_adapter_gflops",
            "peft_adapter_gflops",
        ],
    )
