"""Time and memory of `tlora.inject` on full-size models (not in CI).

    nice python benches/inject.py [--rank 64] [--only sdxl,flux] [--no-baseline]

Each case runs in a fresh subprocess (so peak RSS is its own):
- sdxl: a full-size SD-XL UNet (2.57 B parameters) from its published config, built under
  accelerate's `init_empty_weights()` then `.to_empty(device="cpu")` (float32, uninitialised: no
  download), `tlora.inject(unet, rank)` with the default targets (560 attention projections).
- flux: a FLUX.1-dev-sized transformer (19 double blocks, 38 single blocks, 24 heads x 128,
  joint_attention_dim 4096, pooled_projection_dim 768, in_channels 64). A full float32 FLUX is
  48 GB, more than this machine has: the model is built on the meta device and only the modules
  that inject adapts get real (uninitialised) bfloat16 weights; the rest stays on the meta device
  and is never run.
Reported per case: inject seconds, RSS before inject, peak RSS during inject (sampled every 5 ms,
and the process's getrusage maximum), and adapter memory (bytes of all factors, trainable and
frozen copies).

Baseline (same process, sdxl only, one libtorch thread): the previous init (a seeded float64
Gaussian out x in matrix and its full SVD on the CPU, per projection), timed once per distinct
projection shape and summed over the model's projections: an estimate of the old inject's init
time without running it 560 times.

Writes benches/inject.json and benches/INJECT.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import tlora
from tlora.adapter.targets import find_targets
from tlora.config import DEFAULT_TARGETS

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from full_size import FLUX_TRANSFORMER, SDXL_UNET  # noqa: E402
from memory import PeakRss, max_rss_mb, rss_bytes  # noqa: E402


def build_sdxl() -> nn.Module:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**SDXL_UNET)
    return unet.to_empty(device="cpu")


def build_flux() -> nn.Module:
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        model = FluxTransformer2DModel(**FLUX_TRANSFORMER)
    # Only what inject adapts gets real storage, in bfloat16; the rest stays on the meta device.
    modules = dict(model.named_modules())
    for name in find_targets(model, None):
        linear = modules[name]
        linear.weight = nn.Parameter(torch.empty(linear.weight.shape, dtype=torch.bfloat16), requires_grad=False)
        if linear.bias is not None:
            linear.bias = nn.Parameter(torch.empty(linear.bias.shape, dtype=torch.bfloat16), requires_grad=False)
    return model


def run_case(case: str, rank: int, baseline: bool) -> dict:
    t0 = time.perf_counter()
    model = {"sdxl": build_sdxl, "flux": build_flux}[case]()
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    targets = find_targets(model, None)
    modules = dict(model.named_modules())
    shapes = collections.Counter((modules[n].out_features, modules[n].in_features) for n in targets)
    rss_before = rss_bytes()
    with PeakRss() as peak:
        t0 = time.perf_counter()
        adapter = tlora.inject(model, rank=rank)
        inject_s = time.perf_counter() - t0
    factors = adapter.state_dict()
    trainable = sum(p.numel() * p.element_size() for p in adapter.parameters())
    row = {
        "case": case,
        "rank": rank,
        "parameters": params,
        "build_s": round(build_s, 1),
        "adapted_layers": len(adapter.layers),
        "shapes": {f"{o}x{i}": c for (o, i), c in sorted(shapes.items())},
        "inject_s": round(inject_s, 2),
        "rss_before_inject_gb": round(rss_before / 1e9, 2),
        "peak_rss_during_inject_gb": round(peak.peak / 1e9, 2),
        "inject_rss_increase_gb": round((peak.peak - rss_before) / 1e9, 3),
        "process_max_rss_gb": round(max_rss_mb() * 2**20 / 1e9, 2),
        "adapter_bytes": sum(t.numel() * t.element_size() for t in factors.values()),
        "adapter_trainable_bytes": trainable,
        "weight_dtype": str(next(iter(adapter.layers.values())).base_layer.weight.dtype),
    }
    if baseline:
        row["baseline"] = old_init_estimate(shapes, rank)
    return row


def old_init_estimate(shapes: collections.Counter, rank: int) -> dict:
    """The previous init's cost: seeded float64 N(0, 1/r^2) matrix + full SVD, once per shape, on one
    libtorch thread (on a busy 2-core machine two threads made each SVD 10-50x slower, which would
    flatter the new init; the new init does not use libtorch's threads on the CPU)."""
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    per_shape, total = {}, 0.0
    for (o, i), count in sorted(shapes.items()):
        t0 = time.perf_counter()
        g = torch.randn(o, i, dtype=torch.float64, generator=gen) / rank
        torch.linalg.svd(g, full_matrices=False)
        sec = time.perf_counter() - t0
        t0 = time.perf_counter()
        tlora._native.orthogonal_init(o, i, rank, "last", 0)
        new = time.perf_counter() - t0
        per_shape[f"{o}x{i}"] = {"count": count, "old_s": round(sec, 3), "new_s": round(new, 4)}
        total += sec * count
    torch.set_num_threads(threads)
    return {"old_init_estimate_s": round(total, 1), "per_shape": per_shape}


def markdown(results: dict) -> str:
    lines = [
        "# tlora.inject on full-size models",
        "",
        f"Machine: {results['machine']}; torch {results['torch']}; `python benches/inject.py` "
        f'({results["date"]}). Rank {results["rank"]}, default targets, init "last" from random. '
        f"Load average before / after: {results.get('load_average_before_after', 'not recorded')} "
        "(the machine is shared).",
        "",
        "| model | parameters | weights | adapted layers | inject | RSS before | peak RSS during inject | increase "
        "| adapter (all factors) | trainable |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["cases"]:
        lines.append(
            f"| {r['case']} | {r['parameters'] / 1e9:.2f} B | {r['weight_dtype']} | {r['adapted_layers']} | "
            f"{r['inject_s']:.1f} s | {r['rss_before_inject_gb']:.2f} GB | {r['peak_rss_during_inject_gb']:.2f} GB | "
            f"{r['inject_rss_increase_gb'] * 1000:.0f} MB | {r['adapter_bytes'] / 2**20:.0f} MiB | "
            f"{r['adapter_trainable_bytes'] / 2**20:.0f} MiB |"
        )
    for r in results["cases"]:
        if "baseline" not in r:
            continue
        b = r["baseline"]
        lines += [
            "",
            f"Previous init ({r['case']}): a seeded float64 Gaussian out x in matrix and its full SVD per "
            f"projection, timed once per shape in the same process on one libtorch thread: "
            f"**{b['old_init_estimate_s']:.0f} s** "
            f"for the {r['adapted_layers']} projections, against {r['inject_s']:.1f} s for the whole new "
            f"inject ({b['old_init_estimate_s'] / r['inject_s']:.0f}x). Issue 12 measured the previous "
            f"inject on this machine at 233 s when idle (674 s with other jobs running), peak RSS 13.5 GB.",
            "",
            "| shape (out x in) | projections | old init per layer | new init per layer |",
            "|---|---|---|---|",
        ]
        for shape, s in b["per_shape"].items():
            lines.append(f"| {shape} | {s['count']} | {s['old_s']:.3f} s | {s['new_s'] * 1000:.1f} ms |")
    lines += [
        "",
        "FLUX: the model is built on the meta device and only the adapted projections get real "
        "bfloat16 storage (a float32 FLUX.1 is 48 GB); uninitialised weights are never touched by "
        "inject, so their pages stay out of RSS.",
        "",
        "```json",
        json.dumps(results, indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--only", default="sdxl,flux")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.rank, not args.no_baseline and args.case == "sdxl")))
        return
    cases, load_before = [], os.getloadavg()[0]
    for case in args.only.split(","):
        cmd = [sys.executable, __file__, "--case", case, "--rank", str(args.rank)] + (
            ["--no-baseline"] if args.no_baseline else []
        )
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"case {case} failed:\n{proc.stderr[-4000:]}")
        cases.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(cases[-1]), flush=True)
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "load_average_before_after": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rank": args.rank,
        "targets": list(DEFAULT_TARGETS),
        "cases": cases,
    }
    (HERE / "inject.json").write_text(json.dumps(results, indent=2) + "\n")
    tmp = HERE / "INJECT.md.tmp"
    tmp.write_text(markdown(results))
    tmp.replace(HERE / "INJECT.md")


if __name__ == "__main__":
    main()
