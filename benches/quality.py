"""The paper's Table 1 on the toy world (not in CI): fidelity, alignment and diversity of LoRA,
Vanilla T-LoRA, Ortho-LoRA and T-LoRA across ranks, concepts and seeds.

    python benches/quality.py [--ranks 4 8 16 32] [--concepts ...] [--seeds 0 1 2] [--workers 2]
    python benches/quality.py --variants [NAME ...] [--ranks 8] [--seeds 0]


Each cell fine-tunes the bundled toy model on one concept image (tlora.demo.evaluate.finetune),
samples every evaluation prompt and scores the pixels. Results go to bench-results/quality.json,
quality.md (mean ± std over concepts x seeds) and quality.png (fidelity against alignment).
quality.md also has paired differences with 95 % t intervals (T-LoRA minus LoRA and the other
COMPARISONS, on the same concept, rank and seed, per rank and over all ranks), a per-concept table
and every run. --variants compares T-LoRA with variants of its schedule and scaling (VARIANTS
below, each an adapter option) instead of the four methods, written to variants.json /
variants.md: paired differences against T-LoRA (same concept, rank, seed) with 95 % t intervals,
and which variant wins (alignment up with the interval above zero, fidelity down by at most 0.01);
T-LoRA's own runs are taken from quality.json in the same --out when its settings match. Runs
resume: finished cells are read back from the store. The thread count is a setting (one per
worker with --workers N > 1, torch's default with one process): float sums round differently with
it, so a store holds runs of one count. With --workers N, N processes each fine-tune one cell at a
time on one thread (on a 2-core machine two workers finish about 1.8x as many cells per hour as one
two-thread process: the tiny model's steps are dominated by per-op overhead).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import torch
from overfitting import paired as paired_interval

from tlora.demo.concepts import CONCEPTS, concept
from tlora.demo.evaluate import METHODS, TOY_LR, TOY_STEPS, finetune
from tlora.files.atomic import write_atomic

KEYS = ("fidelity", "alignment", "diversity")
# Variants of T-LoRA (min_rank r // 2, the power law with a = 1, no rank scaling), by name: the
# adapter options each changes, as a function of the rank.
VARIANTS = {
    "power a=0.5": lambda r: {"rank_exponent": 0.5},
    "power a=2": lambda r: {"rank_exponent": 2.0},
    "cosine": lambda r: {"rank_schedule": "cosine"},
    "step t_b=875": lambda r: {"rank_schedule": "step", "rank_boundary": 0.875},
    "scaling rank": lambda r: {"rank_scaling": "rank"},
    # The control: the paper says r_min = r / 4 "often struggles".
    "min_rank=r/4": lambda r: {"min_rank": max(1, r // 4)},
}
# A variant wins when its alignment rises with the 95 % interval above zero and its fidelity falls
# by at most this much.
FIDELITY_TOLERANCE = 0.01
# The toy UNet's attention layers are 32 and 64 wide: rank 32 is already full rank in the first block.
MAX_TOY_RANK = 32


def run_cell(method: str, rank: int, name: str, seed: int, steps: int, lr: float, n: int) -> dict:
    """One fine-tune: a method of METHODS, or a variant of VARIANTS (T-LoRA with its options)."""
    base, options = ("T-LoRA", VARIANTS[method](rank)) if method in VARIANTS else (method, None)
    with tempfile.TemporaryDirectory() as tmp:
        run = finetune(
            concept(name), base, Path(tmp), rank=rank, steps=steps, lr=lr, seed=seed, n=n, adapter_options=options
        )
    return {"method": method, "rank": rank, "concept": name, "seed": seed, "scores": run.scores, "seconds": run.seconds}


def _one_thread() -> None:
    torch.set_num_threads(1)


def table(cells: list[dict]) -> str:
    ranks = sorted({c["rank"] for c in cells})
    lines = ["| method | rank | fidelity | alignment | diversity | n |", "|---|---|---|---|---|---|"]
    for method in METHODS:
        for r in ranks:
            sel = [c for c in cells if c["method"] == method and c["rank"] == r]
            if not sel:
                continue
            parts = []
            for k in KEYS:
                vals = [c["scores"][k] for c in sel]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                parts.append(f"{statistics.mean(vals):.3f} ± {sd:.3f}")
            lines.append(f"| {method} | {r} | " + " | ".join(parts) + f" | {len(sel)} |")
    return "\n".join(lines)


# The paired comparisons the report lists, each "a minus b": what masking adds (over LoRA, and over
# Ortho-LoRA's init), what the orthogonal init adds (alone, and under the mask), and both at once.
COMPARISONS = (
    ("T-LoRA", "LoRA"),
    ("Vanilla T-LoRA", "LoRA"),
    ("Ortho-LoRA", "LoRA"),
    ("T-LoRA", "Ortho-LoRA"),
    ("T-LoRA", "Vanilla T-LoRA"),
)


def paired(cells: list[dict], a: str = "T-LoRA", b: str = "LoRA") -> str:
    """a minus b on the same concept, rank and seed, per rank and over all ranks: mean differences
    with their 95 % t intervals (the per-run differences separate the methods better than the
    means, whose spread is mostly the concepts')."""
    by = {(c["method"], c["rank"], c["concept"], c["seed"]): c["scores"] for c in cells}
    lines = [
        f"| rank | pairs | Δ fidelity ({a} − {b}) | Δ alignment | Δ diversity | {a} aligns better |",
        "|---|---|---|---|---|---|",
    ]
    ranks = sorted({c["rank"] for c in cells})
    for r in [*ranks, None]:
        keys = [k for k in by if k[0] == a and (r is None or k[1] == r) and (b, *k[1:]) in by]
        if len(keys) < 2:
            continue
        ours, theirs = [by[k] for k in keys], [by[(b, *k[1:])] for k in keys]
        cols = []
        for key in KEYS:
            mean, half = paired_interval([x[key] for x in ours], [y[key] for y in theirs])
            cols.append(f"{mean:+.3f} ± {half:.3f}")
        better = sum(x["alignment"] > y["alignment"] for x, y in zip(ours, theirs))
        label = "all" if r is None else str(r)
        lines.append(f"| {label} | {len(keys)} | " + " | ".join(cols) + f" | {better} of {len(keys)} |")
    return "\n".join(lines)


def per_concept(cells: list[dict]) -> str:
    """Fidelity / alignment per concept (mean over ranks and seeds)."""
    names = sorted({c["concept"] for c in cells})
    lines = ["| method | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for method in METHODS:
        row = []
        for name in names:
            sel = [c["scores"] for c in cells if c["method"] == method and c["concept"] == name]
            row.append(
                f"{statistics.mean(s['fidelity'] for s in sel):.3f} / "
                f"{statistics.mean(s['alignment'] for s in sel):.3f}"
                if sel
                else ""
            )
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def variant_table(cells: list[dict]) -> str:
    """Each variant minus T-LoRA on the same concept, rank and seed: mean differences with their 95 %
    t intervals, and the verdict."""
    by = {(c["method"], c["rank"], c["concept"], c["seed"]): c["scores"] for c in cells}
    lines = [
        "| variant | rank | pairs | Δ fidelity (95 % interval) | Δ alignment (95 % interval) | Δ diversity "
        "| aligns better | wins |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ranks = sorted({c["rank"] for c in cells})
    for name in VARIANTS:
        # Per rank (a default changes only on a win at every rank), then over all ranks.
        for r in [*ranks, None] if len(ranks) > 1 else ranks:
            keys = [k for k in by if k[0] == name and (r is None or k[1] == r) and ("T-LoRA", *k[1:]) in by]
            if len(keys) < 2:
                continue
            ours = [by[k] for k in keys]
            theirs = [by[("T-LoRA", *k[1:])] for k in keys]
            d = {key: paired_interval([x[key] for x in ours], [y[key] for y in theirs]) for key in KEYS}
            better = sum(x["alignment"] > y["alignment"] for x, y in zip(ours, theirs))
            (df, hf), (da, ha) = d["fidelity"], d["alignment"]
            wins = da - ha > 0 and df >= -FIDELITY_TOLERANCE
            lines.append(
                f"| {name} | {'all' if r is None else r} | {len(keys)} | {df:+.3f} ± {hf:.3f} | {da:+.3f} ± {ha:.3f} "
                f"| {d['diversity'][0]:+.3f} ± {d['diversity'][1]:.3f} | {better} of {len(keys)} | "
                f"{'yes' if wins else 'no'} |"
            )
    return "\n".join(lines)


def variant_report(cells: list[dict], settings: dict) -> str:
    means = ["| variant | rank | fidelity | alignment | diversity | n |", "|---|---|---|---|---|---|"]
    for name in ("T-LoRA", *VARIANTS):
        for r in sorted({c["rank"] for c in cells}):
            sel = [c["scores"] for c in cells if c["method"] == name and c["rank"] == r]
            if sel:
                cols = " | ".join(f"{statistics.mean(s[k] for s in sel):.3f}" for k in KEYS)
                means.append(f"| {name} | {r} | {cols} | {len(sel)} |")
    runs = "\n".join(
        f"- {c['method']}, {c['rank']}, {c['concept']}, {c['seed']}: {c['scores']['fidelity']:.3f} / "
        f"{c['scores']['alignment']:.3f} / {c['scores']['diversity']:.3f}"
        for c in sorted(cells, key=lambda c: (c["concept"], c["rank"], c["seed"], c["method"]))
    )
    return (
        f"Settings: {settings}; {len(cells)} runs.\n\n"
        f"Means over concepts x seeds:\n\n" + "\n".join(means) + "\n\n"
        f"Each variant minus T-LoRA (same concept, rank, seed), mean ± 95 % t half-width:\n\n{variant_table(cells)}\n\n"
        f"Every run (variant, rank, concept, seed: fidelity / alignment / diversity):\n\n{runs}\n"
    )


def report(cells: list[dict], settings: dict) -> str:
    runs = "\n".join(
        f"- {c['method']}, {c['rank']}, {c['concept']}, {c['seed']}: {c['scores']['fidelity']:.3f} / "
        f"{c['scores']['alignment']:.3f} / {c['scores']['diversity']:.3f}"
        for c in sorted(cells, key=lambda c: (c["concept"], c["rank"], c["seed"], list(METHODS).index(c["method"])))
    )
    return (
        f"Settings: {settings}; {len(cells)} runs.\n\n"
        f"Mean ± std over concepts x seeds:\n\n{table(cells)}\n\n"
        "Paired differences (same concept, rank and seed), mean ± 95 % t half-width:\n\n"
        + "\n\n".join(f"{a} minus {b}:\n\n{paired(cells, a, b)}" for a, b in COMPARISONS)
        + "\n\n"
        f"Fidelity / alignment per concept (mean over ranks and seeds):\n\n{per_concept(cells)}\n\n"
        f"Every run (method, rank, concept, seed: fidelity / alignment / diversity):\n\n{runs}\n"
    )


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method in METHODS:
        pts = {}
        for c in cells:
            if c["method"] == method:
                pts.setdefault(c["rank"], []).append(c["scores"])
        if not pts:
            continue
        xs = [statistics.mean(s["alignment"] for s in v) for _, v in sorted(pts.items())]
        ys = [statistics.mean(s["fidelity"] for s in v) for _, v in sorted(pts.items())]
        ax.plot(xs, ys, marker="o", label=method)
        for (r, _), x, y in zip(sorted(pts.items()), xs, ys):
            ax.annotate(str(r), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("alignment (background and position follow the prompt)")
    ax.set_ylabel("fidelity (concept sprite present)")
    ax.set_title("Toy world: one-image customization, labels = rank")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--concepts", nargs="+", default=sorted(CONCEPTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument(
        "--variants",
        nargs="*",
        default=None,
        choices=list(VARIANTS),
        help="compare T-LoRA with these variants (none named: all) instead of the methods",
    )
    ap.add_argument("--steps", type=int, default=TOY_STEPS)
    ap.add_argument("--lr", type=float, default=TOY_LR)
    ap.add_argument("-n", type=int, default=2, help="samples per prompt")
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--workers", type=int, default=1, help="processes, one thread each when more than 1")
    args = ap.parse_args()
    too_big = [r for r in args.ranks if r > MAX_TOY_RANK]
    if too_big:
        ap.error(
            f"rank {too_big[0]} exceeds the toy model's narrowest adapted layers ({MAX_TOY_RANK} wide); "
            f"use ranks up to {MAX_TOY_RANK}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = args.variants is not None
    methods = ["T-LoRA", *(args.variants or VARIANTS)] if variants else args.methods
    store = out / ("variants.json" if variants else "quality.json")
    # Workers run one thread each; one process runs torch's default. Float sums round differently
    # with the thread count and 800 steps carry the difference on, so runs of other counts are not
    # mixed into a store (nor T-LoRA's runs shared between the two stores).
    threads = 1 if args.workers > 1 else torch.get_num_threads()
    settings = {"steps": args.steps, "lr": args.lr, "n": args.n, "threads": threads}

    def read_store(path: Path) -> tuple[dict, list[dict]]:
        saved = json.loads(path.read_text())
        return {k: saved.get(k) for k in settings}, saved["cells"]

    cells = []
    if store.exists():
        held, cells = read_store(store)
        if held != settings:
            ap.error(
                f"{store} holds runs with {held}, not {settings}: pass the same --steps/--lr/-n "
                "(and --workers 1 or more than 1, as they ran: threads) to resume, or another --out"
            )
    quality = out / "quality.json"
    if variants and quality.exists():
        # T-LoRA's runs in the variant grid are the quality grid's: the same call, the same settings.
        held, theirs = read_store(quality)
        have = {(c["method"], c["rank"], c["concept"], c["seed"]) for c in cells}
        shared = [
            c
            for c in theirs
            if c["method"] == "T-LoRA" and (c["method"], c["rank"], c["concept"], c["seed"]) not in have
        ]
        if held == settings:
            cells += shared
            print(f"{len(shared)} T-LoRA runs taken from {quality}", flush=True)
        else:
            print(f"{quality} holds runs with {held}, not {settings}: T-LoRA is run again", flush=True)
    done = {(c["method"], c["rank"], c["concept"], c["seed"]) for c in cells}
    todo = [
        (method, r, name, seed)
        for seed in args.seeds
        for name in args.concepts
        for r in args.ranks
        for method in methods
        if (method, r, name, seed) not in done
    ]
    print(f"{len(done)} runs in {store}, {len(todo)} to go", flush=True)

    def record(cell: dict) -> None:
        cells.append(cell)
        print(json.dumps(cell), flush=True)
        write_atomic(store, json.dumps({**settings, "cells": cells}, indent=1))

    if args.workers <= 1:
        for key in todo:
            record(run_cell(*key, args.steps, args.lr, args.n))
    else:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=_one_thread) as pool:
            futures = [pool.submit(run_cell, *key, args.steps, args.lr, args.n) for key in todo]
            for f in as_completed(futures):
                record(f.result())
    md = variant_report(cells, settings) if variants else report(cells, settings)
    write_atomic(out / ("variants.md" if variants else "quality.md"), md)
    print(md)
    if variants:
        return
    try:
        plot(cells, out / "quality.png")
    except ImportError:
        print("matplotlib is not installed: pip install matplotlib for the plot")


if __name__ == "__main__":
    main()
