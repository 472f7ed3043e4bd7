"""Single-image customization: `tlora.train(...)` and the `tlora train` command.

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

from .adapter import Adapter, inject
from .atomic import write_atomic
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
from .config import AdapterConfig, check_float, check_int
from .errors import CheckpointError, ConfigError, TloraError, TrainingError
from .images import check_input_file, list_images, load_image, load_mask
from .io import save as save_adapter
from .pipelines import MAX_SIDE, check_dtype, family_of, load_pipeline, resolve_device

PAPER_STEPS = {"tlora": 800, "vanilla": 500, "lora": 500}
MAX_STEPS = 10_000_000
MAX_SEED = 2**32 - 1
# Files of a run in --out: another run's are refused unless --resume or --overwrite.
RUN_FILES = ("config.json", "loss.jsonl", "adapter.safetensors")
# Settings a resumed run must share with the run it continues (the lr may change: it is applied).
RESUME_FIXED_TRAIN = ("model", "token", "class_name", "resolution", "seed")
RESUME_FIXED_ADAPTER = ("variant", "rank", "min_rank", "rank_exponent", "target_modules")


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

    def __post_init__(self) -> None:
        if self.steps is None:
            self.steps = PAPER_STEPS.get(self.variant, 800)
        check_int("--steps", self.steps, 1, MAX_STEPS)
        check_int("--checkpoint-every", self.checkpoint_every, 1)
        check_float("--lr", self.lr, 0.0, 1.0, lo_inclusive=False)
        check_int("--seed", self.seed, 0, MAX_SEED)
        if self.resolution is not None:
            check_int("--resolution", self.resolution, 8, MAX_SIDE)
            if self.resolution % 8:
                raise ConfigError(
                    f"--resolution must be a multiple of 8 (the autoencoder's stride), got {self.resolution}"
                )
        if self.validation_steps is not None:
            check_int("--validation-steps", self.validation_steps, 1, 1000)
        check_float("--prior-weight", self.prior_weight, 0.0)
        if (self.image is None) == (self.image_dir is None):
            raise ConfigError("give exactly one of --image (one photo, the paper's setting) or --image-dir")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"--mixed-precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.quantize not in (None, "int8", "int4", "nf4"):
            raise ConfigError(f"--quantize must be int8, int4 or nf4, got {self.quantize!r}")
        for p in self.validation_prompts:
            if "{}" not in p:
                raise ConfigError(f"validation prompt {p!r} has no {{}} where '{self.token} {self.class_name}' goes")
        if not self.token.strip() or not self.class_name.strip():
            raise ConfigError("--token and --class-name must not be empty")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --out and --overwrite replaces it: give one of them")
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
            check_int(key, value, 8, MAX_SIDE)
    elif key == "seed":
        check_int(key, value, 0, MAX_SEED)


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
    weight_dtype = check_dtype(cfg.mixed_precision, device, "--mixed-precision")
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

    pipe = load_pipeline(cfg.model, dtype=weight_dtype, quantize=cfg.quantize).to(acc.device)
    fam = family_of(pipe)
    resolution = cfg.resolution if cfg.resolution is not None else fam.default_resolution()
    paths = [Path(cfg.image)] if cfg.image else list_images(cfg.image_dir)
    pixels = torch.cat([load_image(p, resolution) for p in paths])

    # The images and the prompt never change: encode them once.
    lat_mean, lat_std = fam.encode_image(pixels)
    cond = fam.encode_prompt(cfg.prompt, resolution)
    mask = None
    if cfg.mask:
        mask = load_mask(cfg.mask, lat_mean.shape[-1], images=paths).to(acc.device)
    prior = None
    if cfg.prior_dir:
        prior_pixels = torch.cat([load_image(p, resolution) for p in list_images(cfg.prior_dir)])
        prior = (*fam.encode_image(prior_pixels), fam.encode_prompt(f"a photo of {cfg.class_name}", resolution))

    model = fam.denoiser
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    adapter = inject(
        model,
        rank=cfg.rank,
        min_rank=cfg.min_rank,
        rank_exponent=cfg.rank_exponent,
        variant=cfg.variant,
        target_modules=cfg.target_modules,
        num_train_timesteps=fam.num_train_timesteps,
        seed=cfg.seed,
    )
    adapter.config.extra.update(token=cfg.token, class_name=cfg.class_name, prompt=cfg.prompt, family=fam.name)
    # Paper settings: AdamW, betas (0.9, 0.999), weight decay 1e-4, constant lr, batch 1.
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=1e-4)
    ddp_model, optimizer = acc.prepare(model, optimizer)

    # Each process draws its own timesteps and noise from a seeded CPU generator whose state is
    # checkpointed, so a resumed run continues the exact same sequence.
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + acc.process_index)
    start, good = 0, None  # good: the newest checkpoint known to be valid (for a divergence's message)
    if resume_from is not None:
        start = load_checkpoint(resume_from, adapter, optimizer, gen, acc.process_index)
        good = resume_from.path
        acc.print(f"resuming from {good} (step {start})")
        old_lr = optimizer.param_groups[0]["lr"]
        if old_lr != cfg.lr:
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr
            acc.print(
                f"--lr {cfg.lr:g} differs from the checkpoint's {old_lr:g}: the optimizer continues with {cfg.lr:g}"
            )
    elif cfg.resume:
        acc.print(f"no checkpoint in {out}: starting from step 0")
    loss_log = out / "loss.jsonl"
    if acc.is_main_process:
        write_json(
            out / "config.json", {"train": asdict(cfg), "adapter": adapter.config.to_dict(), "resolution": resolution}
        )
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

    bar = tqdm(
        range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", disable=not acc.is_local_main_process
    )
    for step in bar:
        tic = time.perf_counter()
        loss = loss_on(lat_mean, lat_std, cond, mask)
        if prior is not None:
            loss = loss + cfg.prior_weight * loss_on(*prior)
        value = acc.reduce(loss.detach(), reduction="mean").item()
        if not math.isfinite(value):  # every process sees the same reduced value and stops
            raise TrainingError(
                f"the loss is {value} at step {step + 1} (lr {cfg.lr:g}): training diverged. {_last_good(good)}"
            )
        acc.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{value:.4f}")
        done = step + 1
        if acc.is_main_process:
            with open(loss_log, "a") as f:
                f.write(
                    json.dumps({"step": done, "loss": value, "seconds": round(time.perf_counter() - tic, 4)}) + "\n"
                )
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            # Every process draws its own timesteps: keep all their RNG states, not just the main one's.
            gen_states = list(acc.gather(gen.get_state()[None].to(acc.device)).cpu()) if acc.num_processes > 1 else None
            acc.wait_for_everyone()
            _check_finite_state(adapter, optimizer, done, good)
            if acc.is_main_process:
                ckpt = save_checkpoint(out, done, adapter, optimizer, gen, adapter.config.extra, gen_states)
                if cfg.validation_prompts:
                    from .generate import sample_grid

                    sample_grid(
                        pipe,
                        cfg.validation_prompts,
                        f"{cfg.token} {cfg.class_name}",
                        ckpt / "samples",
                        steps=cfg.validation_steps or fam.default_steps,
                        guidance=fam.default_guidance,
                        seed=cfg.seed,
                        size=(resolution, resolution),
                        label=f"{cfg.variant} rank {cfg.rank}\nstep {done}",
                    )
            good = out / f"checkpoint-{done}"
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
    keep = [line for s, line in _read_log(path) if s <= step]
    write_atomic(path, "".join(line + "\n" for line in keep))
