"""Pretrain the bundled toy text-to-image model from scratch: `python -m tlora.demo.pretrain`.

Seeded and reproducible. A pre-rendered set of synthetic scenes from `world` (300k by default,
rendered in parallel, identical for any number of workers), then three stages:
1. a small AutoencoderKL (32x32 RGB <-> 16x16x4 latents);
2. a CLIPTextModel and a UNet2DConditionModel trained jointly on v-prediction (10% of captions
   dropped for classifier-free guidance, 30% of one-object captions without the colour word),
   with an EMA of their weights;
3. a check of the floor on held-out captions (background colour and object position), with the
   exact captions and with the fine-tuning phrasing "a photo of sks <shape> ...".
The result is a standard StableDiffusionPipeline folder (fp16 weights) that `from_pretrained`
loads, so `tlora train` and `tlora generate` use it exactly as they use Stable Diffusion.

The defaults are the shipped model's run (one H200, about 4 minutes of training; hours on a CPU,
where `--minutes` bounds the run and pretrain.json records the steps it reached). The shipped run
used `--minutes 4.2`, which stopped the stages at the default step counts.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
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
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=world.SIZE,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=world.SIZE // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        steps_offset=1,
    )
    return tokenizer, vae, text_encoder, unet, scheduler


CHUNK = 1024  # scenes per independently seeded chunk: the dataset does not depend on --workers


LOOSE = 0.3  # share of one-object captions that leave the object's colour unsaid


def loose_caption(scene: world.Scene, rng: np.random.Generator) -> str:
    """The exact caption, or (LOOSE of the time, one object only) one that leaves the colour
    unsaid: "a circle" or plain "circle". Fine-tuning prompts read "a photo of sks circle": a model
    that has only seen "a <colour> <shape>" loses the background and position words after an
    unfamiliar phrase, one that has seen looser phrasing keeps them."""
    if scene.second is None and rng.random() < LOOSE:
        what = scene.shape if rng.random() < 0.5 else f"a {scene.shape}"
        return world.describe(what, scene.position, scene.background)
    return world.caption(scene)


def _render_chunk(args: tuple[int, int, int]) -> tuple[np.ndarray, list[str]]:
    seed, index, n = args
    rng = np.random.default_rng([seed, index])
    batch = [world.sample_scene(rng) for _ in range(n)]
    return np.stack([world.render(s, rng) for s in batch]), [loose_caption(s, rng) for s in batch]


def render_dataset(seed: int, n: int, workers: int) -> tuple[torch.Tensor, list[str]]:
    """`n` seeded training scenes as uint8 (n, 3, 32, 32) and their captions. Rendering ahead
    (in parallel when workers > 1) keeps a GPU from waiting on numpy."""
    jobs = [(seed, i, min(CHUNK, n - i * CHUNK)) for i in range((n + CHUNK - 1) // CHUNK)]
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_render_chunk, jobs)
    else:
        parts = [_render_chunk(j) for j in tqdm(jobs, desc="render")]
    pixels = torch.from_numpy(np.concatenate([p for p, _ in parts])).permute(0, 3, 1, 2).contiguous()
    return pixels, [c for _, caps in parts for c in caps]


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (n, 3, h, w) pixels to the autoencoder's [-1, 1] range."""
    return pixels.float() / 127.5 - 1.0


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
    return to_unit(torch.from_numpy(out).permute(0, 3, 1, 2))


class Budget:
    """Stops a stage at `steps` or when its share of the wall-clock budget is spent, whichever
    comes first; the steps actually run are reported, so `--steps` reproduces a run exactly."""

    def __init__(self, steps: int, seconds: float | None):
        self.steps, self.deadline = steps, None if seconds is None else time.time() + seconds
        self.done = 0

    def __iter__(self):
        bar = tqdm(total=self.steps)
        while self.done < self.steps and (self.deadline is None or time.time() < self.deadline):
            yield bar
            self.done += 1
            bar.update()
        bar.close()


def train_vae(vae, pixels: torch.Tensor, rng, gen, budget: Budget, batch: int, device) -> float:
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    for bar in budget:
        idx = torch.randint(len(pixels), (batch // 2,), generator=gen)
        x = torch.cat([to_unit(pixels[idx]), patterned(rng, batch - batch // 2)]).to(device)
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample()).sample
        kl = dist.kl().mean() / x[0].numel()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(vae_loss=f"{loss.item():.4f}", refresh=False)
    with torch.no_grad():
        z = vae.encode(to_unit(pixels[:1024]).to(device)).latent_dist.mean
    return float(1.0 / z.std())


@torch.no_grad()
def encode_dataset(vae, pixels: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent mean and std of every scene, scaled by the VAE's scaling factor (computed once: the
    VAE is frozen while the denoiser trains)."""
    sf = vae.config.scaling_factor
    means, stds = [], []
    for i in range(0, len(pixels), 4096):
        dist = vae.encode(to_unit(pixels[i : i + 4096]).to(device)).latent_dist
        means.append(dist.mean * sf)
        stds.append(dist.std * sf)
    return torch.cat(means), torch.cat(stds)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids of every caption; the world has few distinct captions, so each is tokenised once."""
    unique = sorted(set(captions))
    ids = tokenizer(unique, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
    row = {c: i for i, c in enumerate(unique)}
    return ids[torch.tensor([row[c] for c in captions])]


def train_denoiser(
    tokenizer, text_encoder, unet, scheduler, latents, ids, gen, budget: Budget, batch: int, lr: float, device
):
    """UNet and text encoder trained jointly on v-prediction (10% empty captions for classifier-free
    guidance), constant learning rate after warm-up, EMA of the weights. v-prediction matters here:
    with epsilon prediction the high-noise steps, where the background colour is decided, are
    nearly free of loss and the first model learned almost nothing about colour from text."""
    mean, std = latents
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    warmup = 200
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    ema = [copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)]
    empty = tokenize(tokenizer, [""])[0].to(device)
    for step, bar in enumerate(budget):
        idx = torch.randint(len(mean), (batch,), generator=gen).to(device)
        noise = torch.randn((batch, *mean.shape[1:]), generator=gen).to(device)
        x0 = mean[idx] + std[idx] * torch.randn((batch, *mean.shape[1:]), generator=gen).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen).to(device)
        drop = (torch.rand(batch, generator=gen) < 0.1).to(device)
        tokens = torch.where(drop[:, None], empty, ids[idx])
        noisy = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t)
        cond = text_encoder(tokens)[0]
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=cond).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, m in zip(ema, (unet, text_encoder)):
                torch._foreach_lerp_(list(e.parameters()), list(m.parameters()), 1 - decay)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return ema


def evaluate(folder: Path, n: int, seed: int, steps: int = 25, device: str = "cpu") -> dict:
    """Share of held-out captions whose samples have the right background and position, for the
    exact captions and for the fine-tuning phrasing with a placeholder ("a photo of sks circle ...")."""
    from diffusers import StableDiffusionPipeline

    from . import metrics

    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(seed)
    batch = [world.sample_scene(rng, split="heldout", second_prob=0.0) for _ in range(n)]
    report: dict = {"heldout_samples": n}
    phrasings = {
        "": world.caption,
        "placeholder_": lambda s: world.describe(f"{world.PLACEHOLDERS[0]} {s.shape}", s.position, s.background),
    }
    for prefix, text in phrasings.items():
        bg_ok = pos_ok = 0
        for i in tqdm(range(0, n, 16), desc=f"eval {prefix or 'exact'}"):
            chunk = batch[i : i + 16]
            out = pipe(
                [text(s) for s in chunk],
                num_inference_steps=steps,
                guidance_scale=5.0,
                generator=torch.Generator().manual_seed(seed + i),
                output_type="np",
            ).images
            for s, img in zip(chunk, (out * 255).round().astype(np.uint8)):
                bg_ok += metrics.background_colour(img) == s.background
                pos_ok += metrics.object_position(img, s.background) == s.position
        report.update({f"{prefix}background_correct": bg_ok / n, f"{prefix}position_correct": pos_ok / n})
    return report


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenes", type=int, default=300_000, help="size of the pre-rendered training set")
    ap.add_argument("--vae-steps", type=int, default=1095)
    ap.add_argument("--steps", type=int, default=3331, help="UNet + text encoder steps (at most)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="wall-clock budget for training (10%% VAE, 90%% denoiser); stages stop early when it "
        "is spent and pretrain.json records the steps run",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="processes that render the training set (the set does not depend on it)",
    )
    ap.add_argument("--eval-samples", type=int, default=200)
    return ap


def main(argv=None) -> None:
    """Pretrain the toy model: render the scenes, train the autoencoder, then the text encoder and
    UNet, and save the pipeline with its measured floor (`_save`)."""
    args = _parser().parse_args(argv)
    from diffusers import StableDiffusionPipeline

    tic = time.time()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    tokenizer, vae, text_encoder, unet, scheduler = build_components(args.seed)
    vae, text_encoder, unet = vae.to(args.device), text_encoder.to(args.device), unet.to(args.device)
    pixels, captions = render_dataset(args.seed, args.scenes, args.workers)
    budget = None if args.minutes is None else 60 * args.minutes - (time.time() - tic)
    vae_budget = Budget(args.vae_steps, None if budget is None else 0.1 * budget)
    vae.register_to_config(scaling_factor=train_vae(vae, pixels, rng, gen, vae_budget, 64, args.device))
    vae.requires_grad_(False).eval()
    latents = encode_dataset(vae, pixels, args.device)
    ids = tokenize(tokenizer, captions).to(args.device)
    budget = None if args.minutes is None else 60 * args.minutes - (time.time() - tic)
    unet_budget = Budget(args.steps, budget)
    ema_unet, ema_text = train_denoiser(
        tokenizer, text_encoder, unet, scheduler, latents, ids, gen, unet_budget, args.batch, args.lr, args.device
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=ema_text,
        tokenizer=tokenizer,
        unet=ema_unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    report = {
        "seed": args.seed,
        "scenes": args.scenes,
        "vae_steps": vae_budget.done,
        "steps": unet_budget.done,
        "batch": args.batch,
        "lr": args.lr,
        "train_seconds": round(time.time() - tic),
        "device": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"cpu, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
    _save(pipe, report, args)


def _save(pipe, report: dict, args: argparse.Namespace) -> None:
    """Write the pipeline in float16 beside `--out`, measure its floor into pretrain.json, then
    put it in place of the previous model."""
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    pipe.to("cpu", torch.float16).save_pretrained(tmp, safe_serialization=True)
    report.update(evaluate(tmp, args.eval_samples, args.seed + 1, device=args.device))
    (tmp / "pretrain.json").write_text(json.dumps(report, indent=2))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
