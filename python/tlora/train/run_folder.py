"""The output folder of `tlora train`: its run files, the lock that keeps a second run out, and what
`--resume` checks before anything loads: that the folder holds this run (config.json's settings
that a resumed run must share, loss.jsonl's entries) and which checkpoint it continues from."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import warnings
from dataclasses import MISSING, asdict, fields
from pathlib import Path

from ..config import SCHEDULE_OPTIONS, AdapterConfig, check_float, check_int
from ..errors import CheckpointError, ConfigError, TloraError
from ..files.atomic import write_atomic
from ..images import check_input_file
from ..options import MAX_SAMPLE_STEPS, MAX_SEED, MAX_SHIFT, MAX_SIDE, SIDE_STRIDE, TIMESTEP_SAMPLINGS
from . import drift
from .checkpoint import _NAME as CHECKPOINT_NAME
from .checkpoint import Checkpoint, checkpoints, read_checkpoint

# Files of a run in --out: another run's are refused unless --resume or --overwrite.
# samples/: validation samples of steps without a checkpoint; logs/: the trackers' (--report-to).
RUN_FILES = (
    "config.json",
    "loss.jsonl",
    "adapter.safetensors",
    "samples",
    "logs",
    drift.DRIFT_LOG,
    drift.PLOT,
    drift.BASE_SAMPLES,
)
# Settings a resumed run must share with the run it continues (the lr may change: it is applied),
# as typed: None is the family's default (target_modules: its list, tlora.train.families). The
# sampling settings too: how noise levels are drawn, and the validation samples (the overfitting
# view compares them step by step with the base model's); a run recorded before one of those
# existed ran with its default.
RESUME_FIXED_SAMPLING = ("timestep_sampling", "shift", "validation_prompts", "validation_steps")
RESUME_FIXED_TRAIN = ("model", "token", "class_name", "resolution", "seed", "target_modules", *RESUME_FIXED_SAMPLING)
RESUME_FIXED_ADAPTER = ("variant", "rank", "min_rank", "rank_exponent", *SCHEDULE_OPTIONS)
# What a resumed run may change: how long and how often (steps, checkpoints, validation), the lr (it
# is applied and reported), where and how fast it runs (device, mixed precision, gradient
# checkpointing), where it reports, and the command's own switches. Every other setting of
# TrainConfig shapes the training (data, prompts, noise, loss, optimizer, schedule, EMA, base
# weights) and must be the run's: a change is refused, never silently ignored (the optimizer's
# betas, for one, would come back from the checkpoint). The settings above are checked for type
# and range; the rest are compared as recorded, a run recorded before one existed took its default.
RESUME_CHANGEABLE = (
    "out",
    "resume",
    "overwrite",
    "steps",
    "lr",
    "checkpoint_every",
    "checkpoints_total_limit",
    "validation_every",
    "device",
    "mixed_precision",
    "gradient_checkpointing",
    "report_to",
)
# The command line's name of a setting, where it is not --NAME (the repeatable option's).
FLAGS = {"validation_prompts": "--validation-prompt"}


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".tlora-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"output folder {out} is not writable ({e.strerror}): choose another --out") from None


def lock_out(out: Path) -> int:
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


def prepare_out(out: Path, cfg) -> None:
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
    read_log(out / "loss.jsonl")  # refused now if malformed, before anything is written
    if not (out / "config.json").exists():
        return  # checkpoints without config.json: load_checkpoint still checks the adapter
    defaults = {
        f.name: json.loads(json.dumps(f.default_factory() if f.default is MISSING else f.default))
        for f in fields(cfg)
        if f.default is not MISSING or f.default_factory is not MISSING
    }
    before_train, before_adapter = _read_run_config(out / "config.json", defaults)
    now_train = json.loads(json.dumps(asdict(cfg)))
    others = set(RESUME_FIXED_TRAIN) | set(RESUME_CHANGEABLE) | set(RESUME_FIXED_ADAPTER)  # (the adapter's: below)
    fixed = [*RESUME_FIXED_TRAIN, *(k for k in now_train if k not in others)]
    changed = [
        (k, before_train.get(k, defaults.get(k)), now_train[k])
        for k in fixed
        if _same_setting(k, before_train.get(k, defaults.get(k))) != _same_setting(k, now_train[k])
    ]
    now_adapter = cfg.adapter_config().to_dict()
    changed += [(k, a, now_adapter[k]) for k in RESUME_FIXED_ADAPTER if (a := before_adapter[k]) != now_adapter[k]]
    if changed:
        what = "; ".join(f"{_flag(k)} was {_shown(a)}, now {_shown(b)}" for k, a, b in changed)
        raise CheckpointError(
            f"--resume cannot continue the run in {out} with other settings ({what}): "
            "resume with its settings, or start a new run (--overwrite or another --out)"
        )


def _flag(key: str) -> str:
    return FLAGS.get(key, "--" + key.replace("_", "-"))


def _shown(value) -> str:
    return "unset (the default)" if value is None else repr(value)


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
    elif key == "timestep_sampling":
        if value is not None and value not in TIMESTEP_SAMPLINGS:
            raise ConfigError(f"must be one of {', '.join(TIMESTEP_SAMPLINGS)} or null, got {value!r}")
    elif key == "shift":
        if value is not None and value != "auto":
            check_float(key, value, 0.0, MAX_SHIFT, lo_inclusive=False)
    elif key == "validation_prompts":
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            raise ConfigError(f"must be a list of strings, got {value!r}"[:200])
    elif key == "validation_steps":
        if value is not None:
            check_int(key, value, 1, MAX_SAMPLE_STEPS)


def _read_run_config(path: Path, defaults: dict) -> tuple[dict, dict]:
    """config.json's train and adapter sections, each field that --resume compares checked for
    type and range (the adapter section as adapter files' configs are; a sampling setting it
    lacks: `defaults`' value); CheckpointError otherwise."""
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
                if key in RESUME_FIXED_SAMPLING:  # (a run of a tlora without that setting)
                    train[key] = defaults[key]
                    continue
                raise ConfigError("missing")
            _check_train_setting(key, train[key])
        except ConfigError as e:
            raise CheckpointError(f"{path}: train.{key}: {e}: {fix}") from None
    # (SCHEDULE_OPTIONS are absent in runs of a tlora before them, which trained with their
    # defaults: AdapterConfig.from_dict fills those in)
    missing = [k for k in RESUME_FIXED_ADAPTER if k not in adapter and k not in SCHEDULE_OPTIONS]
    if missing:
        raise CheckpointError(f"{path}: adapter.{missing[0]}: missing: {fix}")
    try:
        adapter = AdapterConfig.from_dict(adapter).to_dict()
    except (ConfigError, TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"{path}: adapter: {e}: {fix}") from None
    return train, adapter


def read_log(path: Path) -> list[tuple[int, str]]:
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


def checkpoint_to_resume(out: Path, cfg) -> Checkpoint | None:
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


def truncate_log(path: Path, step: int) -> None:
    """Keep only the loss entries up to `step` (a resumed run rewrites what came after)."""
    if not path.exists():
        return
    keep = [line for s, line in read_log(path) if s <= step]
    write_atomic(path, "".join(line + "\n" for line in keep))
