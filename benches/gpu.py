"""GPU benchmark: tlora on full-size denoisers in bfloat16 against PEFT LoRA and the bare model.

    python benches/gpu.py [--out DIR] [--dry-run] [--skip-flux] [--budget SECONDS]

a. SD-XL: the full-size SD-XL UNet built from its config (2.57 B parameters, random weights, no
   download), bfloat16, 1024x1024 images (128x128 latents), batch 1, adapters of rank 64 on the
   attention projections (to_q, to_k, to_v, to_out.0): a training step (forward, epsilon loss,
   backward, AdamW on the adapter) of tlora T-LoRA (r_min 32, the sample's own timestep), PEFT
   LoRA as diffusers sets it up (`unet.add_adapter`), and the bare model (forward + backward to
   the input); torch.cuda.max_memory_allocated of each; then sampling (25 steps with
   classifier-free guidance, batch 2) per step: bare, tlora (first run folds, second reuses the
   fold cache), PEFT (unmerged).
b. FLUX.1: a transformer of FLUX.1-dev's size (19 double + 38 single blocks, 3072 wide, 12 B
   parameters) with 1024 image tokens (512x512) and 512 text tokens: the same training step and
   memory, rank 64 (r_min 32) on FLUX's attention projections. Skipped by --skip-flux or when the
   SD-XL part left less than 40 % of --budget.

Each case is timed after warm-up steps as the mean of timed steps between torch.cuda.synchronize()
calls; ratios are against the bare model or PEFT in the same process. --dry-run builds tiny models
of the same structure and runs everything in float32 at rank 4 on the CPU (or $TLORA_BENCH_DEVICE)
with a step per case and no time budget, to check the script where there is no GPU; its figures mean
nothing.
Writes gpu.json and gpu.md into --out (default: $OUT if set, else bench-results/gpu).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from full_size import FLUX_TRANSFORMER, SDXL_UNET

import tlora
from tlora.files.atomic import write_atomic

T = 1000
RANK = 64  # --dry-run: 4
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]

SDXL_DRY = dict(
    SDXL_UNET,
    sample_size=8,
    layers_per_block=1,
    block_out_channels=(32, 64, 128),
    transformer_layers_per_block=(1, 1, 1),
    attention_head_dim=(2, 4, 8),
    cross_attention_dim=64,
    addition_time_embed_dim=16,
    projection_class_embeddings_input_dim=32 + 6 * 16,
    norm_num_groups=16,
)
FLUX_DRY = dict(
    FLUX_TRANSFORMER,
    in_channels=16,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    axes_dims_rope=(4, 6, 6),
)


def build(cls, config: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """A model with its constructor's random init, created directly on `device` (no host copy)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(**config)
    return model.to(dtype).requires_grad_(False)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(step, device: str, warmup: int, steps: int) -> float:
    """Mean seconds per call of `step` after `warmup` calls."""
    for _ in range(warmup):
        step()
    sync(device)
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - tic) / steps


def peak_memory(device: str):
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def reset_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---- the models' inputs -------------------------------------------------------------------------


def sdxl_inputs(config: dict, batch: int, device: str, dtype):
    g = torch.Generator().manual_seed(0)
    side, text = config["sample_size"], (77 if config["sample_size"] >= 64 else 8)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    px = float(side * 8)
    return {
        "sample": randn(batch, 4, side, side),
        "encoder_hidden_states": randn(batch, text, config["cross_attention_dim"]),
        "added_cond_kwargs": {
            "text_embeds": randn(batch, pooled),
            "time_ids": torch.tensor([[px, px, 0.0, 0.0, px, px]]).repeat(batch, 1).to(device, dtype),
        },
    }


def flux_inputs(config: dict, image_tokens: int, text_tokens: int, device: str, dtype):
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    side = int(image_tokens**0.5)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return {
        "hidden_states": randn(1, image_tokens, config["in_channels"]),
        "encoder_hidden_states": randn(1, text_tokens, config["joint_attention_dim"]),
        "pooled_projections": randn(1, config["pooled_projection_dim"]),
        "txt_ids": torch.zeros(text_tokens, 3).to(device, dtype),
        "img_ids": img_ids.reshape(-1, 3).to(device, dtype),
        "guidance": torch.full((1,), 3.5).to(device, dtype),
    }


# ---- adapters -----------------------------------------------------------------------------------


def adapt(case: str, model, targets):
    """Adapt `model` for `case`; returns (trainable parameters or None, undo)."""
    if case == "bare":
        return None, lambda: None
    if case == "tlora":
        adapter = tlora.inject(model, rank=RANK, min_rank=RANK // 2, target_modules=targets)
        return adapter.parameters(), adapter.remove
    if case == "peft":
        from peft import LoraConfig

        model.add_adapter(
            LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=targets),
            adapter_name="bench",
        )
        # unload_lora puts the original modules back (delete_adapters would leave empty wrappers).
        return [p for p in model.parameters() if p.requires_grad], model.unload_lora
    raise ValueError(case)


def train_case(
    case: str, model, call, model_input: torch.Tensor, targets, device: str, warmup: int, steps: int
) -> dict:
    params, undo = adapt(case, model, targets)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4) if params else None
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(model_input.shape, generator=g).to(device, model_input.dtype)
    times = torch.randint(0, T, (64,), generator=g)
    state = {"i": 0}

    def step():
        t = times[state["i"] % len(times)].reshape(1)
        state["i"] += 1
        x = model_input if opt else model_input.clone().requires_grad_(True)
        pred = call(model, x, t.to(device))
        F.mse_loss(pred.float(), noise.float()).backward()
        if opt:
            opt.step()
            opt.zero_grad(set_to_none=True)

    reset_memory(device)
    seconds = timed(step, device, warmup, steps)
    row = {
        "case": case,
        "ms": seconds * 1e3,
        "max_memory_allocated_gib": peak_memory(device),
        "trainable_parameters": sum(p.numel() for p in params) if params else 0,
    }
    opt = params = None  # (step() holds opt: release the optimizer state before undo)
    undo()
    return row


def sdxl_call(inputs):
    def call(unet, x, t):
        return unet(
            x, t, inputs["encoder_hidden_states"], added_cond_kwargs=inputs["added_cond_kwargs"], return_dict=False
        )[0]

    return call


def flux_call(inputs):
    def call(model, x, t):
        kw = {k: v for k, v in inputs.items() if k != "hidden_states"}
        return model(hidden_states=x, timestep=t.to(x.dtype) / T, return_dict=False, **kw)[0]

    return call


def sampling_case(case: str, unet, config: dict, device: str, dtype, steps: int, runs: int) -> dict:
    """Seconds per denoising step of CFG sampling (batch 2), for each of `runs` runs."""
    inputs = sdxl_inputs(config, 2, device, dtype)
    _, undo = adapt(case, unet, UNET_TARGETS)
    stride = T // steps
    schedule = [i * stride + 1 for i in reversed(range(steps))]  # SD-XL's "leading" spacing
    per_step = []
    with torch.no_grad():
        for _ in range(runs):
            x = inputs["sample"][:1]
            sync(device)
            tic = time.perf_counter()
            for t in schedule:
                both = unet(
                    torch.cat([x, x]),
                    t,
                    inputs["encoder_hidden_states"],
                    added_cond_kwargs=inputs["added_cond_kwargs"],
                    return_dict=False,
                )[0]
                uncond, cond = both.chunk(2)
                x = x - 0.01 * (uncond + 5.0 * (cond - uncond))
            sync(device)
            per_step.append((time.perf_counter() - tic) / steps * 1e3)
    undo()
    return {"case": case, "ms_per_step": per_step}


# ---- sections ---------------------------------------------------------------------------------


def sdxl_section(args, device: str, dtype) -> dict:
    from diffusers import UNet2DConditionModel

    config = SDXL_DRY if args.dry_run else SDXL_UNET
    tic = time.perf_counter()
    unet = build(UNet2DConditionModel, config, device, dtype)
    built = time.perf_counter() - tic
    n_params = sum(p.numel() for p in unet.parameters())
    inputs = sdxl_inputs(config, 1, device, dtype)
    call = sdxl_call(inputs)
    warmup, steps = (1, 1) if args.dry_run else (3, 10)
    unet.train()
    train = [
        train_case(case, unet, call, inputs["sample"], UNET_TARGETS, device, warmup, steps)
        for case in ("bare", "tlora", "peft")
    ]
    unet.eval()
    sample_steps = 2 if args.dry_run else 25
    sampling = [
        sampling_case(case, unet, config, device, dtype, sample_steps, runs)
        for case, runs in (("bare", 2), ("tlora", 2), ("peft", 1))
    ]
    by = {r["case"]: r for r in train}
    bare_sample = min(sampling[0]["ms_per_step"])
    out = {
        "parameters": n_params,
        "build_seconds": built,
        "latent": config["sample_size"],
        "train": train,
        "sampling": sampling,
        "steps": sample_steps,
        "tlora_vs_peft": by["tlora"]["ms"] / by["peft"]["ms"],
        "tlora_vs_bare": by["tlora"]["ms"] / by["bare"]["ms"],
        "peft_vs_bare": by["peft"]["ms"] / by["bare"]["ms"],
        "sampling_tlora_vs_bare_first": sampling[1]["ms_per_step"][0] / bare_sample,
        "sampling_tlora_vs_bare_cached": sampling[1]["ms_per_step"][-1] / bare_sample,
        "sampling_peft_vs_bare": sampling[2]["ms_per_step"][0] / bare_sample,
    }
    if by["bare"]["max_memory_allocated_gib"] is not None:
        out["memory_tlora_vs_peft"] = by["tlora"]["max_memory_allocated_gib"] / by["peft"]["max_memory_allocated_gib"]
    del unet
    return out


def flux_section(args, device: str, dtype) -> dict:
    from diffusers import FluxTransformer2DModel

    config = FLUX_DRY if args.dry_run else FLUX_TRANSFORMER
    image_tokens, text_tokens = (16, 8) if args.dry_run else (1024, 512)
    tic = time.perf_counter()
    model = build(FluxTransformer2DModel, config, device, dtype)
    built = time.perf_counter() - tic
    n_params = sum(p.numel() for p in model.parameters())
    inputs = flux_inputs(config, image_tokens, text_tokens, device, dtype)
    warmup, steps = (1, 1) if args.dry_run else (2, 5)
    model.train()
    train = [
        train_case(case, model, flux_call(inputs), inputs["hidden_states"], FLUX_TARGETS, device, warmup, steps)
        for case in ("bare", "tlora", "peft")
    ]
    by = {r["case"]: r for r in train}
    out = {
        "parameters": n_params,
        "build_seconds": built,
        "image_tokens": image_tokens,
        "text_tokens": text_tokens,
        "train": train,
        "tlora_vs_peft": by["tlora"]["ms"] / by["peft"]["ms"],
        "tlora_vs_bare": by["tlora"]["ms"] / by["bare"]["ms"],
        "peft_vs_bare": by["peft"]["ms"] / by["bare"]["ms"],
    }
    if by["bare"]["max_memory_allocated_gib"] is not None:
        out["memory_tlora_vs_peft"] = by["tlora"]["max_memory_allocated_gib"] / by["peft"]["max_memory_allocated_gib"]
    del model
    return out


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"# tlora GPU benchmark{' (dry run: tiny models, figures meaningless)' if result['dry_run'] else ''}",
        "",
        f"{env['device_name']}, torch {env['torch']}, tlora {env['tlora']}, Python {env['python']}, "
        f"{env['dtype']} weights, rank {RANK} (r_min {RANK // 2}).",
        "",
    ]
    for name, title in (("sdxl", "SD-XL UNet"), ("flux", "FLUX.1-sized transformer")):
        sec = result.get(name)
        if sec is None:
            continue
        if "error" in sec:
            lines += [f"## {title}: failed", "", "```", sec["error"], "```", ""]
            continue
        lines += [
            f"## {title} ({sec['parameters'] / 1e9:.2f} B parameters)",
            "",
            "| training step | ms | max_memory_allocated (GiB) | trainable parameters |",
            "|---|---|---|---|",
        ]
        for row in sec["train"]:
            mem = "-" if row["max_memory_allocated_gib"] is None else f"{row['max_memory_allocated_gib']:.2f}"
            lines.append(f"| {row['case']} | {row['ms']:.1f} | {mem} | {row['trainable_parameters'] / 1e6:.1f} M |")
        lines += [
            "",
            f"tlora / PEFT: {sec['tlora_vs_peft']:.3f} x; tlora / bare: {sec['tlora_vs_bare']:.3f} x; "
            f"PEFT / bare: {sec['peft_vs_bare']:.3f} x"
            + (f"; memory tlora / PEFT: {sec['memory_tlora_vs_peft']:.3f} x" if "memory_tlora_vs_peft" in sec else ""),
            "",
        ]
        if "sampling" in sec:
            lines += [
                f"Sampling, {sec['steps']} CFG steps (batch 2), ms per step: "
                + "; ".join(
                    f"{s['case']} " + " / ".join(f"{v:.1f}" for v in s["ms_per_step"]) for s in sec["sampling"]
                ),
                f"tlora / bare: {sec['sampling_tlora_vs_bare_first']:.3f} x (first run, folding), "
                f"{sec['sampling_tlora_vs_bare_cached']:.3f} x (second run); PEFT unmerged / bare: "
                f"{sec['sampling_peft_vs_bare']:.3f} x",
                "",
            ]
    if result.get("skipped"):
        lines += [f"Skipped: {result['skipped']}", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("bench-results/gpu")
    )
    ap.add_argument("--dry-run", action="store_true", help="tiny models on the CPU: checks the script, not the speed")
    ap.add_argument("--skip-flux", action="store_true")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds; FLUX runs only if 40%% of it is left")
    args = ap.parse_args(argv)

    device = os.environ.get("TLORA_BENCH_DEVICE") or ("cpu" if args.dry_run else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --dry-run for the CPU check")
    global RANK
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    if args.dry_run:
        RANK = 4
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "dry_run": args.dry_run,
        "environment": {
            "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
            "torch": torch.__version__,
            "tlora": tlora.__version__,
            "python": platform.python_version(),
            "cuda": torch.version.cuda,
            "device": device,
            "dtype": str(dtype).replace("torch.", ""),
        },
    }

    def save():
        write_atomic(args.out / "gpu.json", json.dumps(result, indent=1))
        write_atomic(args.out / "gpu.md", markdown(result))

    for name, section in (("sdxl", sdxl_section), ("flux", flux_section)):
        if name == "flux":
            left = args.budget - (time.perf_counter() - start)
            if args.skip_flux or (left < 0.4 * args.budget and not args.dry_run):
                result["skipped"] = f"FLUX ({'--skip-flux' if args.skip_flux else f'{left:.0f} s of the budget left'})"
                break
        try:
            result[name] = section(args, device, dtype)
        except Exception as err:  # keep what ran: the other section and this error go into the report
            import traceback

            result[name] = {"error": "".join(traceback.format_exception(err))[-4000:]}
        reset_memory(device)
        save()
        print(f"{name}: done at {time.perf_counter() - start:.0f} s", flush=True)
    result["seconds"] = time.perf_counter() - start
    save()
    print(markdown(result))
    return 1 if any("error" in result.get(k, {}) for k in ("sdxl", "flux")) else 0


if __name__ == "__main__":
    raise SystemExit(main())
