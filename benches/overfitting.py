"""Overfitting in view on the toy world (not in CI): how fast LoRA's and T-LoRA's validation samples
drift toward the one training image, step by step.

    python benches/overfitting.py [--concepts ...] [--seeds 0] [--rank 16] [--steps 800] [--every 100]

Each run is `tlora.train.loop.train` on the bundled toy model with validation prompts that move the
concept and change the background (tlora.demo.concepts.EVAL_PROMPTS), so the trainer itself writes
drift.jsonl (tlora.train.drift): each validation sample's pixel correlation with the training image
minus the base model's sample of the same prompt and seed. Results go to bench-results/overfitting/:
runs.json (every run's drift and loss; finished runs are read back, so the bench resumes),
overfitting.png (the mean drift of each method per step, and the loss) and overfitting.md (the
means, and LoRA minus T-LoRA paired on concept and seed with a 95 % t interval).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

from tlora.demo.concepts import CONCEPTS, EVAL_PROMPTS, concept
from tlora.demo.evaluate import METHODS, TOY_LR, model_dir

# Student's t at 97.5 % for 1..30 degrees of freedom (the 95 % two-sided interval of a paired mean).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131)
T975 += (2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def run_one(method: str, name: str, seed: int, rank: int, steps: int, every: int, sample_steps: int, prompts: int):
    from PIL import Image

    from tlora.train.drift import read_drift, read_loss
    from tlora.train.loop import train

    c = concept(name)
    variant, min_rank = METHODS[method]
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "concept.png"
        Image.fromarray(c.training_image()).save(image)
        out = Path(tmp) / "run"
        tic = time.perf_counter()
        train(
            model=str(model_dir()),
            image=str(image),
            token=c.token,
            class_name=c.class_word,
            out=str(out),
            variant=variant,
            rank=rank,
            min_rank=min_rank(rank),
            steps=steps,
            lr=TOY_LR,
            resolution=32,
            checkpoint_every=every,
            seed=seed,
            validation_prompts=[p.template for p in EVAL_PROMPTS[:prompts]],
            validation_steps=sample_steps,
        )
        return {
            "method": method,
            "concept": name,
            "seed": seed,
            "drift": read_drift(out / "drift.jsonl"),
            "loss": read_loss(out / "loss.jsonl"),
            "seconds": time.perf_counter() - tic,
        }


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b and the half-width of its 95 % t interval."""
    d = [x - y for x, y in zip(a, b)]
    if len(d) < 2:
        return statistics.mean(d), math.nan
    return statistics.mean(d), T975[min(len(d) - 1, len(T975)) - 1] * statistics.stdev(d) / math.sqrt(len(d))


def report(runs: list[dict], methods: list[str], out: Path) -> str:
    from tlora.files.atomic import save_image, write_atomic
    from tlora.train.drift import plot

    steps = sorted({s for r in runs for s, _ in r["drift"]})
    mean_drift = {
        m: [(s, statistics.mean(v for r in runs if r["method"] == m for t, v in r["drift"] if t == s)) for s in steps]
        for m in methods
    }
    mean_loss = {}
    for m in methods:
        sel = [dict(r["loss"]) for r in runs if r["method"] == m]
        mean_loss[m] = [(s, statistics.mean(x[s] for x in sel)) for s in sorted(sel[0])]
    save_image(
        plot(mean_loss, mean_drift, f"toy model, {len(runs) // len(methods)} runs each"), out / "overfitting.png"
    )

    lines = ["| step | " + " | ".join(methods) + " | LoRA − T-LoRA (95 % CI) |", "|---" * (len(methods) + 2) + "|"]
    keys = sorted({(r["concept"], r["seed"]) for r in runs})
    by = {(r["method"], r["concept"], r["seed"]): dict(r["drift"]) for r in runs}
    for s in steps:
        cells = [f"{dict(mean_drift[m])[s]:+.4f}" for m in methods]
        diff = ""
        if {"LoRA", "T-LoRA"} <= set(methods):
            d, half = paired([by["LoRA", *k][s] for k in keys], [by["T-LoRA", *k][s] for k in keys])
            diff = f"{d:+.4f} ± {half:.4f}"
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {diff} |")
    text = "\n".join(lines)
    write_atomic(out / "overfitting.md", text + "\n")
    return text


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concepts", nargs="+", default=sorted(CONCEPTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--methods", nargs="+", default=["LoRA", "T-LoRA"], choices=sorted(METHODS))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--every", type=int, default=100, help="validation (and checkpoint) every N steps")
    p.add_argument("--sample-steps", type=int, default=10, help="denoising steps of each validation sample")
    p.add_argument("--prompts", type=int, default=6, help="the first N evaluation prompts validate")
    p.add_argument("--out", default="bench-results/overfitting")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "runs.json"
    runs = json.loads(store.read_text()) if store.exists() else []
    done = {(r["method"], r["concept"], r["seed"]) for r in runs}
    for name in args.concepts:
        for seed in args.seeds:
            for method in args.methods:
                if (method, name, seed) in done:
                    continue
                r = run_one(method, name, seed, args.rank, args.steps, args.every, args.sample_steps, args.prompts)
                runs.append(r)
                store.write_text(json.dumps(runs))
                print(f"{method} {name} seed {seed}: final drift {r['drift'][-1][1]:+.4f} ({r['seconds']:.0f} s)")
    print(report([r for r in runs if r["method"] in args.methods], args.methods, out))


if __name__ == "__main__":
    main()
