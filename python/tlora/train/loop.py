"""Single-image customization: `tlora.train.loop(...)` and the `tlora train` command.

One photo of a subject in, a T-LoRA adapter out. Runs unchanged under `accelerate launch` (DDP):
every process trains on its own timesteps, gradients are averaged, and only the main process
writes files.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..adapter.inject import Adapter, inject
from ..config import AdapterConfig, check_float, check_int
from ..errors import CheckpointError, ConfigError, TloraError, TrainingError, about
from ..files.atomic import write_atomic
from ..files.io import save as save_adapter
from ..images import check_input_file, list_images, load_image, load_mask
from ..options import (
    MAX_LR,
    MAX_SAMPLE_STEPS,
    MAX_SEED,
    MAX_SHIFT,
    MAX_SIDE,
    MAX_TRAIN_STEPS,
    MIXED_PRECISION,
    PAPER_STEPS,
    QUANTIZE,
    SIDE_STRIDE,
    TIMESTEP_SAMPLINGS,
)
from ..pipelines import check_dtype, check_side, load_pipeline, resolve_device
from .checkpoint import _NAME as CHECKPOINT_NAME
from .checkpoint import (
    Checkpoint,
    checkpoints,
    load_checkpoint,
    optimizer_problem,
    read_checkpoint,
    save_checkpoint,
    write_json,
)
from .families import Family, family_of

# Files of a run in --out: another run's are refused unless --resume or --overwrite.
RUN_FILES = ("config.json", "loss.jsonl", "adapter.safetensors")
# Settings a resumed run must share with the run it continues (the lr may change: it is applied).
# target_modules as typed: None is the family's default list (tlora.train.families).
RESUME_FIXED_TRAIN = ("model", "token", "class_name", "resolution", "seed", "target_modules")
RESUME_FIXED_ADAPTER = ("variant", "rank", "min_rank", "rank_exponent")


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
    device: str | None = None  # "auto" / None: CUDA when available, else the CPU
    overwrite: bool = False  # replace another run's files in `out`
    quantize: str | None = None  # "int8" | "int4" (optimum-quanto) | "nf4" (bitsandbytes): a quantized frozen base
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

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(
            rank=self.rank,
            min_rank=self.min_rank,
            rank_exponent=self.rank_exponent,
            variant=self.variant,
            target_modules=self.target_modules,
        )

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


def _lock_out(out: Path) -> int:
    """An exclusive lock on the output folder itself (flock on its descriptor: no lock file to
    leave behind), held until the run ends; a second run into the same folder is refused."""
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CheckpointError(
            f"another tlora run is writing to {out}: wait for it to finish or choose another --out"
        ) from None
    return fd


def _prepare_out(out: Path, cfg: TrainConfig) -> None:
    """Refuse an --out that holds another run unless --resume (same settings) or --overwrite
    (its run files are removed)."""
    found = sorted(p.name for p in out.iterdir() if p.name in RUN_FILES or CHECKPOINT_NAME.match(p.name))
    if not found:
        return
    if cfg.overwrite:
        for name in found:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return
    if not cfg.resume:
        raise CheckpointError(
            f"{out} holds another run ({', '.join(found[:4])}{' ...' if len(found) > 4 else ''}): pass --resume to "
            "continue it, --overwrite to replace it, or choose another --out"
        )
    _read_log(out / "loss.jsonl")  # refused now if malformed, before anything is written
    if not (out / "config.json").exists():
        return  # checkpoints without config.json: load_checkpoint still checks the adapter
    before_train, before_adapter = _read_run_config(out / "config.json")
    now_train = json.loads(json.dumps(asdict(cfg)))
    now_adapter = cfg.adapter_config().to_dict()
    changed = [
        (k, before_train[k], now_train[k])
        for k in RESUME_FIXED_TRAIN
        if _same_setting(k, before_train[k]) != _same_setting(k, now_train[k])
    ]
    changed += [(k, a, now_adapter[k]) for k in RESUME_FIXED_ADAPTER if (a := before_adapter[k]) != now_adapter[k]]
    if changed:
        what = "; ".join(f"--{k.replace('_', '-')} was {a!r}, now {b!r}" for k, a, b in changed)
        raise CheckpointError(
            f"--resume cannot continue the run in {out} with other settings ({what}): "
            "resume with its settings, or start a new run (--overwrite or another --out)"
        )


def _check_train_setting(key: str, value) -> None:
    """The type and range of a RESUME_FIXED_TRAIN setting read from config.json (ConfigError)."""
    if key in ("model", "token", "class_name"):
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"must be a non-empty string, got {value!r}")
    elif key == "resolution":
        if value is not None:
            check_int(key, value, SIDE_STRIDE, MAX_SIDE)
    elif key == "seed":
        check_int(key, value, 0, MAX_SEED)
    elif key == "target_modules":
        AdapterConfig(target_modules=value)


def _read_run_config(path: Path) -> tuple[dict, dict]:
    """config.json's train and adapter sections, each field that --resume compares checked for
    type and range (the adapter section as adapter files' configs are); CheckpointError otherwise."""
    fix = "cannot check that --resume continues the same run: fix the file, or start over with --overwrite"
    try:
        check_input_file(path, "run config", kind="a JSON file")
        data = json.loads(path.read_bytes().decode("utf-8"))
    except TloraError as e:
        raise CheckpointError(f"{e}: {fix}") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {e}): {fix}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must be a JSON object with train and adapter sections: {fix}")
    for section in ("train", "adapter"):
        if not isinstance(data.get(section), dict):
            got = "missing" if section not in data else f"must be a JSON object, got {data[section]!r}"[:200]
            raise CheckpointError(f"{path}: {section}: {got}: {fix}")
    train, adapter = data["train"], data["adapter"]
    for key in RESUME_FIXED_TRAIN:
        try:
            if key not in train:
                if key == "target_modules":  # (a run of a tlora that compared it in the adapter section)
                    train[key] = adapter.get(key)
                    continue
                raise ConfigError("missing")
            _check_train_setting(key, train[key])
        except ConfigError as e:
            raise CheckpointError(f"{path}: train.{key}: {e}: {fix}") from None
    missing = [k for k in RESUME_FIXED_ADAPTER if k not in adapter]
    if missing:
        raise CheckpointError(f"{path}: adapter.{missing[0]}: missing: {fix}")
    try:
        adapter = AdapterConfig.from_dict(adapter).to_dict()
    except (ConfigError, TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"{path}: adapter: {e}: {fix}") from None
    return train, adapter


def _read_log(path: Path) -> list[tuple[int, str]]:
    """loss.jsonl's entries as (step, line): JSON objects with an integer step >= 1 (increasing),
    a finite loss and seconds >= 0; a malformed line is a CheckpointError naming the file and
    line. A last line without its newline that is not JSON was cut short by a killed run (it
    logs steps after the last checkpoint): it is dropped."""
    if not path.exists():
        return []
    fix = "fix or delete that line, or start over with --overwrite"
    try:
        check_input_file(path, "loss log", kind="a JSONL file")
        text = path.read_bytes().decode("utf-8")
    except TloraError as e:
        raise CheckpointError(f"{e}: start over with --overwrite") from None
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise CheckpointError(f"{path} line {line}: is not UTF-8 text: {fix}") from None
    lines = text.split("\n")
    entries: list[tuple[int, str]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError) as e:
            if n == len(lines):  # no newline after it: a write cut short
                break
            raise CheckpointError(f"{path} line {n}: is not JSON ({type(e).__name__}: {e}): {fix}") from None
        try:
            if not isinstance(entry, dict):
                raise ConfigError(f"must be a JSON object {{step, loss, seconds}}, got {line.strip()[:80]!r}")
            for key in ("step", "loss"):
                if key not in entry:
                    raise ConfigError(f"{key} missing")
            step = check_int("step", entry["step"], 1)
            check_float("loss", entry["loss"], 0.0)
            if "seconds" in entry:
                check_float("seconds", entry["seconds"], 0.0)
            if entries and step <= entries[-1][0]:
                raise ConfigError(f"step {step} follows step {entries[-1][0]}: steps increase")
        except ConfigError as e:
            raise CheckpointError(f"{path} line {n}: {e}: {fix}") from None
        entries.append((step, line))
    return entries


def _checkpoint_to_resume(out: Path, cfg: TrainConfig) -> Checkpoint | None:
    """The newest checkpoint in `out`, validated (`read_checkpoint`), or None when there is none.
    A refusal names the newest earlier checkpoint that validates, if any."""
    found = checkpoints(out)
    if not found:
        return None
    try:
        cp = read_checkpoint(found[-1])
    except CheckpointError as e:
        earlier = next((p for p in reversed(found[:-1]) if _validates(p)), None)
        raise CheckpointError(f"{e}; {earlier} validates" if earlier else str(e)) from None
    if cp.step > cfg.steps:
        raise CheckpointError(
            f"{cp.path / 'state.json'}: step {cp.step} is beyond this run's --steps {cfg.steps}: give --steps "
            f"above {cp.step} to train on (its adapter is {cp.path / 'adapter.safetensors'}), or start over "
            "with --overwrite"
        )
    return cp


def _validates(ckpt: Path) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a missing checksum's warning: said for the one resumed from
        try:
            read_checkpoint(ckpt)
        except CheckpointError:
            return False
    return True


def _same_setting(key: str, value):
    """A setting in comparable form (model folders by their real path)."""
    if key == "model" and isinstance(value, str) and os.path.exists(value):
        return os.path.realpath(value)
    return value


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
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    weight_dtype = check_dtype(cfg.mixed_precision, device, "mixed_precision")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device.index)
    # accelerate keeps one mixed-precision setting per process: forget the previous run's (the
    # distributed state itself is kept), so that train() can run again with other settings.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=device.type == "cpu")
    lock = None
    if acc.is_main_process:
        _check_writable(out)
        lock = _lock_out(out)
    try:
        if acc.is_main_process:
            _prepare_out(out, cfg)
        # Validated before the model loads: a checkpoint that cannot be resumed fails at once.
        resume_from = _checkpoint_to_resume(out, cfg) if cfg.resume else None
        return _train(cfg, acc, out, weight_dtype, resume_from)
    finally:
        if lock is not None:
            os.close(lock)


def _train(cfg: TrainConfig, acc, out: Path, weight_dtype: torch.dtype, resume_from: Checkpoint | None) -> TrainResult:
    run = _Run(cfg, acc, out, weight_dtype)
    c = run.adapter.config
    # The settings as resolved (device, dtype, the family's native resolution, the paper's steps):
    # what the run does, not only what was typed.
    acc.print(
        f"training {c.variant} rank {c.rank} (r_min {c.min_rank}) for {cfg.steps} steps on {run.fam.name} "
        f"at {run.resolution}x{run.resolution}, timesteps {run.fam.sampling_description()}; device {acc.device}, "
        f"weights {str(weight_dtype).removeprefix('torch.')}"
        f" (mixed precision {cfg.mixed_precision}), lr {cfg.lr:g}, seed {cfg.seed}"
    )
    start = run.resume(resume_from)
    bar = tqdm(
        range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", disable=not acc.is_local_main_process
    )
    for step in bar:
        bar.set_postfix(loss=f"{run.step(step):.4f}")
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            run.checkpoint(done)
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
        self.pipe = load_pipeline(cfg.model, dtype=self.weight_dtype, quantize=cfg.quantize).to(acc.device)
        fam: Family = family_of(self.pipe)
        with about("timestep_sampling", "shift"):
            fam.configure_sampling(cfg.timestep_sampling, cfg.shift)
        self.fam = fam
        self.resolution = resolution = cfg.resolution if cfg.resolution is not None else fam.default_resolution()
        paths = [Path(cfg.image)] if cfg.image else list_images(cfg.image_dir)
        pixels = torch.cat([load_image(p, resolution) for p in paths])

        # The images and the prompt never change: encode them once.
        self.lat_mean, self.lat_std = fam.encode_image(pixels)
        self.cond = fam.encode_prompt(cfg.prompt, resolution)
        self.mask = None
        if cfg.mask:
            self.mask = load_mask(cfg.mask, self.lat_mean.shape[-1], images=paths).to(acc.device)
        self.prior = None
        if cfg.prior_dir:
            prior_pixels = torch.cat([load_image(p, resolution) for p in list_images(cfg.prior_dir)])
            self.prior = (
                *fam.encode_image(prior_pixels),
                fam.encode_prompt(f"a photo of {cfg.class_name}", resolution),
            )

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
            variant=cfg.variant,
            target_modules=cfg.target_modules if cfg.target_modules is not None else fam.default_targets,
            num_train_timesteps=fam.num_train_timesteps,
            seed=cfg.seed,
        )
        self.adapter.config.extra.update(token=cfg.token, class_name=cfg.class_name, prompt=cfg.prompt, family=fam.name)
        # Paper settings: AdamW, betas (0.9, 0.999), weight decay 1e-4, constant lr, batch 1.
        optimizer = torch.optim.AdamW(self.adapter.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=1e-4)
        self.ddp_model, self.optimizer = self.acc.prepare(model, optimizer)
        # Each process draws its own timesteps and noise from a seeded CPU generator whose state is
        # checkpointed, so a resumed run continues the exact same sequence.
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + self.acc.process_index)

    def resume(self, resume_from: Checkpoint | None) -> int:
        """Restore `resume_from` (validated by `_checkpoint_to_resume`, or None: a new run) and
        write the run's config.json and its loss log up to that step; returns the step to start from."""
        cfg, acc = self.cfg, self.acc
        start = 0
        if resume_from is not None:
            start = load_checkpoint(resume_from, self.adapter, self.optimizer, self.gen, acc.process_index)
            self.good = resume_from.path
            acc.print(f"resuming from {self.good} (step {start})")
            old_lr = self.optimizer.param_groups[0]["lr"]
            if old_lr != cfg.lr:
                for group in self.optimizer.param_groups:
                    group["lr"] = cfg.lr
                acc.print(
                    f"--lr {cfg.lr:g} differs from the checkpoint's {old_lr:g}: the optimizer continues with {cfg.lr:g}"
                )
        elif cfg.resume:
            acc.print(f"no checkpoint in {self.out}: starting from step 0")
        if acc.is_main_process:
            config = {"train": asdict(cfg), "adapter": self.adapter.config.to_dict(), "resolution": self.resolution}
            write_json(self.out / "config.json", config)
            _truncate_log(self.loss_log, start)
        return start

    def _loss(self, mean, std, c, weight_mask=None) -> torch.Tensor:
        """The denoising loss of one image of `mean`/`std` (latent distributions) under prompt
        `c`, at a random timestep; `weight_mask`: only the subject's latents count."""
        acc, fam, gen, dtype = self.acc, self.fam, self.gen, self.weight_dtype
        idx = torch.randint(0, mean.shape[0], (1,), generator=gen)
        eps = torch.randn(mean[idx].shape, generator=gen)
        latents = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen).to(mean.device)
        t = fam.sample_timesteps(gen, 1, self.resolution).to(acc.device)
        noised = fam.noise(latents.to(dtype), eps.to(acc.device, dtype), t)
        with acc.autocast():
            pred = fam.predict(self.ddp_model, noised, c)
        err = F.mse_loss(pred.float(), noised.target.float(), reduction="none")
        if weight_mask is None:
            return err.mean()
        w = fam.layout(weight_mask.expand_as(latents).float())
        return (err * w).sum() / w.sum()

    def step(self, step: int) -> float:
        """Optimizer step `step + 1`, logged to loss.jsonl; returns the loss (every process's mean).
        A non-finite loss stops training (TrainingError)."""
        cfg, acc = self.cfg, self.acc
        tic = time.perf_counter()
        loss = self._loss(self.lat_mean, self.lat_std, self.cond, self.mask)
        if self.prior is not None:
            loss = loss + cfg.prior_weight * self._loss(*self.prior)
        value = acc.reduce(loss.detach(), reduction="mean").item()
        if not math.isfinite(value):  # every process sees the same reduced value and stops
            raise TrainingError(
                f"the loss is {value} at step {step + 1} (lr {cfg.lr:g}): training diverged. {_last_good(self.good)}"
            )
        acc.backward(loss)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if acc.is_main_process:
            entry = {"step": step + 1, "loss": value, "seconds": round(time.perf_counter() - tic, 4)}
            with open(self.loss_log, "a") as f:
                f.write(json.dumps(entry) + "\n")
        return value

    def checkpoint(self, done: int) -> None:
        """checkpoint-`done` (only finite state is checkpointed), with validation samples when asked."""
        cfg, acc = self.cfg, self.acc
        # Every process draws its own timesteps: keep all their RNG states, not just the main one's.
        gen_states = (
            list(acc.gather(self.gen.get_state()[None].to(acc.device)).cpu()) if acc.num_processes > 1 else None
        )
        acc.wait_for_everyone()
        _check_finite_state(self.adapter, self.optimizer, done, self.good)
        if acc.is_main_process:
            extra = self.adapter.config.extra
            ckpt = save_checkpoint(self.out, done, self.adapter, self.optimizer, self.gen, extra, gen_states)
            if cfg.validation_prompts:
                from ..generate import sample_grid

                sample_grid(
                    self.pipe,
                    cfg.validation_prompts,
                    f"{cfg.token} {cfg.class_name}",
                    ckpt / "samples",
                    steps=cfg.validation_steps or self.fam.default_steps,
                    guidance=self.fam.default_guidance,
                    seed=cfg.seed,
                    size=(self.resolution, self.resolution),
                    label=f"{cfg.variant} rank {cfg.rank}\nstep {done}",
                    family=self.fam,
                )
        self.good = self.out / f"checkpoint-{done}"

    def finish(self) -> TrainResult:
        """The final adapter.safetensors, written by the main process once every process is done."""
        self.acc.wait_for_everyone()
        final = self.out / "adapter.safetensors"
        if self.acc.is_main_process:
            save_adapter(self.adapter, final)
        self.acc.end_training()
        return TrainResult(final, self.adapter, self.pipe)


def _truncate_log(path: Path, step: int) -> None:
    """Keep only the loss entries up to `step` (a resumed run rewrites what came after)."""
    if not path.exists():
        return
    keep = [line for s, line in _read_log(path) if s <= step]
    write_atomic(path, "".join(line + "\n" for line in keep))
