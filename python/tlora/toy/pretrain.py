"""Pretrain the bundled toy text-to-image model from scratch: `python -m tlora.toy.pretrain`.

Seeded and reproducible. Three stages, all on synthetic scenes from `world`:
1. a small AutoencoderKL (32x32 RGB <-> 16x16x4 latents);
2. a CLIPTextModel and a UNet2DConditionModel trained jointly on captions (10% dropped for
   classifier-free guidance), with an EMA of their weights;
3. a check of the floor on held-out captions (background colour and object position).
The result is a standard StableDiffusionPipeline folder (fp16 weights) that `from_pretrained`
loads, so `tlora train` and `tlora generate` use it exactly as they use Stable Diffusion.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import world
from .tokenizer import clip_tokenizer

MAX_TOKENS = 24
DEFAULT_OUT = Path(__file__).parent / "model"


def build_components(seed: int):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(world.VOCAB_WORDS, MAX_TOKENS)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=16, sample_size=world.SIZE)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=world.SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=16)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                              set_alpha_to_one=False, prediction_type="epsilon")
    return tokenizer, vae, text_encoder, unet, scheduler


def scenes(rng: np.random.Generator, n: int, split: str = "train"):
    batch = [world.sample_scene(rng, split=split) for _ in range(n)]
    pixels = np.stack([world.render(s, rng) for s in batch])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, [world.caption(s) for s in batch], batch


def patterned(rng: np.random.Generator, n: int) -> torch.Tensor:
    """Random two-colour striped, checkered and dotted patches on plain backgrounds. The world has
    only flat-coloured objects; these teach the autoencoder to keep fine patterns too, so that new
    concepts (patterned sprites) survive encoding."""
    out = np.empty((n, world.SIZE, world.SIZE, 3), np.uint8)
    yy, xx = np.mgrid[: world.SIZE, : world.SIZE]
    for i in range(n):
        c = rng.integers(0, 256, (3, 3))
        out[i] = c[0]
        x0, y0 = rng.integers(0, world.SIZE - 8, 2)
        w, h = rng.integers(6, 18, 2)
        box = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
        period = int(rng.integers(2, 6))
        kind = rng.integers(3)
        if kind == 0:
            on = ((xx + yy) // period) % 2 == 0
        elif kind == 1:
            on = ((xx // period) + (yy // period)) % 2 == 0
        else:
            on = ((xx % period) < period // 2 + 1) & ((yy % period) < period // 2 + 1)
        out[i][box & on] = c[1]
        out[i][box & ~on] = c[2]
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(vae, rng, steps: int, batch: int) -> float:
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    bar = tqdm(range(steps), desc="vae")
    for _ in bar:
        x = torch.cat([scenes(rng, batch // 2)[0], patterned(rng, batch - batch // 2)])
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample()).sample
        kl = dist.kl().mean() / x[0].numel()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    with torch.no_grad():
        x, _, _ = scenes(rng, 256)
        z = vae.encode(x).latent_dist.mean
    return float(1.0 / z.std())


def train_denoiser(tokenizer, vae, text_encoder, unet, scheduler, rng, steps: int, batch: int, lr: float):
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    warmup = max(1, steps // 50)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps))))
    ema = [copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)]
    sf = vae.config.scaling_factor
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    bar = tqdm(range(steps), desc="unet+text")
    for step in bar:
        x, caps, _ = scenes(rng, batch)
        caps = ["" if rng.random() < 0.1 else c for c in caps]
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample(gen) * sf
        ids = tokenizer(caps, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        noisy = scheduler.add_noise(latents, noise, t)
        cond = text_encoder(ids)[0]
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, m in zip(ema, (unet, text_encoder)):
                for pe, pm in zip(e.parameters(), m.parameters()):
                    pe.lerp_(pm, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema


def evaluate(folder: Path, n: int, seed: int, steps: int = 25) -> dict:
    """Share of held-out captions whose samples have the right background and position."""
    from diffusers import StableDiffusionPipeline

    from . import metrics

    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(seed)
    bg_ok = pos_ok = 0
    batch = [world.sample_scene(rng, split="heldout", second_prob=0.0) for _ in range(n)]
    for i in tqdm(range(0, n, 16), desc="eval"):
        chunk = batch[i:i + 16]
        out = pipe([world.caption(s) for s in chunk], num_inference_steps=steps, guidance_scale=5.0,
                   generator=torch.Generator().manual_seed(seed + i), output_type="np").images
        for s, img in zip(chunk, (out * 255).round().astype(np.uint8)):
            bg_ok += metrics.background_colour(img) == s.background
            pos_ok += metrics.object_position(img, s.background) == s.position
    return {"heldout_samples": n, "background_correct": bg_ok / n, "position_correct": pos_ok / n}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=800)
    ap.add_argument("--steps", type=int, default=3000, help="UNet + text encoder steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-samples", type=int, default=200)
    args = ap.parse_args(argv)
    from diffusers import StableDiffusionPipeline

    tic = time.time()
    rng = np.random.default_rng(args.seed)
    tokenizer, vae, text_encoder, unet, scheduler = build_components(args.seed)
    vae.register_to_config(scaling_factor=train_vae(vae, rng, args.vae_steps, 32))
    vae.requires_grad_(False).eval()
    ema_unet, ema_text = train_denoiser(tokenizer, vae, text_encoder, unet, scheduler, rng, args.steps, args.batch, args.lr)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=ema_text, tokenizer=tokenizer, unet=ema_unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    report = {"seed": args.seed, "vae_steps": args.vae_steps, "steps": args.steps, "batch": args.batch,
              "lr": args.lr, "train_seconds": round(time.time() - tic), "threads": torch.get_num_threads()}
    report.update(evaluate(tmp, args.eval_samples, args.seed + 1))
    (tmp / "pretrain.json").write_text(json.dumps(report, indent=2))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
