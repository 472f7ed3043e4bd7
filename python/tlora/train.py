"""Single-image customization: `tlora.train(...)` and the `tlora train` command.

One photo of a subject in, a T-LoRA adapter out. Runs unchanged under `accelerate launch` (DDP):
every process trains on its own timesteps, gradients are averaged, and only the main process
writes files.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .adapter import Adapter, inject
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, write_json
from .images import list_images, load_image, load_mask
from .io import save as save_adapter
from .pipelines import family_of, load_pipeline

PAPER_STEPS = {"tlora": 800, "vanilla": 500, "lora": 500}


@dataclass
class TrainConfig:
    model: str
    image: str | None
    token: str
    class_name: str
    out: str
    variant: str = "tlora"
    rank: int = 64
    min_rank: int | None = None
    rank_exponent: float = 1.0
    steps: int | None = None  # paper: 800 for tlora, 500 for vanilla and lora
    lr: float = 1e-4
    resolution: int | None = None  # default: the model's native resolution
    mixed_precision: str = "no"
    seed: int = 0
    checkpoint_every: int = 100
    resume: bool = False
    validation_prompts: Sequence[str] = field(default_factory=list)
    validation_steps: int | None = None  # denoising steps for validation samples
    image_dir: str | None = None
    mask: str | None = None
    prior_dir: str | None = None
    prior_weight: float = 1.0
    gradient_checkpointing: bool = False
    target_modules: Sequence[str] | None = None
    quantize: str | None = None  # "int8" | "int4" (optimum-quanto) | "nf4" (bitsandbytes): a quantized frozen base

    def __post_init__(self) -> None:
        if self.steps is None:
            self.steps = PAPER_STEPS.get(self.variant, 800)
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.checkpoint_every < 1:
            raise ValueError(f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        if (self.image is None) == (self.image_dir is None):
            raise ValueError("give exactly one of --image (one photo, the paper's setting) or --image-dir")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"--mixed-precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.quantize not in (None, "int8", "int4", "nf4"):
            raise ValueError(f"--quantize must be int8, int4 or nf4, got {self.quantize!r}")
        for p in self.validation_prompts:
            if "{}" not in p:
                raise ValueError(f"validation prompt {p!r} has no {{}} where '{self.token} {self.class_name}' goes")
        if not self.token.strip() or not self.class_name.strip():
            raise ValueError("--token and --class-name must not be empty")

    @property
    def prompt(self) -> str:
        return f"a photo of {self.token} {self.class_name}"


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".tlora-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"output folder {out} is not writable ({e.strerror}): choose another --out") from None


@dataclass
class TrainResult:
    adapter_path: Path  # the final adapter.safetensors (written by the main process)
    adapter: "Adapter"  # the trained adapter, still injected into pipe's denoiser
    pipe: object  # the loaded pipeline, ready to sample with the adapter


def train(config: TrainConfig | None = None, **kwargs) -> TrainResult:
    """Train an adapter. Takes a TrainConfig or its fields as keyword arguments (the same options
    as `tlora train`)."""
    from accelerate import Accelerator

    cfg = config or TrainConfig(**kwargs)
    out = Path(cfg.out)
    acc = Accelerator(mixed_precision=cfg.mixed_precision)
    if acc.is_main_process:
        _check_writable(out)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]

    pipe = load_pipeline(cfg.model, dtype=weight_dtype, quantize=cfg.quantize).to(acc.device)
    fam = family_of(pipe)
    resolution = cfg.resolution or fam.default_resolution()
    paths = [Path(cfg.image)] if cfg.image else list_images(cfg.image_dir)
    pixels = torch.cat([load_image(p, resolution) for p in paths])

    # The images and the prompt never change: encode them once.
    lat_mean, lat_std = fam.encode_image(pixels)
    cond = fam.encode_prompt(cfg.prompt, resolution)
    mask = None
    if cfg.mask:
        mask = load_mask(cfg.mask, lat_mean.shape[-1]).to(acc.device)
    prior = None
    if cfg.prior_dir:
        prior_pixels = torch.cat([load_image(p, resolution) for p in list_images(cfg.prior_dir)])
        prior = (*fam.encode_image(prior_pixels), fam.encode_prompt(f"a photo of {cfg.class_name}", resolution))

    model = fam.denoiser
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    adapter = inject(model, rank=cfg.rank, min_rank=cfg.min_rank, rank_exponent=cfg.rank_exponent,
                     variant=cfg.variant, target_modules=cfg.target_modules,
                     num_train_timesteps=fam.num_train_timesteps, seed=cfg.seed)
    adapter.config.extra.update(token=cfg.token, class_name=cfg.class_name, prompt=cfg.prompt, family=fam.name)
    # Paper settings: AdamW, betas (0.9, 0.999), weight decay 1e-4, constant lr, batch 1.
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=1e-4)
    ddp_model, optimizer = acc.prepare(model, optimizer)

    # Each process draws its own timesteps and noise from a seeded CPU generator whose state is
    # checkpointed, so a resumed run continues the exact same sequence.
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + acc.process_index)
    start = 0
    if cfg.resume and (ckpt := latest_checkpoint(out)) is not None:
        start = load_checkpoint(ckpt, adapter, optimizer, gen, acc.process_index)
        acc.print(f"resuming from {ckpt} (step {start})")
    loss_log = out / "loss.jsonl"
    if acc.is_main_process:
        write_json(out / "config.json", {"train": asdict(cfg), "adapter": adapter.config.to_dict(), "resolution": resolution})
        _truncate_log(loss_log, start)

    T = fam.num_train_timesteps

    def loss_on(mean, std, c, weight_mask=None):
        idx = torch.randint(0, mean.shape[0], (1,), generator=gen)
        eps = torch.randn(mean[idx].shape, generator=gen)
        latents = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen).to(mean.device)
        t = torch.randint(0, T, (1,), generator=gen).to(acc.device)
        noised = fam.noise(latents.to(weight_dtype), eps.to(acc.device, weight_dtype), t)
        with acc.autocast():
            pred = fam.predict(ddp_model, noised, c)
        err = F.mse_loss(pred.float(), noised.target.float(), reduction="none")
        if weight_mask is None:
            return err.mean()
        w = fam.layout(weight_mask.expand_as(latents).float())
        return (err * w).sum() / w.sum()

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", disable=not acc.is_local_main_process)
    for step in bar:
        tic = time.perf_counter()
        loss = loss_on(lat_mean, lat_std, cond, mask)
        if prior is not None:
            loss = loss + cfg.prior_weight * loss_on(*prior)
        acc.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = acc.reduce(loss.detach(), reduction="mean").item()
        bar.set_postfix(loss=f"{value:.4f}")
        done = step + 1
        if acc.is_main_process:
            with open(loss_log, "a") as f:
                f.write(json.dumps({"step": done, "loss": value, "seconds": round(time.perf_counter() - tic, 4)}) + "\n")
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            # Every process draws its own timesteps: keep all their RNG states, not just the main one's.
            gen_states = list(acc.gather(gen.get_state()[None].to(acc.device)).cpu()) if acc.num_processes > 1 else None
            acc.wait_for_everyone()
            if acc.is_main_process:
                ckpt = save_checkpoint(out, done, adapter, optimizer, gen, adapter.config.extra, gen_states)
                if cfg.validation_prompts:
                    from .generate import sample_grid

                    sample_grid(pipe, cfg.validation_prompts, f"{cfg.token} {cfg.class_name}", ckpt / "samples",
                                steps=cfg.validation_steps or fam.default_steps, guidance=fam.default_guidance,
                                seed=cfg.seed, size=(resolution, resolution),
                                label=f"{cfg.variant} rank {cfg.rank}\nstep {done}")
    acc.wait_for_everyone()
    final = out / "adapter.safetensors"
    if acc.is_main_process:
        save_adapter(adapter, final)
    acc.end_training()
    return TrainResult(final, adapter, pipe)


def _truncate_log(path: Path, step: int) -> None:
    """Keep only the loss entries up to `step` (a resumed run rewrites what came after)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)
