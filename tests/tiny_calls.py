"""Calling the tiny denoisers of tlora.testing.tiny directly: random inputs for each kind (everything but
the timestep), and an adapter moved off its initialisation.

Used by tests/adapter/test_pipelines.py, test_interop.py, test_quantized.py and test_fastpath.py.
"""

from __future__ import annotations

import torch

from tlora.testing.tiny import (
    FLUX_JOINT_DIM,
    FLUX_POOLED_DIM,
    IMAGE_SIZE,
    LATENT_SIZE,
    SD_CROSS_DIM,
    SDXL_CROSS_DIM,
    SDXL_POOLED_DIM,
    TOKENS,
)


def denoiser_inputs(kind: str, batch: int, seed: int = 0) -> dict:
    """Random conditioning and noisy input for `tiny_denoiser(kind)` (everything but the timestep)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    if kind == "sd":
        return {
            "sample": randn(batch, 4, LATENT_SIZE, LATENT_SIZE),
            "encoder_hidden_states": randn(batch, TOKENS, SD_CROSS_DIM),
        }
    if kind == "sdxl":
        size = float(IMAGE_SIZE)
        time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]]).repeat(batch, 1)
        return {
            "sample": randn(batch, 4, LATENT_SIZE, LATENT_SIZE),
            "encoder_hidden_states": randn(batch, TOKENS, SDXL_CROSS_DIM),
            "added_cond_kwargs": {"text_embeds": randn(batch, SDXL_POOLED_DIM), "time_ids": time_ids},
        }
    # FLUX: 1 latent channel, 2x2 patches packed into tokens of 4 channels.
    side = LATENT_SIZE // 2
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return {
        "hidden_states": randn(batch, side * side, 4),
        "encoder_hidden_states": randn(batch, TOKENS, FLUX_JOINT_DIM),
        "pooled_projections": randn(batch, FLUX_POOLED_DIM),
        "txt_ids": torch.zeros(TOKENS, 3),
        "img_ids": img_ids.reshape(-1, 3),
    }


@torch.no_grad()
def perturb(adapter, seed: int = 1, std: float = 0.05) -> None:
    """Move the trainable factors off their initialisation, where the update is exactly zero
    (T-LoRA subtracts its frozen initial copy; LoRA starts with up = 0), so outputs depend on them:
    seeded Gaussian noise of `std` added to each."""
    g = torch.Generator().manual_seed(seed)
    for p in adapter.parameters():
        p.add_(torch.randn(p.shape, generator=g) * std)
