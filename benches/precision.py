"""The update's relative error in half precision: dtype x drift x path (training, inference fold).

One adapted 320 -> 320 projection, rank 64 (r_min 32), its own weight and bias zeroed so that the
module's output is the T-LoRA update; the trained factors are moved from the frozen copies by a
relative `drift`; the base layer is cast to bf16/fp16 (the adapter stays float32). The reference is
the paper's update in float64 from the same factors (benches/reference.py): max |out - ref| / max |ref|.

    python benches/precision.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import drifted_update_model, layer_factors, rank_at, rel_error, update_f64  # noqa: E402

IN_F = OUT_F = 320
RANK, MIN_RANK, T_STEP = 64, 32, 300


def update_error(dtype: torch.dtype, drift: float, path: str, seed: int = 0) -> float:
    model, _, layer = drifted_update_model(IN_F, OUT_F, RANK, MIN_RANK, drift, dtype, seed)
    dw = update_f64(layer_factors(layer), rank_at(T_STEP, RANK, MIN_RANK))
    x = torch.randn(2, 256, IN_F).to(dtype)
    want = x.double() @ dw.T
    t = torch.tensor([T_STEP, T_STEP])
    if path == "training":
        out = model(x.clone().requires_grad_(True), t)
    else:
        with torch.no_grad():
            out = model(x, t)
    return rel_error(out, want)


def main() -> None:
    print(
        f"update relative error, {IN_F}->{OUT_F}, rank {RANK} (min {MIN_RANK}), t = {T_STEP}, torch {torch.__version__}"
    )
    print("| dtype | drift | training | inference (fold) |")
    print("|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float16):
        for drift in (1e-2, 1e-3, 1e-4):
            tr, inf = update_error(dtype, drift, "training"), update_error(dtype, drift, "inference")
            print(f"| {str(dtype).split('.')[-1]} | {drift:g} | {tr:.2g} | {inf:.2g} |", flush=True)


if __name__ == "__main__":
    main()
