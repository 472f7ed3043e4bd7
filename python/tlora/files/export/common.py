"""What the export writers share: the baking of a T-LoRA adapter at one rank into LoRA factors
(A, B), and the check of a one-file format's name."""

from __future__ import annotations

from pathlib import Path

import torch

from ...config import AdapterConfig
from ...errors import ConfigError
from ...layer import factors


def bake(
    tensors: dict[str, torch.Tensor], name: str, config: AdapterConfig, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of module `name` at rank k: the LoRA with B @ A = the adapter's update at rank k,
    scale included (`scale_at(k)`: under rank_scaling "rank" the r / k the mask holds)."""
    s = config.scale_at(k)
    if config.variant == "tlora":
        p, lam, q, p0, lam0, q0 = (tensors[f"{name}.{f}"].double() for f in factors.TLORA)
        frozen = p0[:, :k] * lam0[:k]
        blocks = [(q[:k], s * (p[:, :k] * lam[:k] - frozen)), (q[:k] - q0[:k], s * frozen)]
        # Balance each block's magnitudes (A c, B / c: the same product) so that neither factor's
        # entries sink into float16's subnormal range when a loader casts them.
        blocks = [(a_ * c, b_ / c) for a_, b_ in blocks for c in [_balance(a_, b_)]]
        return (
            torch.cat([blocks[0][0], blocks[1][0]], dim=0).float().contiguous(),
            torch.cat([blocks[0][1], blocks[1][1]], dim=1).float().contiguous(),
        )
    else:
        a = tensors[f"{name}.down"].float()[:k]
        b = tensors[f"{name}.up"].float()[:, :k]
    if s != 1.0:
        b = b * s
    return a.contiguous(), b.contiguous()


def _balance(a: torch.Tensor, b: torch.Tensor) -> float:
    """c with ||c a|| = ||b / c|| (1 for a zero block)."""
    na, nb = float(a.norm()), float(b.norm())
    return (nb / na) ** 0.5 if na > 0 and nb > 0 else 1.0


def one_file(out: Path, format: str) -> Path:
    """`out`, the name of a one-file export: a .safetensors file."""
    if out.suffix != ".safetensors":
        raise ConfigError(f"a {format} export is one .safetensors file; got {out.name!r}")
    return out


def no_check(base_model: str, names: list[str]) -> None:
    """A format that can name every module of any denoiser."""
