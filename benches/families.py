"""Time `tlora train --steps 3` for every family on its tiny offline pipeline (tlora.testing.tiny
and tiny_families, saved as diffusers folders; rank 4, min rank 1, one thread, no validation
grid), in one process: what a first run of each family costs on this machine, load included
(reading the folder, encoding the prompt and the image, three steps, the adapter written).

    python benches/families.py [--kinds sd flux ...] [--out bench-results/families.md]

The first family also pays the imports; its time is measured after a warm-up run of it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
from pathlib import Path

import torch

from tlora import cli
from tlora.testing.tiny import KINDS, save_tiny_pipeline
from tlora.testing.tiny_families import FAMILY_KINDS, save_tiny_family_pipeline, train_side
from tlora.testing.train_inputs import train_args, write_photo

ALL = (*KINDS, *FAMILY_KINDS)


def one_run(kind: str, folder: Path, image: Path, out: Path) -> float:
    args = train_args(folder, image, out, 3, 3, "--min-rank", "1", "--overwrite")
    side = str(train_side(kind))
    args = [side if a == "16" and args[i - 1] == "--resolution" else a for i, a in enumerate(args)]
    sink = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        rc = cli.main(args)
    took = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"{kind}: tlora train failed:\n{sink.getvalue()[-2000:]}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", nargs="+", default=list(ALL), choices=ALL)
    ap.add_argument("--out", default="bench-results/families.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        image = write_photo(root / "dog.png")
        for i, kind in enumerate(args.kinds):
            save = save_tiny_pipeline if kind in KINDS else save_tiny_family_pipeline
            folder = save(kind, root / "models" / kind)
            if i == 0:
                one_run(kind, folder, image, root / "warmup")
            took = one_run(kind, folder, image, root / "runs" / kind)
            load = os.getloadavg()[0]
            rows.append((kind, train_side(kind), took, load))
            print(f"{kind}: {took:.1f} s (load {load:.1f})", flush=True)
    lines = [
        "| family | side | `tlora train --steps 3` | load (1 min) |",
        "|---|---|---|---|",
        *(f"| {k} | {s} | {t:.1f} s | {ld:.1f} |" for k, s, t, ld in rows),
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
