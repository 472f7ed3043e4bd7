"""The paper's Table 1 on the toy world (not in CI): fidelity, alignment and diversity of LoRA,
Vanilla T-LoRA, Ortho-LoRA and T-LoRA across ranks, concepts and seeds.

    python benches/quality.py [--ranks 4 8 16 32] [--concepts ...] [--seeds 0 1 2] [--steps 400]

Each cell fine-tunes the bundled toy model on one concept image (tlora.toy.evaluate.finetune),
samples every evaluation prompt and scores the pixels. Results go to bench-results/quality.json,
quality.md (mean ± std over concepts x seeds) and quality.png (fidelity against alignment).
Runs resume: finished cells are read back from quality.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from tlora.toy.concepts import CONCEPTS, concept
from tlora.toy.evaluate import METHODS, TOY_LR, TOY_STEPS, finetune

KEYS = ("fidelity", "alignment", "diversity")


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
    ap.add_argument("--steps", type=int, default=TOY_STEPS)
    ap.add_argument("--lr", type=float, default=TOY_LR)
    ap.add_argument("-n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--out", default="bench-results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "quality.json"
    cells = json.loads(store.read_text())["cells"] if store.exists() else []
    done = {(c["method"], c["rank"], c["concept"], c["seed"]) for c in cells}
    for seed in args.seeds:
        for name in args.concepts:
            for r in args.ranks:
                for method in args.methods:
                    if (method, r, name, seed) in done:
                        continue
                    with tempfile.TemporaryDirectory() as tmp:
                        run = finetune(concept(name), method, Path(tmp), rank=r, steps=args.steps, lr=args.lr,
                                       seed=seed, n=args.n)
                    cells.append({"method": method, "rank": r, "concept": name, "seed": seed,
                                  "scores": run.scores, "seconds": run.seconds})
                    print(json.dumps(cells[-1]), flush=True)
                    store.write_text(json.dumps({"steps": args.steps, "lr": args.lr, "n": args.n, "cells": cells}, indent=1))
    md = table(cells)
    (out / "quality.md").write_text(md + "\n")
    print(md)
    try:
        plot(cells, out / "quality.png")
    except ImportError:
        print("matplotlib is not installed: pip install matplotlib for the plot")


if __name__ == "__main__":
    main()
