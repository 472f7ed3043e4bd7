"""The update's relative error in half precision: dtype x drift x path (training, inference fold).

One adapted 320 -> 320 projection, rank 64 (r_min 32), its own weight and bias zeroed so that the
module's output is the T-LoRA update; the trained factors are moved from the frozen copies by a
relative `drift`; the base layer is cast to bf16/fp16 (the adapter stays float32). The reference is
the paper's update in float64 from the same factors: max |out - ref| / max |ref|.

    python benches/precision.py
"""

from __future__ import annotations

import torch
from torch import nn

import tlora

IN_F = OUT_F = 320
RANK, MIN_RANK, T_STEP = 64, 32, 300


class Proj(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(IN_F, OUT_F)

    def forward(self, x, timestep=None):
        return self.to_q(x)


def update_error(dtype: torch.dtype, drift: float, path: str, seed: int = 0) -> float:
    torch.manual_seed(seed)
    model = Proj()
    adapter = tlora.inject(model, rank=RANK, min_rank=MIN_RANK, target_modules=["to_q"])
    layer = adapter.layers["to_q"]
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.base_layer.bias.zero_()
        for p in adapter.parameters():
            p.mul_(1 + drift * torch.randn(p.shape))
    layer.base_layer.to(dtype)
    k = int((1000 - T_STEP) / 1000 * (RANK - MIN_RANK)) + MIN_RANK
    f = {n: getattr(layer, n).detach().double() for n in ("p", "lam", "q", "p0", "lam0", "q0")}
    m = (torch.arange(RANK) < k).double()
    dw = f["p"] @ torch.diag(f["lam"] * m) @ f["q"] - f["p0"] @ torch.diag(f["lam0"] * m) @ f["q0"]
    x = torch.randn(2, 256, IN_F).to(dtype)
    want = x.double() @ dw.T
    t = torch.tensor([T_STEP, T_STEP])
    if path == "training":
        out = model(x.clone().requires_grad_(True), t)
    else:
        with torch.no_grad():
            out = model(x, t)
    return ((out.double() - want).abs().max() / want.abs().max()).item()


def main() -> None:
    print(f"update relative error, {IN_F}->{OUT_F}, rank {RANK} (min {MIN_RANK}), t = {T_STEP}, torch {torch.__version__}")
    print("| dtype | drift | training | inference (fold) |")
    print("|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float16):
        for drift in (1e-2, 1e-3, 1e-4):
            tr, inf = update_error(dtype, drift, "training"), update_error(dtype, drift, "inference")
            print(f"| {str(dtype).split('.')[-1]} | {drift:g} | {tr:.2g} | {inf:.2g} |", flush=True)


if __name__ == "__main__":
    main()
