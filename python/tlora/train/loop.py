"""Single-image customization: `tlora.train.loop(...)` and the `tlora train` command.

One photo of a subject in, a T-LoRA adapter out. Runs unchanged under `accelerate launch` (DDP):
every process trains on its own timesteps, gradients are averaged, and only the main process
writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..adapter.inject import Adapter, inject
from ..config import DEFAULT_RANK_BOUNDARY, AdapterConfig, check_float, check_int
from ..errors import ConfigError, TrainingError, about
from ..files.io import save as save_adapter
from ..images import list_images, load_image, load_mask
from ..options import (
    LR_SCHEDULERS,
    MAX_BATCH,
    MAX_CLASS_IMAGES,
    MAX_LR,
    MAX_SAMPLE_STEPS,
    MAX_SEED,
    MAX_SHIFT,
    MAX_TRAIN_STEPS,
    MIXED_PRECISION,
    OPTIMIZERS,
    PAPER_STEPS,
    QUANTIZE,
    REPORT_TO,
    TIMESTEP_SAMPLINGS,
)
from ..pipelines import check_dtype, check_side, load_pipeline, resolve_device
from . import drift
from .checkpoint import (
    Checkpoint,
    RunState,
    checkpoints,
    load_checkpoint,
    optimizer_problem,
    save_checkpoint,
    write_json,
)
from .families import Family, family_of
from .optim import FactorEMA, apply_schedule, build_optimizer, build_scheduler, scheduler_state
from .prompts import CLASS_PROMPT, INSTANCE_PROMPT, check_template, fill, image_caption
from .run_folder import check_writable, checkpoint_to_resume, lock_out, prepare_out, truncate_log


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
    rank_schedule: str = "power"  # the shape of r(t): power (the paper's), cosine, step
    rank_boundary: float = DEFAULT_RANK_BOUNDARY  # the step shape's boundary, a fraction of T
    rank_scaling: str = "none"  # "rank": the update at rank r(t) scaled by r / r(t)
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
    device: str | None = None  # "auto" / None: CUDA when available, else the CPU
    overwrite: bool = False  # replace another run's files in `out`
    quantize: str | None = None  # "int8" | "int4" (optimum-quanto) | "nf4" (bitsandbytes): a quantized frozen base
    # The optimizer (tlora.train.optim) and its hyperparameters, by diffusers' DreamBooth names.
    optimizer: str = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    prodigy_beta3: float | None = None  # default: sqrt(beta2)
    prodigy_decouple: bool = True
    prodigy_use_bias_correction: bool = True
    prodigy_safeguard_warmup: bool = True
    max_grad_norm: float | None = None  # clip the factors' gradient norm (the paper's FLUX runs: 1.0)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    ema_decay: float | None = None  # an EMA of the factors: validation and adapter.safetensors use it
    train_batch_size: int = 1  # timesteps (and noises) per step: of the one image, or images of image_dir
    gradient_accumulation_steps: int = 1
    # Prompts (tlora.train.prompts): placeholders {token} and {class}.
    instance_prompt: str = INSTANCE_PROMPT
    class_prompt: str = CLASS_PROMPT  # the prior images' prompt
    caption_dropout: float = 0.0  # probability of training a sample on the empty prompt
    noise_offset: float = 0.0
    snr_gamma: float | None = None  # min-SNR weighting of the loss (DDPM families)
    report_to: str = "none"  # "tensorboard" | "wandb": accelerate's trackers, in out/logs
    validation_every: int | None = None  # steps between validation samples (default: checkpoint_every)
    checkpoints_total_limit: int | None = None  # keep only the newest checkpoints
    # The adapter (tlora.inject's settings).
    lora_alpha: float | None = None
    init: str = "last"
    init_from: str = "random"
    # The model: a hub revision, diffusers' weights variant ("fp16"), another VAE (folder or hub id).
    revision: str | None = None
    weights_variant: str | None = None
    pretrained_vae: str | None = None
    # Data: the images' mirror images trained on too; prior images made with the base model up to this count.
    random_flip: bool = False
    num_class_images: int = 0
    # How noise levels are drawn (None: the family's diffusers script default; see tlora.train.families).
    timestep_sampling: str | None = None  # uniform | logit_normal | mode | sigmoid
    shift: float | str | None = None  # flow matching's shift, a number or "auto" (by resolution)

    def __post_init__(self) -> None:
        """Each refusal is a ConfigError naming the field (`fields`: see tlora.errors)."""
        if self.steps is None:
            self.steps = PAPER_STEPS.get(self.variant, 800)
        with about("steps"):
            check_int("steps", self.steps, 1, MAX_TRAIN_STEPS)
        with about("checkpoint_every"):
            check_int("checkpoint_every", self.checkpoint_every, 1)
        with about("lr"):
            check_float("lr", self.lr, 0.0, MAX_LR, lo_inclusive=False)
        with about("seed"):
            check_int("seed", self.seed, 0, MAX_SEED)
        if self.resolution is not None:
            check_side("resolution", self.resolution)
        if self.validation_steps is not None:
            with about("validation_steps"):
                check_int("validation_steps", self.validation_steps, 1, MAX_SAMPLE_STEPS)
        with about("prior_weight"):
            check_float("prior_weight", self.prior_weight, 0.0)
        self._check_optimization()
        for name in ("instance_prompt", "class_prompt"):
            check_template(name, getattr(self, name))
        with about("caption_dropout"):
            check_float("caption_dropout", self.caption_dropout, 0.0, 1.0)
        if self.report_to not in REPORT_TO:
            raise ConfigError(
                f"report_to must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}", field="report_to"
            )
        for name in ("validation_every", "checkpoints_total_limit"):
            if getattr(self, name) is not None:
                with about(name):
                    check_int(name, getattr(self, name), 1)
        with about("num_class_images"):
            check_int("num_class_images", self.num_class_images, 0, MAX_CLASS_IMAGES)
        if self.num_class_images and not self.prior_dir:
            raise ConfigError(
                "num_class_images makes prior images into prior_dir: give prior_dir",
                field=("num_class_images", "prior_dir"),
            )
        if self.random_flip and self.mask:
            raise ConfigError(
                "random_flip with a mask is not supported: give one of them", field=("random_flip", "mask")
            )
        with about("noise_offset"):
            check_float("noise_offset", self.noise_offset, 0.0, 10.0)
        if self.snr_gamma is not None:
            with about("snr_gamma"):
                check_float("snr_gamma", self.snr_gamma, 0.0, 1000.0, lo_inclusive=False)
        if (self.image is None) == (self.image_dir is None):
            raise ConfigError(
                "give exactly one of image (one photo, the paper's setting) or image_dir", field=("image", "image_dir")
            )
        for name, choices in (("mixed_precision", MIXED_PRECISION), ("quantize", (None, *QUANTIZE))):
            if getattr(self, name) not in choices:
                raise ConfigError(
                    f"{name} must be one of {', '.join(c for c in choices if c)}, got {getattr(self, name)!r}",
                    field=name,
                )
        if self.timestep_sampling is not None and self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ConfigError(
                f"timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLINGS)}, got {self.timestep_sampling!r}",
                field="timestep_sampling",
            )
        if self.shift is not None and self.shift != "auto":
            with about("shift"):
                check_float("shift", self.shift, 0.0, MAX_SHIFT, lo_inclusive=False)
        for p in self.validation_prompts:
            if "{}" not in p:
                raise ConfigError(
                    f"validation prompt {p!r} has no {{}} where '{self.token} {self.class_name}' goes",
                    field="validation_prompts",
                )
        if not self.token.strip() or not self.class_name.strip():
            raise ConfigError("token and class_name must not be empty", field=("token", "class_name"))
        if self.resume and self.overwrite:
            raise ConfigError(
                "resume continues the run in out and overwrite replaces it: give one of them",
                field=("resume", "overwrite", "out"),
            )
        # The adapter's own settings, validated as inject validates them.
        self.adapter_config()

    def _check_optimization(self) -> None:
        """The optimizer's, schedule's, EMA's and batch's settings (ConfigError naming the field)."""
        for name, choices in (("optimizer", OPTIMIZERS), ("lr_scheduler", LR_SCHEDULERS)):
            if getattr(self, name) not in choices:
                raise ConfigError(
                    f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}", field=name
                )
        for name in ("adam_beta1", "adam_beta2", "prodigy_beta3"):
            value = getattr(self, name)
            if value is not None:
                with about(name):
                    check_float(name, value, 0.0, 1.0)
                    if value == 1.0:
                        raise ConfigError(f"{name} must be < 1, got {value!r}")
        with about("adam_weight_decay"):
            check_float("adam_weight_decay", self.adam_weight_decay, 0.0, 1.0)
        with about("adam_epsilon"):
            check_float("adam_epsilon", self.adam_epsilon, 0.0, 1.0, lo_inclusive=False)
        for name in ("prodigy_decouple", "prodigy_use_bias_correction", "prodigy_safeguard_warmup"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}", field=name)
        if self.max_grad_norm is not None:
            with about("max_grad_norm"):
                check_float("max_grad_norm", self.max_grad_norm, 0.0, lo_inclusive=False)
        with about("lr_warmup_steps"):
            check_int("lr_warmup_steps", self.lr_warmup_steps, 0, MAX_TRAIN_STEPS)
        with about("lr_num_cycles"):
            check_int("lr_num_cycles", self.lr_num_cycles, 1, MAX_TRAIN_STEPS)
        with about("lr_power"):
            check_float("lr_power", self.lr_power, 0.0, 100.0, lo_inclusive=False)
        if self.ema_decay is not None:
            with about("ema_decay"):
                check_float("ema_decay", self.ema_decay, 0.0, 1.0, lo_inclusive=False)
                if self.ema_decay == 1.0:
                    raise ConfigError(f"ema_decay must be < 1 (1 never moves the average), got {self.ema_decay!r}")
        for name in ("train_batch_size", "gradient_accumulation_steps"):
            with about(name):
                check_int(name, getattr(self, name), 1, MAX_BATCH)

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(
            rank=self.rank,
            min_rank=self.min_rank,
            rank_exponent=self.rank_exponent,
            rank_schedule=self.rank_schedule,
            rank_boundary=self.rank_boundary,
            rank_scaling=self.rank_scaling,
            variant=self.variant,
            target_modules=self.target_modules,
            lora_alpha=self.lora_alpha,
            init=self.init,
            init_from=self.init_from,
        )

    @property
    def prompt(self) -> str:
        return fill(self.instance_prompt, self.token, self.class_name)

    @property
    def prior_prompt(self) -> str:
        return fill(self.class_prompt, self.token, self.class_name)


def _check_finite_state(adapter: Adapter, optimizer, step: int, good: Path | None) -> None:
    """Refuse to checkpoint non-finite factors or optimizer state: a checkpoint that is written is a good one."""
    for name, p in adapter.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise TrainingError(
                f"the adapter's factor {name} became non-finite at step {step}: training diverged "
                f"(lr too high?). {_last_good(good)}"
            )
    problem = optimizer_problem(optimizer)
    if problem:
        raise TrainingError(f"the optimizer's {problem} at step {step}: training diverged. {_last_good(good)}")


def _last_good(good: Path | None) -> str:
    """`good`: the newest checkpoint this run validated (the one it resumed from, or one it wrote)."""
    if good is None:
        return "No checkpoint was written; start again with a lower --lr (and --overwrite)."
    return f"The last good checkpoint is {good}: continue from it with --resume and a lower --lr."


@dataclass
class TrainResult:
    adapter_path: Path  # the final adapter.safetensors (written by the main process)
    adapter: Adapter  # the trained adapter, still injected into pipe's denoiser
    pipe: object  # the loaded pipeline, ready to sample with the adapter


def train(config: TrainConfig | None = None, **kwargs) -> TrainResult:
    """Train an adapter. Takes a TrainConfig or its fields as keyword arguments (the same options
    as `tlora train`)."""
    from accelerate import Accelerator

    cfg = config or TrainConfig(**kwargs)
    _check_tracker(cfg.report_to)
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    weight_dtype = check_dtype(cfg.mixed_precision, device, "mixed_precision")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device.index)
    # accelerate keeps one mixed-precision setting per process: forget the previous run's (the
    # distributed state itself is kept), so that train() can run again with other settings.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    acc = Accelerator(
        mixed_precision=cfg.mixed_precision,
        cpu=device.type == "cpu",
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=str(out / "logs"),
    )
    lock = None
    if acc.is_main_process:
        check_writable(out)
        lock = lock_out(out)
    try:
        if acc.is_main_process:
            prepare_out(out, cfg)
        # Validated before the model loads: a checkpoint that cannot be resumed fails at once.
        resume_from = checkpoint_to_resume(out, cfg) if cfg.resume else None
        return _train(cfg, acc, out, weight_dtype, resume_from)
    finally:
        if lock is not None:
            os.close(lock)


def _check_tracker(report_to: str) -> None:
    """The tracker's package is installed (wandb is never installed for you: it needs an account)."""
    import importlib.util

    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"report_to {report_to} needs the {package} package: pip install {package}", field="report_to"
        )


def _train(cfg: TrainConfig, acc, out: Path, weight_dtype: torch.dtype, resume_from: Checkpoint | None) -> TrainResult:
    run = _Run(cfg, acc, out, weight_dtype)
    c = run.adapter.config
    # The settings as resolved (device, dtype, the family's native resolution, the paper's steps):
    # what the run does, not only what was typed.
    acc.print(
        f"training {c.variant} rank {c.rank} (r_min {c.min_rank}) for {cfg.steps} steps on {run.fam.name} "
        f"at {run.resolution}x{run.resolution}, timesteps {run.fam.sampling_description()}; device {acc.device}, "
        f"weights {str(weight_dtype).removeprefix('torch.')}"
        f" (mixed precision {cfg.mixed_precision}), lr {cfg.lr:g}, seed {cfg.seed}; {cfg.optimizer}, lr schedule "
        f"{cfg.lr_scheduler}, batch {cfg.train_batch_size} x {cfg.gradient_accumulation_steps} accumulated"
        + (f", EMA {cfg.ema_decay:g}" if cfg.ema_decay is not None else "")
    )
    start = run.resume(resume_from)
    bar = tqdm(
        range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", disable=not acc.is_local_main_process
    )
    every = cfg.validation_every or cfg.checkpoint_every
    for step in bar:
        bar.set_postfix(loss=f"{run.step(step):.4f}")
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            run.checkpoint(done)
        if done % every == 0 or done == cfg.steps:
            run.validate(done)
    return run.finish()


class _Run:
    """One training run, in the order `_train` calls it: built (`_prepare`: the pipeline, the
    images and prompts encoded once; `_build`: the adapter, its optimizer and the seeded
    generator), `resume`, then `step` and `checkpoint`, and `finish` (the adapter file)."""

    def __init__(self, cfg: TrainConfig, acc, out: Path, weight_dtype: torch.dtype):
        self.cfg, self.acc, self.out, self.weight_dtype = cfg, acc, out, weight_dtype
        self.loss_log = out / "loss.jsonl"
        self.good: Path | None = None  # the newest checkpoint known to be valid (for a divergence's message)
        self._prepare()
        self._build()

    def _prepare(self) -> None:
        cfg, acc = self.cfg, self.acc
        self.pipe = load_pipeline(
            cfg.model,
            dtype=self.weight_dtype,
            quantize=cfg.quantize,
            revision=cfg.revision,
            variant=cfg.weights_variant,
            vae=cfg.pretrained_vae,
        ).to(acc.device)
        fam: Family = family_of(self.pipe)
        with about("timestep_sampling", "shift"):
            fam.configure_sampling(cfg.timestep_sampling, cfg.shift)
        self.fam = fam
        self.resolution = resolution = cfg.resolution if cfg.resolution is not None else fam.default_resolution()
        paths = [Path(cfg.image)] if cfg.image else list_images(cfg.image_dir)
        pixels = torch.cat([load_image(p, resolution) for p in paths])
        self.view: drift.OverfittingView | None = None  # drift toward these images, with validation prompts
        self.training_images = [_as_image(p) for p in pixels]
        if cfg.random_flip:  # each image or its mirror image, with equal chance
            pixels = torch.cat([pixels, pixels.flip(-1)])
            paths = paths + paths

        # The images and the prompts never change: encode them once (the empty prompt too, for caption dropout).
        self.lat_mean, self.lat_std = fam.encode_image(pixels)
        self.image_prompts = [image_caption(p, cfg) if cfg.image_dir else cfg.prompt for p in paths]
        prompts = set(self.image_prompts) | ({""} if cfg.caption_dropout else set())
        self.mask = None
        if cfg.mask:
            self.mask = load_mask(cfg.mask, self.lat_mean.shape[-1], images=paths).to(acc.device)
        self.prior = None
        if cfg.num_class_images:
            self._make_class_images()
        if cfg.prior_dir:
            prior_pixels = torch.cat([load_image(p, resolution) for p in list_images(cfg.prior_dir)])
            self.prior = (*fam.encode_image(prior_pixels), [cfg.prior_prompt])
            prompts.add(cfg.prior_prompt)
        self.conds = {p: fam.encode_prompt(p, resolution) for p in sorted(prompts)}
        self.cond = self.conds[self.image_prompts[0]]
        self.snr_weights = None
        if cfg.snr_gamma is not None:
            self.snr_weights = min_snr_weights(fam, cfg.snr_gamma)

    def _make_class_images(self) -> None:
        """Sample the prior images prior_dir lacks (up to num_class_images) with the base model, before
        the adapter is injected, as DreamBooth's prior preservation does; the main process writes them."""
        cfg, fam = self.cfg, self.fam
        folder = Path(cfg.prior_dir)
        have = len(list_images(folder)) if folder.is_dir() and any(folder.iterdir()) else 0
        missing = cfg.num_class_images - have
        if missing > 0 and self.acc.is_main_process:
            from ..files.atomic import save_image
            from ..generate import sample_images

            folder.mkdir(parents=True, exist_ok=True)
            self.acc.print(f"sampling {missing} class images into {folder} ({cfg.prior_prompt!r})")
            size = (self.resolution, self.resolution)
            images = sample_images(
                self.pipe, [cfg.prior_prompt], missing, fam.default_steps, fam.default_guidance, cfg.seed, size
            )[0]
            for i, img in enumerate(images):
                save_image(img, folder / f"class-{have + i:05d}.png")
        self.acc.wait_for_everyone()

    def _build(self) -> None:
        cfg, fam = self.cfg, self.fam
        model = fam.denoiser
        if cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.adapter = inject(
            model,
            rank=cfg.rank,
            min_rank=cfg.min_rank,
            rank_exponent=cfg.rank_exponent,
            rank_schedule=cfg.rank_schedule,
            rank_boundary=cfg.rank_boundary,
            rank_scaling=cfg.rank_scaling,
            variant=cfg.variant,
            target_modules=cfg.target_modules if cfg.target_modules is not None else fam.default_targets,
            lora_alpha=cfg.lora_alpha,
            init=cfg.init,
            init_from=cfg.init_from,
            num_train_timesteps=fam.num_train_timesteps,
            seed=cfg.seed,
        )
        self.adapter.config.extra.update(token=cfg.token, class_name=cfg.class_name, prompt=cfg.prompt, family=fam.name)
        # Paper settings (the defaults): AdamW, betas (0.9, 0.999), weight decay 1e-4, constant lr, batch 1.
        params = list(self.adapter.parameters())
        optimizer = build_optimizer(cfg, params, self.acc.device)
        self.ddp_model, self.optimizer = self.acc.prepare(model, optimizer)
        # Stepped here once per optimizer step (not prepared: accelerate would step it once per process).
        self.scheduler = build_scheduler(cfg, self.optimizer.optimizer)
        self.ema = FactorEMA(params, cfg.ema_decay) if cfg.ema_decay is not None else None
        # Each process draws its own timesteps and noise from a seeded CPU generator whose state is
        # checkpointed, so a resumed run continues the exact same sequence.
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + self.acc.process_index)

    def resume(self, resume_from: Checkpoint | None) -> int:
        """Restore `resume_from` (validated by `checkpoint_to_resume`, or None: a new run) and
        write the run's config.json and its loss log up to that step; returns the step to start from."""
        cfg, acc = self.cfg, self.acc
        start = 0
        if resume_from is not None:
            start = load_checkpoint(
                resume_from,
                self.adapter,
                self.optimizer,
                self.gen,
                acc.process_index,
                scheduler=self.scheduler,
                ema=self.ema,
                optimizer_name=cfg.optimizer,
            )
            self.good = resume_from.path
            acc.print(f"resuming from {self.good} (step {start})")
            if resume_from.scheduler is None:  # a checkpoint from before schedules: constant lr so far
                self.scheduler.last_epoch = start
            old_lr = self.scheduler.base_lrs[0] if resume_from.scheduler else self.optimizer.param_groups[0]["lr"]
            self.scheduler.base_lrs = [cfg.lr] * len(self.optimizer.param_groups)
            apply_schedule(self.scheduler)
            if old_lr != cfg.lr:
                acc.print(
                    f"--lr {cfg.lr:g} differs from the checkpoint's {old_lr:g}: the optimizer continues with {cfg.lr:g}"
                )
        elif cfg.resume:
            acc.print(f"no checkpoint in {self.out}: starting from step 0")
        if acc.is_main_process:
            config = {"train": asdict(cfg), "adapter": self.adapter.config.to_dict(), "resolution": self.resolution}
            write_json(self.out / "config.json", config)
            truncate_log(self.loss_log, start)
            if cfg.validation_prompts:
                self.view = self._overfitting_view(start)
        if cfg.report_to != "none":
            # Scalars only (what every tracker's hyperparameter view takes); steps continue from `start`.
            hparams = {k: v for k, v in asdict(cfg).items() if isinstance(v, (int, float, str, bool))}
            acc.init_trackers("tlora", config=hparams)
        return start

    def _overfitting_view(self, start: int) -> drift.OverfittingView | None:
        """The drift of validation samples toward the training images (tlora.train.drift): a new run
        first samples the validation prompts with the adapter at its init, an exact zero update, so
        the base model's samples; a resumed run reads them back."""
        cfg = self.cfg
        base = self.out / drift.BASE_SAMPLES
        if start == 0:
            self._validation_grid(base, "base model (step 0)")
        elif not drift.has_samples(base, len(cfg.validation_prompts)):
            self.acc.print(f"no base samples in {base}: the drift toward the training image is not tracked")
            return None
        drift.truncate(self.out / drift.DRIFT_LOG, start)
        view = drift.OverfittingView(
            self.out, self.training_images, len(cfg.validation_prompts), f"{cfg.variant} rank {cfg.rank}"
        )
        if start == 0:
            view.record(0, base)
        return view

    def draw(self, mean, std, prompts: Sequence[str], dropout: float = 0.0):
        """One batch of `train_batch_size` samples from images of latent distributions `mean`/`std`
        with their `prompts`: per sample, an image, its noise, its latents and its own timestep (each
        sample gets the rank r(t) of its own t: T-LoRA's masks are per sample), and the prompt's
        conditioning, the empty prompt's with probability `dropout`. Returns (latents, noise, t, cond)."""
        acc, fam, gen, n = self.acc, self.fam, self.gen, self.cfg.train_batch_size
        idx = torch.randint(0, mean.shape[0], (n,), generator=gen)
        eps = torch.randn(mean[idx].shape, generator=gen)
        latents = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen).to(mean.device)
        t = fam.sample_timesteps(gen, n, self.resolution).to(acc.device)
        chosen = [prompts[i] for i in idx.tolist()]
        if dropout:
            dropped = (torch.rand(n, generator=gen) < dropout).tolist()
            chosen = ["" if d else p for p, d in zip(chosen, dropped)]
        if self.cfg.noise_offset:
            eps = eps + self.cfg.noise_offset * torch.randn((*eps.shape[:2], 1, 1), generator=gen)
        return latents, eps, t, _batched([self.conds[p] for p in chosen])

    def objective(self, latents, eps, t, cond, weight_mask=None) -> torch.Tensor:
        """The denoising loss of a drawn batch (`draw`); `weight_mask`: only the subject's latents
        count; with snr_gamma, each sample weighted by min-SNR."""
        acc, fam, dtype = self.acc, self.fam, self.weight_dtype
        noised = fam.noise(latents.to(dtype), eps.to(acc.device, dtype), t)
        with acc.autocast():
            pred = fam.predict(self.ddp_model, noised, cond)
        err = F.mse_loss(pred.float(), noised.target.float(), reduction="none")
        w = None if weight_mask is None else fam.layout(weight_mask.expand_as(latents).float())
        if self.snr_weights is None:
            return err.mean() if w is None else (err * w).sum() / w.sum()
        dims = tuple(range(1, err.dim()))
        per_sample = err.mean(dims) if w is None else (err * w).sum(dims) / w.sum(dims)
        return (per_sample * self.snr_weights[t.long()].to(per_sample.device)).mean()

    def _loss(self, mean, std, prompts, weight_mask=None, dropout: float = 0.0) -> torch.Tensor:
        return self.objective(*self.draw(mean, std, prompts, dropout), weight_mask)

    def step(self, step: int) -> float:
        """Optimizer step `step + 1` (gradient_accumulation_steps batches), logged to loss.jsonl;
        returns the loss (every process's mean). A non-finite loss stops training (TrainingError)."""
        cfg, acc = self.cfg, self.acc
        tic = time.perf_counter()
        values = []
        for _ in range(cfg.gradient_accumulation_steps):
            with acc.accumulate(self.ddp_model):
                loss = self._loss(self.lat_mean, self.lat_std, self.image_prompts, self.mask, cfg.caption_dropout)
                if self.prior is not None:
                    loss = loss + cfg.prior_weight * self._loss(*self.prior)
                value = acc.reduce(loss.detach(), reduction="mean").item()
                if not math.isfinite(value):  # every process sees the same reduced value and stops
                    raise TrainingError(
                        f"the loss is {value} at step {step + 1} (lr {cfg.lr:g}): training diverged. "
                        f"{_last_good(self.good)}"
                    )
                values.append(value)
                acc.backward(loss)
                grad_norm = None
                if acc.sync_gradients:
                    # The norm before clipping (clipping at infinity scales by exactly 1).
                    limit = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
                    grad_norm = float(acc.clip_grad_norm_(self.adapter.parameters(), limit))
                lr = self.optimizer.param_groups[0]["lr"]
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.step()
        value = sum(values) / len(values)
        if acc.is_main_process:
            entry = {"step": step + 1, "loss": value, "seconds": round(time.perf_counter() - tic, 4), "lr": lr}
            if grad_norm is not None and math.isfinite(grad_norm):
                entry["grad_norm"] = grad_norm
            if "d" in self.optimizer.param_groups[0]:  # Prodigy's step size estimate: it steps by d * lr
                entry["prodigy_d"] = float(self.optimizer.param_groups[0]["d"])
            with open(self.loss_log, "a") as f:
                f.write(json.dumps(entry) + "\n")
            self.report({k: v for k, v in entry.items() if k != "step"}, step + 1)
        return value

    def checkpoint(self, done: int) -> None:
        """checkpoint-`done` (only finite state is checkpointed): the raw factors, the optimizer,
        schedule, EMA and RNG state; `checkpoints_total_limit` keeps the newest ones."""
        acc = self.acc
        # Every process draws its own timesteps: keep all their RNG states, not just the main one's.
        gen_states = (
            list(acc.gather(self.gen.get_state()[None].to(acc.device)).cpu()) if acc.num_processes > 1 else None
        )
        acc.wait_for_everyone()
        _check_finite_state(self.adapter, self.optimizer, done, self.good)
        if acc.is_main_process:
            extra = self.adapter.config.extra
            save_checkpoint(
                self.out, done, self.adapter, self.optimizer, self.gen, extra, gen_states, self._run_state()
            )
            self._prune_checkpoints()
        self.good = self.out / f"checkpoint-{done}"

    def _run_state(self) -> RunState:
        ema = None
        if self.ema is not None:
            ema = (self.ema.shadow, self.ema.optimization_step)
        return RunState(optimizer=self.cfg.optimizer, scheduler=scheduler_state(self.scheduler), ema=ema)

    def _prune_checkpoints(self) -> None:
        limit = self.cfg.checkpoints_total_limit
        if limit is None:
            return
        for old in checkpoints(self.out)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def validate(self, done: int) -> Path | None:
        """Validation samples at step `done` (the EMA factors when there is an EMA), into
        checkpoint-`done`/samples when that step was checkpointed, else samples/step-`done`; the
        grid is reported to the trackers. Every per-validation measurement belongs here."""
        cfg = self.cfg
        if not cfg.validation_prompts or not self.acc.is_main_process:
            return None
        ckpt = self.out / f"checkpoint-{done}"
        where = ckpt / "samples" if ckpt.is_dir() else self.out / "samples" / f"step-{done}"
        with self.ema.swapped() if self.ema is not None else contextlib.nullcontext():
            label = f"{cfg.variant} rank {cfg.rank}{' EMA' if self.ema is not None else ''}\nstep {done}"
            grid = self._validation_grid(where, label)
        self.report_image("validation", grid, done)
        if self.view is not None:
            self.report({"drift": self.view.record(done, where)}, done)
        return grid

    def _validation_grid(self, folder: Path, label: str) -> Path:
        """The validation prompts, one sample each (seeded as every validation is), into `folder`."""
        from ..generate import sample_grid

        cfg = self.cfg
        return sample_grid(
            self.pipe,
            cfg.validation_prompts,
            f"{cfg.token} {cfg.class_name}",
            folder,
            steps=cfg.validation_steps or self.fam.default_steps,
            guidance=self.fam.default_guidance,
            seed=cfg.seed,
            size=(self.resolution, self.resolution),
            label=label,
            family=self.fam,
        )

    def report(self, values: dict, step: int) -> None:
        if self.cfg.report_to != "none":
            self.acc.log(values, step=step)

    def report_image(self, name: str, path: Path, step: int) -> None:
        if self.cfg.report_to == "none":
            return
        import numpy as np
        from PIL import Image

        image = np.asarray(Image.open(path).convert("RGB"))
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({name: image[None]}, step=step, dataformats="NHWC")
            else:
                tracker.log_images({name: [image]}, step=step)

    def finish(self) -> TrainResult:
        """The final adapter.safetensors (the EMA factors when there is an EMA), written by the
        main process once every process is done."""
        self.acc.wait_for_everyone()
        final = self.out / "adapter.safetensors"
        if self.acc.is_main_process:
            with self.ema.swapped() if self.ema is not None else contextlib.nullcontext():
                save_adapter(self.adapter, final)
        self.acc.end_training()
        if self.ema is not None:  # the returned adapter is the saved one
            self.ema.ema.copy_to(self.ema.params)
        return TrainResult(final, self.adapter, self.pipe)


def _as_image(pixels: torch.Tensor):
    """A (3, R, R) tensor in [-1, 1] (a training image as trained) as an RGB PIL image."""
    from PIL import Image

    a = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a)


def _batched(conds: list[dict]) -> dict:
    """The conditioning of a batch from each sample's (batch 1): tensors joined along the batch;
    those that are not per sample (FLUX's txt_ids, (seq, 3)) kept once."""
    if len(conds) == 1:
        return conds[0]
    out = {}
    for key, first in conds[0].items():
        if isinstance(first, dict):
            out[key] = _batched([c[key] for c in conds])
        elif isinstance(first, torch.Tensor) and first.dim() >= 1 and first.shape[0] == 1 and key != "txt_ids":
            out[key] = torch.cat([c[key] for c in conds])
        else:
            out[key] = first
    return out


def min_snr_weights(fam: Family, gamma: float) -> torch.Tensor:
    """Per timestep, min-SNR-gamma's loss weight (Hang et al. 2023): min(SNR, gamma) / SNR for an
    epsilon target, / (SNR + 1) for a v target, SNR from diffusers' compute_snr on the training
    schedule. Families noised otherwise (rectified flow) are refused."""
    if type(fam).noise is not Family.noise:
        raise ConfigError(
            f"snr_gamma weights DDPM-noised losses; {fam.name} trains a flow-matching objective", field="snr_gamma"
        )
    from diffusers.training_utils import compute_snr

    sched = fam._ddpm()
    snr = compute_snr(sched, torch.arange(fam.num_train_timesteps))
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1 if sched.config.prediction_type == "v_prediction" else snr)
