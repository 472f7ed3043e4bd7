"""`tlora demo`: the README's main job.

Until the bundled pretrained model lands, the demo builds a tiny randomly initialised Stable
Diffusion pipeline from configs (no downloads), fine-tunes it on one synthetic image with LoRA and
with T-LoRA, and samples both. The images are noise-like (the model was never pretrained); what
the demo shows is the whole path: inject, train, checkpoint, save, load, generate, grid.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the end-to-end example (no downloads)",
                       description="Fine-tune a tiny bundled model on one image with LoRA and T-LoRA, then sample both.")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--steps", type=int, default=60, help="training steps per method")


def run(args) -> None:
    import numpy as np
    from PIL import Image

    from .generate import generate
    from .images import grid
    from .tiny import save_tiny_pipeline
    from .train import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = save_tiny_pipeline("sd", out / "tiny-sd")
    image = out / "concept.png"
    rng = np.random.default_rng(0)
    # A two-coloured checkerboard "concept" on a plain background.
    a = np.full((64, 64, 3), (40, 90, 200), np.uint8)
    tile = (np.indices((24, 24)).sum(0) // 4) % 2
    a[8:32, 8:32] = np.where(tile[..., None] == 1, (230, 60, 40), (250, 220, 40))
    Image.fromarray(a).save(image)
    rows, table = [], []
    for variant in ("lora", "tlora"):
        tic = time.perf_counter()
        adapter = train(model=str(model), image=str(image), token="sks", class_name="toy", out=str(out / variant),
                        variant=variant, rank=4, steps=args.steps, lr=1e-3, checkpoint_every=args.steps, seed=0).adapter_path
        losses = [json.loads(line)["loss"] for line in (out / variant / "loss.jsonl").read_text().splitlines()]
        path = generate(str(model), str(adapter), ["a {} on a beach", "a {} in the snow"], str(out / variant / "samples"),
                        n=2, steps=10, guidance=5.0, seed=rng.integers(1 << 30).item())
        rows.append(Image.open(path))
        k = max(1, len(losses) // 10)
        table.append((variant, sum(losses[:k]) / k, sum(losses[-k:]) / k, time.perf_counter() - tic))
    grid(rows, cols=len(rows)).save(out / "comparison.png")
    print(f"\n{'method':8} {'loss first 10%':>15} {'loss last 10%':>14} {'seconds':>8}")
    for name, first, last, secs in table:
        print(f"{name:8} {first:15.4f} {last:14.4f} {secs:8.1f}")
    print(f"\nside-by-side grid: {out / 'comparison.png'}")
