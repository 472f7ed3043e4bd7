"""Speed and memory of tlora against PEFT LoRA, LyCORIS, the paper's equations and the bare model
(not in CI).

    python benches/speed.py [--quick] [--out bench-results] [--only layer,train,sample,memory,scaling]
                            [--layer-batch 2]

a. layer: one adapted linear layer, forward + backward, SD-XL shapes (tokens 1024 and 4096 per
   sample, in/out 640 and 1280, cross-attention in 2048), rank 64 (r_min 32), batch 2 with
   per-sample timesteps uniform on [0, 1000): tlora T-LoRA, tlora LoRA, PEFT LoRA at the same
   rank, the paper's equations in plain PyTorch (two full-rank branches times the mask),
   LyCORIS's TLoraModule (default and bypass mode; it takes one mask per batch, so it gets the
   batch's largest rank) and the bare layer; tlora-factored is tlora T-LoRA with the frozen
   branch... (removed: one kernel path now). Methods are timed round-robin (one
   step each per round, median of the rounds) with a dense upstream gradient. --layer-batch 1:
   one timestep.
   benches/kernels.rs (criterion) times the same case on the Rust kernels alone.
b. train: a training step (forward, epsilon loss, backward, AdamW) of a small UNet with SD-XL's
   block structure (UNet2DConditionModel, text_time embedding, DownBlock2D then two cross-attention
   levels, transformer layers per block scaled down from SD-XL's (1, 2, 10)) at 64x64 and 128x128
   latents (SD-XL's token counts at 512 and 1024 pixels): tlora T-LoRA vs PEFT LoRA set up as
   diffusers' DreamBooth LoRA script does vs the reference implementation's way (attention
   processors adding full-rank branches times the mask, passed through cross_attention_kwargs, to
   q, k, v and out, with a materialised softmax attention) vs the bare model (forward + backward
   to the input). The adapters' rank is scaled with the widths (rank / width as rank 64 on SD-XL).
c. sample: 25 denoising steps with classifier-free guidance (batch 2) on that UNet, per-step time:
   bare, tlora (fast path: first run folds, second run reuses the cache), tlora with the fast
   path switched off, PEFT LoRA (unmerged).
d. memory: peak memory of (b), each case in a fresh subprocess: the peak resident set size of three
   steps (VmHWM, reset after the model is built so that importing torch does not mask it; max RSS
   from getrusage where the reset is unavailable), and CUDA max allocated when on a GPU.
e. scaling: adapter cost (tlora or PEFT minus bare) of one 1280x1280 layer against tokens
   (256..16384, rank 64) and rank (4..128, 4096 tokens), next to its FLOP count, at the full rank.

Writes bench-results/speed.json and speed.md (`--rewrite` redoes speed.md from speed.json).
Times are medians (layer, train: interleaved rounds) or the best of the rounds (sample).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import tlora

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import max_rss_mb, peak_rss_mb, reset_peak, status_mb  # noqa: E402

T = 1000
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def interleaved(fns: dict, rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin so that drifts of the machine hit
    every case alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            tic = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - tic)
    return times


class Cycle:
    """Seeded timesteps, uniform on [0, T), the same sequence for every method."""

    def __init__(self, batch: int, seed: int = 0, n: int = 64):
        g = torch.Generator().manual_seed(seed)
        self.ts = [torch.randint(0, T, (batch,), generator=g) for _ in range(n)]
        self.i = 0

    def next(self) -> torch.Tensor:
        t = self.ts[self.i % len(self.ts)]
        self.i += 1
        return t


# ---- a. one layer --------------------------------------------------------------------------


class Holder(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.to_q = lin

    def forward(self, x, timestep):
        return self.to_q(x)


def reference_layer(lin: nn.Linear, r: int, r_min: int):
    """The paper's formula as plain PyTorch: full-rank trainable and frozen branches times a mask."""
    out_f, in_f = lin.weight.shape
    p = nn.Parameter(torch.randn(out_f, r) * 0.01)
    lam = nn.Parameter(torch.ones(r))
    q = nn.Parameter(torch.randn(r, in_f) * 0.01)
    p0, lam0, q0 = p.detach().clone(), lam.detach().clone(), q.detach().clone()

    def forward(x, t):
        ranks = tlora.rank_schedule(t, r, r_min)
        m = (torch.arange(r)[None, :] < ranks[:, None]).float()[:, None, :]
        y = lin(x)
        y = y + ((x @ q.T) * lam * m) @ p.T - ((x @ q0.T) * lam0 * m) @ p0.T
        return y

    return forward, [p, lam, q]


def lycoris_layer(lin: nn.Linear, r: int, r_min: int, bypass: bool):
    from lycoris.modules.tlora import TLoraModule, compute_timestep_mask, set_timestep_mask

    module = TLoraModule(
        "lora_unet_to_q", lin, lora_dim=r, alpha=r, sig_type="last", use_data_init=False, bypass_mode=bypass
    )
    module.apply_to()
    params = [p for p in module.parameters() if p.requires_grad]
    masks = {}

    def forward(x, t):
        tmin = int(t.min())  # one mask per batch: the batch's largest rank
        if tmin not in masks:
            masks[tmin] = compute_timestep_mask(tmin, T, r, r_min)
        set_timestep_mask(masks[tmin])
        return lin(x)

    return forward, params


def bench_layer(tokens: int, in_f: int, out_f: int, r: int, repeats: int, lycoris: bool, batch: int = 2) -> dict:
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    x = torch.randn(batch, tokens, in_f)
    # A dense upstream gradient, as a layer inside a network gets (the gradient of a plain .sum()
    # is an expanded stride-0 tensor that every product would first have to copy).
    gout = torch.randn(batch, tokens, out_f)
    steps = {}

    def add(name, fn, params):
        """One forward + backward of `fn` per call."""
        cyc = Cycle(batch)

        def step():
            xi = x.clone().requires_grad_(True)
            fn(xi, cyc.next()).backward(gout)
            for p in params:
                p.grad = None

        steps[name] = step

    def linear():
        return nn.Linear(in_f, out_f).requires_grad_(False)

    base = linear()
    add("bare", lambda xi, t: base(xi), [])
    for variant in ("tlora", "lora"):
        m = Holder(linear())
        ad = tlora.inject(m, rank=r, variant="lora" if variant == "lora" else "tlora")
        with torch.no_grad():
            for p in ad.parameters():
                p.add_(0.01 * torch.randn_like(p))
        add(f"tlora-{variant}", lambda xi, t, m=m: m(xi, t), list(ad.parameters()))
    pm = inject_adapter_in_model(
        LoraConfig(r=r, lora_alpha=r, target_modules=["to_q"], init_lora_weights="gaussian"), Holder(linear())
    )
    add("peft-lora", lambda xi, t: pm(xi, t), [p for p in pm.parameters() if p.requires_grad])
    ref, ref_params = reference_layer(linear(), r, r // 2)
    add("reference", ref, ref_params)
    if lycoris:
        for bypass in (False, True):
            fn, params = lycoris_layer(linear(), r, r // 2, bypass)
            add("lycoris-bypass" if bypass else "lycoris", fn, params)
    # Round-robin, so that drifts of the machine hit every method alike; the median of the rounds.
    times = interleaved(steps, repeats, warmup=2)
    if lycoris:
        from lycoris.modules.tlora import clear_timestep_mask

        clear_timestep_mask()
    return {k: statistics.median(v) for k, v in times.items()}


def layer_section(quick: bool, batch: int = 2) -> list[dict]:
    repeats = 5 if quick else 15
    shapes = (
        [(1024, 640, 640), (1024, 2048, 1280)]
        if quick
        else [(t, i, o) for t in (1024, 4096) for i, o in ((640, 640), (1280, 1280), (2048, 640), (2048, 1280))]
    )
    rows = []
    for tokens, in_f, out_f in shapes:
        res = bench_layer(tokens, in_f, out_f, 64, repeats, lycoris=True, batch=batch)
        bare = res["bare"]
        row = {
            "batch": batch,
            "tokens": tokens,
            "in": in_f,
            "out": out_f,
            "rank": 64,
            **{k: v * 1e3 for k, v in res.items()},
            "overhead_vs_reference": (res["tlora-tlora"] - bare) / (res["reference"] - bare),
            "tlora_vs_peft": res["tlora-tlora"] / res["peft-lora"],
            "tlora_vs_bare": res["tlora-tlora"] / bare,
        }
        rows.append(row)
        print("layer", json.dumps(row), flush=True)
    return rows


# ---- b, c, d. a small UNet with SD-XL's structure ------------------------------------------------

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


def sample_timesteps(steps: int) -> list[int]:
    # "leading" spacing, as SD-XL's Euler / DDIM: 999 // steps apart, offset 1
    stride = T // steps
    return [i * stride + 1 for i in reversed(range(steps))]


def sampling_run(unet, latent: int, steps: int) -> float:
    """Seconds per denoising step of one CFG sampling run."""
    inputs = unet_inputs(2, latent)
    x = inputs["sample"][:1]
    tic = time.perf_counter()
    with torch.no_grad():
        for t in sample_timesteps(steps):
            both = unet(
                torch.cat([x, x]), t, inputs["encoder_hidden_states"], added_cond_kwargs=inputs["added_cond_kwargs"]
            ).sample
            uncond, cond = both.chunk(2)
            x = x - 0.01 * (uncond + 5.0 * (cond - uncond))
    return (time.perf_counter() - tic) / steps


def sample_section(quick: bool, latents, steps: int = 25) -> list[dict]:
    rounds = 1 if quick else 3
    rows = []
    for latent in latents:
        unets = {case: sdxl_like_unet().eval() for case in ("bare", "tlora", "peft")}
        adapter = tlora.inject(unets["tlora"], rank=UNET["rank"], min_rank=UNET["rank"] // 2, target_modules=TARGETS)
        with torch.no_grad():
            for p in adapter.parameters():
                p.add_(0.01 * torch.randn_like(p))
        setup("peft", unets["peft"])

        def tlora_run(cached: bool, fast: bool = True):
            def run():
                if not cached:
                    adapter.state.fold_cache.clear()
                adapter.fast_path = fast
                try:
                    return sampling_run(unets["tlora"], latent, steps)
                finally:
                    adapter.fast_path = True

            return run

        # tlora: a first run after training (no folded weights yet); tlora-cached: the same
        # schedule again, every folded weight cached; tlora-factored: the fast path switched off.
        cases = {
            "bare": lambda: sampling_run(unets["bare"], latent, steps),
            "tlora": tlora_run(False),
            "tlora-cached": tlora_run(True),
            "tlora-factored": tlora_run(True, fast=False),
            "peft": lambda: sampling_run(unets["peft"], latent, steps),
        }
        for unet in unets.values():  # warm-up
            sampling_run(unet, latent, 2)
        per_step: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(rounds):
            for key, fn in cases.items():
                per_step[key].append(fn())
        res = {k: min(v) for k, v in per_step.items()}
        row = {
            "latent": latent,
            "steps": steps,
            "rounds": rounds,
            **{k: v * 1e3 for k, v in res.items()},
            **{f"{k}_vs_bare": v / res["bare"] for k, v in res.items() if k != "bare"},
        }
        rows.append(row)
        print("sample", json.dumps(row), flush=True)
    return rows


def memory_case(case: str, latent: int, steps: int = 3) -> dict:
    """Runs in a fresh process: peak memory of `steps` training steps. The peak resident set size
    is reset (Linux /proc/self/clear_refs) after the model is built, so that the peak of the steps
    is not hidden under the peak of importing torch."""
    step = train_step_fn(case, latent)
    setup_mb = status_mb("VmRSS")
    reset = reset_peak()
    for _ in range(steps):
        step()
    peak = peak_rss_mb(reset)
    out = {
        "case": case,
        "latent": latent,
        "setup_rss_mb": setup_mb,
        "peak_rss_mb": peak,
        "step_peak_mb": peak - setup_mb,
        "hwm_reset": reset,
        "ru_maxrss_mb": max_rss_mb(),
    }
    if torch.cuda.is_available():
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def memory_section(latents) -> list[dict]:
    rows = []
    for latent in latents:
        res = {}
        for case in ("bare", "peft", "tlora", "reference"):
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--memory-case",
                    case,
                    "--latent",
                    str(latent),
                    "--train-rank",
                    str(UNET["rank"]),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            res[case] = json.loads(proc.stdout.strip().splitlines()[-1])
        row = {
            "latent": latent,
            **{f"{c}_peak_rss_mb": res[c]["peak_rss_mb"] for c in res},
            **{f"{c}_step_peak_mb": res[c]["step_peak_mb"] for c in res},
            "tlora_vs_peft_peak_rss": res["tlora"]["peak_rss_mb"] / res["peft"]["peak_rss_mb"],
            "tlora_vs_peft_step_peak": res["tlora"]["step_peak_mb"] / res["peft"]["step_peak_mb"],
            "tlora_vs_reference_peak_rss": res["tlora"]["peak_rss_mb"] / res["reference"]["peak_rss_mb"],
        }
        if "cuda_max_allocated_mb" in res["tlora"]:
            row.update({f"{c}_cuda_max_allocated_mb": res[c]["cuda_max_allocated_mb"] for c in res})
        rows.append(row)
        print("memory", json.dumps(row), flush=True)
    return rows


# ---- e. scaling --------------------------------------------------------------------------------


def adapter_flops(kind: str, tokens: int, in_f: int, out_f: int, k: int) -> float:
    """Forward + backward FLOPs (2 per multiply-add) of the adapter alone at active rank k, on the
    path tlora takes for a float32 training step. PEFT LoRA: k wide everywhere (3 products each
    way). tlora T-LoRA, factored: [Q;Q0] and [P,P0] are 2k wide forward and for the input's
    gradient, k wide for the factor gradients; with the frozen branch folded into the weight
    (tokens (in + out) > in out): the trainable branch as LoRA plus one k-deep fold forward and
    one backward."""
    if kind == "peft":
        return 2.0 * 3 * tokens * k * (in_f + out_f)
    if tokens * (in_f + out_f) > in_f * out_f:
        return 2.0 * (3 * tokens * k * (in_f + out_f) + 2 * k * in_f * out_f)
    return 2.0 * 5 * tokens * k * (in_f + out_f)


def with_flops(row: dict) -> dict:
    t, d, r = row["tokens"], row["dim"], row["rank"]
    f_t, f_p = adapter_flops("tlora", t, d, d, r), adapter_flops("peft", t, d, d, r)
    row.update(
        {
            "tlora_adapter_gflop": f_t / 1e9,
            "peft_adapter_gflop": f_p / 1e9,
            "bare_gflop": 4.0 * t * d * d / 1e9,
            "tlora_adapter_gflops": f_t / max(row["tlora_adapter_ms"] * 1e-3, 1e-9) / 1e9,
            "peft_adapter_gflops": f_p / max(row["peft_adapter_ms"] * 1e-3, 1e-9) / 1e9,
        }
    )
    return row


def scaling_section(quick: bool) -> list[dict]:
    from peft import LoraConfig, inject_adapter_in_model

    repeats = 3 if quick else 7
    dim = 640 if quick else 1280
    token_sweep = [256, 1024, 4096] if quick else [256, 1024, 4096, 16384]
    rank_sweep = [4, 16, 64] if quick else [4, 8, 16, 32, 64, 128]
    cases = [(t, 64) for t in token_sweep] + [(4096, r) for r in rank_sweep if r != 64]
    rows = []
    for tokens, r in cases:
        torch.manual_seed(0)
        x = torch.randn(1, tokens, dim)

        gout = torch.randn(*x.shape[:-1], dim)

        def run(fn, params):
            def step():
                xi = x.clone().requires_grad_(True)
                fn(xi).backward(gout)
                for p in params:
                    p.grad = None

            return median_time(step, repeats)

        base = nn.Linear(dim, dim).requires_grad_(False)
        bare = run(base, [])
        m = Holder(nn.Linear(dim, dim))
        ad = tlora.inject(m, rank=r, min_rank=r // 2)
        with ad.rank(r):
            tl = run(lambda xi: m(xi, None), ad.parameters())
        pm = inject_adapter_in_model(
            LoraConfig(r=r, lora_alpha=r, target_modules=["to_q"], init_lora_weights="gaussian"),
            Holder(nn.Linear(dim, dim).requires_grad_(False)),
        )
        pe = run(lambda xi: pm(xi, None), [p for p in pm.parameters() if p.requires_grad])
        row = with_flops(
            {
                "tokens": tokens,
                "dim": dim,
                "rank": r,
                "bare_ms": bare * 1e3,
                "tlora_adapter_ms": (tl - bare) * 1e3,
                "peft_adapter_ms": (pe - bare) * 1e3,
            }
        )
        rows.append(row)
        print("scaling", json.dumps(row), flush=True)
    return rows


# ---- output ------------------------------------------------------------------------------------


def _fmt(v) -> str:
    if not isinstance(v, float):
        return str(v)
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def md_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def machine_info() -> dict:
    import diffusers
    import peft

    try:
        import lycoris

        lyc = getattr(lycoris, "__version__", "4.1.3")
    except ImportError:
        lyc = None
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "lycoris": lyc,
        "tlora": tlora.__version__,
        "load_avg_at_start": os.getloadavg(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats (< 3 minutes on 2 cores)")
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--only", default="layer,train,sample,memory,scaling", help="comma-separated sections")
    ap.add_argument("--layer-batch", type=int, default=2, help="batch of case a (samples with their own timesteps)")
    ap.add_argument(
        "--train-rank",
        type=int,
        default=UNET["rank"],
        help="adapter rank of cases b and d (default: scaled with the widths as rank 64 on SD-XL)",
    )
    ap.add_argument("--rewrite", action="store_true", help="rewrite speed.md from the speed.json in --out")
    ap.add_argument("--memory-case", help=argparse.SUPPRESS)
    ap.add_argument("--latent", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    UNET["rank"] = args.train_rank
    if args.memory_case:
        print(json.dumps(memory_case(args.memory_case, args.latent)))
        return

    if args.rewrite:
        results = json.loads((Path(args.out) / "speed.json").read_text())
        results["scaling"] = [with_flops(row) for row in results.get("scaling", [])]
        write_outputs(results, Path(args.out))
        return
    only = set(args.only.split(","))
    latents = [64] if args.quick else [64, 128]
    info = machine_info()
    print(json.dumps(info), flush=True)
    start = time.perf_counter()
    results: dict = {
        "info": info,
        "quick": args.quick,
        "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET.items()},
    }
    if "layer" in only:
        results["layer"] = layer_section(args.quick, args.layer_batch)
    if "train" in only:
        results["train"] = train_section(args.quick, latents)
    if "sample" in only:
        results["sample"] = sample_section(args.quick, latents)
    if "memory" in only:
        results["memory"] = memory_section(latents)
    if "scaling" in only:
        results["scaling"] = scaling_section(args.quick)
    results["seconds"] = time.perf_counter() - start
    write_outputs(results, Path(args.out))


def write_outputs(results: dict, out: Path) -> None:
    info, quick = results["info"], results["quick"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(results, indent=2))
    parts = [f"Machine: {json.dumps(info)}; quick={quick}; {results['seconds']:.0f} s\n"]
    if "layer" in results:
        parts.append(
            "### a. One layer, forward + backward, ms (median); per-sample timesteps\n\n"
            + md_table(
                results["layer"],
                [
                    "batch",
                    "tokens",
                    "in",
                    "out",
                    "bare",
                    "tlora-tlora",
                    "tlora-lora",
                    "peft-lora",
                    "reference",
                    "lycoris",
                    "lycoris-bypass",
                    "overhead_vs_reference",
                    "tlora_vs_peft",
                    "tlora_vs_bare",
                ],
            )
        )
    if "train" in results:
        parts.append(
            f"### b. Training step (batch 1, AdamW), ms (median of interleaved rounds); UNet {UNET}\n\n"
            + md_table(
                results["train"],
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
        )
    if "sample" in results:
        parts.append(
            "### c. Sampling, 25 steps with CFG (batch 2), ms per step (best of the rounds)\n\n"
            + md_table(
                results["sample"],
                [
                    "latent",
                    "bare",
                    "tlora",
                    "tlora-cached",
                    "tlora-factored",
                    "peft",
                    "tlora_vs_bare",
                    "tlora-cached_vs_bare",
                    "tlora-factored_vs_bare",
                    "peft_vs_bare",
                ],
            )
        )
    if "memory" in results:
        parts.append(
            "### d. Peak memory of 3 training steps (fresh process per case; peak RSS after the model is "
            "built, and that peak minus the RSS before the first step), MB\n\n"
            + md_table(
                results["memory"],
                [
                    "latent",
                    "bare_peak_rss_mb",
                    "peft_peak_rss_mb",
                    "tlora_peak_rss_mb",
                    "bare_step_peak_mb",
                    "peft_step_peak_mb",
                    "tlora_step_peak_mb",
                    "reference_peak_rss_mb",
                    "tlora_vs_peft_peak_rss",
                    "tlora_vs_peft_step_peak",
                    "tlora_vs_reference_peak_rss",
                ],
            )
        )
    if "scaling" in results:
        parts.append(
            "### e. Adapter cost (minus bare) of one layer, forward + backward, full rank\n\n"
            + md_table(
                results["scaling"],
                [
                    "tokens",
                    "dim",
                    "rank",
                    "bare_ms",
                    "tlora_adapter_ms",
                    "peft_adapter_ms",
                    "tlora_adapter_gflop",
                    "peft_adapter_gflop",
                    "bare_gflop",
                    "tlora_adapter_gflops",
                    "peft_adapter_gflops",
                ],
            )
        )
    text = "\n\n".join(parts) + "\n"
    (out / "speed.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
