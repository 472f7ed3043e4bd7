"""Speed case b, train: a training step of a small UNet with SD-XL's block structure (see
benches/speed.py); the UNet, its inputs and the adapters' setups are shared with cases c and d and
with benches/quantized.py.
"""

from __future__ import annotations

import json
import statistics

import torch
import torch.nn.functional as F
from speed_common import Cycle, interleaved, md_table
from torch import nn

import tlora

TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


UNET = dict(widths=(64, 128, 256), layers=(1, 1, 2), heads=(1, 2, 4), cross=256, text_tokens=77, rank=16)


def sdxl_like_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    time_dim, pooled = 32, 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=UNET["widths"],
            norm_num_groups=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=UNET["layers"],
            attention_head_dim=UNET["heads"],
            cross_attention_dim=UNET["cross"],
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + pooled,
        )
    unet.requires_grad_(False)
    return unet


def unet_inputs(batch: int, latent: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    size = float(latent * 8)
    return {
        "sample": torch.randn(batch, 4, latent, latent, generator=g),
        "encoder_hidden_states": torch.randn(batch, UNET["text_tokens"], UNET["cross"], generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, 64, generator=g),
            "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]]).repeat(batch, 1),
        },
    }


class ReferenceProcessor(nn.Module):
    """The reference implementation's way, written for this benchmark: an attention processor per
    attention module that adds T-LoRA's two full-rank branches times the rank mask to q, k, v and
    out (the mask arrives through `cross_attention_kwargs`) and computes attention with a
    materialised softmax (`get_attention_scores` + bmm), as diffusers' plain AttnProcessor does."""

    PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")

    def __init__(self, attn, r: int):
        super().__init__()
        self.trainable = nn.ParameterDict()
        self.frozen = {}
        for name in self.PROJECTIONS:
            lin = attn.to_out[0] if name == "to_out" else getattr(attn, name)
            out_f, in_f = lin.weight.shape
            # Orthonormal factors (the values do not matter for timing); frozen copies subtracted.
            p = torch.linalg.qr(torch.randn(out_f, r))[0]
            q = torch.linalg.qr(torch.randn(in_f, r))[0].T.contiguous()
            lam = torch.rand(r) * 0.01
            self.trainable[name + "_p"] = nn.Parameter(p.clone())
            self.trainable[name + "_lam"] = nn.Parameter(lam.clone())
            self.trainable[name + "_q"] = nn.Parameter(q.clone())
            self.frozen[name] = (p, lam, q)

    def delta(self, name: str, x, mask):
        p, lam, q = (self.trainable[name + s] for s in ("_p", "_lam", "_q"))
        p0, lam0, q0 = self.frozen[name]
        return ((x @ q.T) * lam * mask) @ p.T - ((x @ q0.T) * lam0 * mask) @ p0.T

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, sigma_mask=None, **kwargs
    ):
        residual = hidden_states
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        q = attn.to_q(hidden_states) + self.delta("to_q", hidden_states, sigma_mask)
        k = attn.to_k(ctx) + self.delta("to_k", ctx, sigma_mask)
        v = attn.to_v(ctx) + self.delta("to_v", ctx, sigma_mask)
        q, k, v = attn.head_to_batch_dim(q), attn.head_to_batch_dim(k), attn.head_to_batch_dim(v)
        probs = attn.get_attention_scores(q, k, None)
        h = attn.batch_to_head_dim(torch.bmm(probs, v))
        h = attn.to_out[0](h) + self.delta("to_out", h, sigma_mask)
        h = attn.to_out[1](h)
        if attn.residual_connection:
            h = h + residual
        return h / attn.rescale_output_factor


def reference_setup(unet, r: int) -> list:
    """Installs a ReferenceProcessor on every attention module; returns its trainable parameters."""
    procs = {}
    for name, _proc in unet.attn_processors.items():
        attn = unet.get_submodule(name.rsplit(".processor", 1)[0])
        procs[name] = ReferenceProcessor(attn, r)
    params = [p for proc in procs.values() for p in proc.parameters()]
    unet.set_attn_processor(procs)  # (empties the dict)
    return params


def setup(case: str, unet):
    """Adapt `unet` for `case`; returns the trainable parameters (None for the bare model)."""
    r = UNET["rank"]
    if case == "bare":
        return None
    if case == "tlora":
        return tlora.inject(unet, rank=r, min_rank=r // 2, target_modules=TARGETS).parameters()
    if case == "reference":
        return reference_setup(unet, r)
    if case == "peft":
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=r, lora_alpha=r, init_lora_weights="gaussian", target_modules=TARGETS))
        return [p for p in unet.parameters() if p.requires_grad]
    raise ValueError(case)


def train_step_fn(case: str, latent: int, batch: int = 1):
    unet = sdxl_like_unet()
    params = setup(case, unet)
    unet.train()
    inputs = unet_inputs(batch, latent)
    noise = torch.randn(inputs["sample"].shape, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4) if params is not None else None
    cyc = Cycle(batch)

    r = UNET["rank"]

    def step():
        sample = inputs["sample"]
        if opt is None:
            sample = sample.clone().requires_grad_(True)
        t = cyc.next()
        kwargs = {}
        if case == "reference":
            # The rank mask for this step's timesteps, passed to the processors as the reference does.
            ranks = tlora.rank_schedule(t, r, r // 2)
            kwargs["cross_attention_kwargs"] = {
                "sigma_mask": (torch.arange(r)[None, :] < ranks[:, None]).float()[:, None, :]
            }
        pred = unet(
            sample, t, inputs["encoder_hidden_states"], added_cond_kwargs=inputs["added_cond_kwargs"], **kwargs
        ).sample
        F.mse_loss(pred, noise).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def train_section(quick: bool, latents) -> list[dict]:
    rounds = 4 if quick else 10
    rows = []
    for latent in latents:
        times = interleaved(
            {case: train_step_fn(case, latent) for case in ("bare", "peft", "tlora", "reference")}, rounds
        )
        res = {k: statistics.median(v) for k, v in times.items()}
        row = {
            "latent": latent,
            **{k: v * 1e3 for k, v in res.items()},
            "tlora_vs_peft": res["tlora"] / res["peft"],
            "tlora_vs_reference": res["tlora"] / res["reference"],
            "reference_vs_peft": res["reference"] / res["peft"],
            "peft_vs_bare": res["peft"] / res["bare"],
            "tlora_vs_bare": res["tlora"] / res["bare"],
            "rounds": rounds,
        }
        rows.append(row)
        print("train", json.dumps(row), flush=True)
    return rows


def report(rows: list[dict]) -> str:
    return f"### b. Training step (batch 1, AdamW), ms (median of interleaved rounds); UNet {UNET}\n\n" + md_table(
        rows,
        [
            "latent",
            "bare",
            "peft",
            "tlora",
            "reference",
            "tlora_vs_peft",
            "tlora_vs_reference",
            "reference_vs_peft",
            "peft_vs_bare",
            "tlora_vs_bare",
        ],
    )
