"""Training checkpoints: `checkpoint-N/` folders holding the adapter, the optimizer state, the RNG
state and the step, all as safetensors + JSON (never pickle).

A checkpoint is written into a temporary folder and renamed into place as a whole, so a folder
named `checkpoint-N` is always complete; a crash or a full disk leaves older checkpoints intact.

    adapter.safetensors   the adapter file (tlora.files.io's format, its own checksum)
    state.safetensors     tensors `state.<i>.<name>` (the optimizer's state of the i-th trainable
                          factor, in `Adapter.parameters()` order: AdamW's exp_avg, exp_avg_sq and
                          step, Prodigy's, bitsandbytes' 8-bit AdamW's, as tlora.train.optim's
                          STATE_SCHEMAS lists them), `ema.<i>` (the EMA's factors, with --ema-decay),
                          `rng.generator` (the main process's CPU generator) and, under DDP,
                          `rng.generator.<k>` (process k); metadata: `optimizer` (JSON: `kind`,
                          `param_groups` with infinities as "inf", and `scalars` for non-tensor
                          state), `scheduler` (JSON: the lr schedule's position), `ema` (JSON: its
                          step count), `step` (decimal) and `checksum` (`tlora.files.io.adapter_checksum`
                          of these strings and the tensors)
    state.json            {"step": N}

`read_checkpoint` validates all of it before anything is restored, as tlora.files.io validates adapter
files: the checksum (a state file written before checksums resumes with a warning; every other
check still applies), the optimizer description's schema (types and ranges), one state per
trainable factor with its optimizer's tensors (dtype, shape, finite values, second moments >= 0),
equal per-factor step counts of at most the checkpoint's step, the schedule's position (the
checkpoint's step), the EMA's factors (shapes, finite) and step count, the RNG state's size, and
the step in state.json against the folder's name and the state file. Every refusal is a
CheckpointError naming the file and the field, ending with what to do.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapter.inject import Adapter
from ..config import SCHEDULE_OPTIONS, check_float, check_int
from ..errors import CheckpointError, ConfigError, TloraError
from ..files.atomic import write_atomic
from ..files.io import AdapterFile, adapter_checksum, check_regular_file, read_adapter, read_raw, write_tensors
from ..files.io import save as save_adapter
from ..images import check_input_file
from ..layer import factors
from .optim import STATE_SCHEMAS, load_scheduler_state, state_schema

_NAME = re.compile(r"checkpoint-(\d+)$")
# What a refusal of a checkpoint tells the user to do.
FIX = "resume from an earlier checkpoint (move this one out of the run folder) or start over with --overwrite"
# AdamW's numeric hyperparameters and their ranges; its other settings are flags (bool or null).
# lr >= 0: a schedule (linear, cosine) reaches 0 at the last step.
GROUP_NUMBERS = {"lr": (0.0, 1.0, True), "eps": (0.0, 1.0, False), "weight_decay": (0.0, None, True)}
_GENERATOR_STATE = torch.Generator().get_state()  # a CPU generator's state: its size and dtype


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically."""
    write_atomic(path, json.dumps(data, indent=2))


@dataclass
class RunState:
    """What a checkpoint holds besides the factors, the optimizer's state and the RNG: which
    optimizer (tlora.train.optim's name), the lr schedule's position (tlora.train.optim.scheduler_state)
    and the EMA's averaged factors with its step count, or None without an EMA."""

    optimizer: str = "adamw"
    scheduler: dict[str, Any] | None = None
    ema: tuple[list[torch.Tensor], int] | None = None


def _json_number(value):
    """Infinite hyperparameters (Prodigy's default growth_rate) as the strings JSON can hold."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _from_json_number(value):
    return float(value) if value in ("inf", "-inf") else value


def _flat_state(sd: dict) -> dict[int, dict[str, Any]]:
    """The per-factor states of an optimizer's state_dict, one level deep: bitsandbytes nests its
    quantization state in a dict of its own (and reads it back flat as well)."""
    flat = {}
    for idx, state in sd["state"].items():
        flat[idx] = {}
        for key, value in state.items():
            if isinstance(value, dict):
                flat[idx].update(value)
            else:
                flat[idx][key] = value
    return flat


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[list[tuple[str, torch.Tensor]], dict]:
    sd = opt.state_dict()
    tensors, scalars = [], {}
    for idx, state in _flat_state(sd).items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors.append((f"state.{idx}.{key}", value.detach().cpu().contiguous()))
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: _json_number(v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_problem(optimizer: torch.optim.Optimizer) -> str | None:
    """What makes the optimizer's state unfit to checkpoint (non-finite values, a negative second
    moment), or None: the check `save_checkpoint`'s callers run, the same `read_checkpoint` runs."""
    for idx, state in _flat_state(optimizer.state_dict()).items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                t = value.detach()
                problem = _value_problem(key, t, str(t.dtype).removeprefix("torch."))
                if problem:
                    return f"state {idx} {key} {problem}"
    return None


def save_checkpoint(
    out: Path,
    step: int,
    adapter: Adapter,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    extra: dict[str, Any],
    generator_states: list[torch.Tensor] | None = None,
    run: RunState | None = None,
) -> Path:
    """`generator_states`: under DDP, every process's generator state (index = process index), so
    that each process resumes its own random stream; `run`: the optimizer's name, the schedule, the EMA."""
    run = run or RunState()
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_adapter(adapter, tmp / "adapter.safetensors", extra=extra)
        tensors, meta = _optimizer_tensors(optimizer)
        meta["kind"] = run.optimizer
        tensors.append(("rng.generator", generator.get_state()))
        for i, state in enumerate(generator_states or []):
            tensors.append((f"rng.generator.{i}", state.cpu().contiguous()))
        strings = {"optimizer": json.dumps(meta, allow_nan=False), "step": str(step)}
        if run.scheduler is not None:
            strings["scheduler"] = json.dumps(run.scheduler, allow_nan=False)
        if run.ema is not None:
            shadow, ema_step = run.ema
            tensors += [(f"ema.{i}", t.detach().cpu().contiguous()) for i, t in enumerate(shadow)]
            strings["ema"] = json.dumps({"optimization_step": ema_step})
        strings["checksum"] = adapter_checksum(tensors, strings)
        write_tensors(tmp / "state.safetensors", tensors, strings)
        write_json(tmp / "state.json", {"step": step})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def checkpoints(out: Path) -> list[Path]:
    """The complete checkpoints in `out`, oldest first; temporary folders of checkpoints cut short are removed."""
    for stale in out.glob(".checkpoint-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    found = [(int(m.group(1)), p) for p in out.glob("checkpoint-*") if (m := _NAME.search(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


@dataclass
class Checkpoint:
    """A validated checkpoint, not yet restored."""

    path: Path
    step: int
    adapter: AdapterFile
    state: dict[int, dict[str, Any]]  # trainable factor index -> AdamW state
    groups: list[dict[str, Any]]
    rng: dict[str, torch.Tensor]  # "rng.generator" and "rng.generator.<k>"
    optimizer: str = "adamw"  # tlora.train.optim's name of the optimizer (checkpoints before it: adamw)
    scheduler: dict[str, Any] | None = None  # the lr schedule's position (None: written before schedules)
    ema: list[torch.Tensor] | None = None  # the EMA's factors, in Adapter.parameters() order
    ema_step: int = 0


def _fail(path: Path, field: str | None, problem: str) -> CheckpointError:
    where = f"{path}: {field}: " if field else f"{path}: "
    return CheckpointError(f"{where}{problem}: {FIX}")


def _value_problem(key: str, t: torch.Tensor, dtype: str = "float32", nonneg: bool | None = None) -> str | None:
    """Why an optimizer state tensor is not a valid one (None when it is): its dtype, finite
    values, and values >= 0 where `nonneg` (default: every AdamW moment but exp_avg)."""
    if str(t.dtype).removeprefix("torch.") != dtype:
        return f"is {str(t.dtype).removeprefix('torch.')}, not {dtype}"
    if not t.dtype.is_floating_point:
        return None
    bad = int(t.numel() - torch.isfinite(t).sum())
    if bad:
        return f"holds {bad} non-finite value(s) (NaN or infinity)"
    if nonneg is None:
        nonneg = key in ("exp_avg_sq", "max_exp_avg_sq")
    if nonneg and t.numel() and float(t.min()) < 0:
        return f"holds negative values (min {float(t.min()):g}); a second moment is >= 0"
    return None


def read_checkpoint(ckpt: Path) -> Checkpoint:
    """Read and validate every part of checkpoint folder `ckpt` (module docstring), touching
    nothing; CheckpointError naming the file and field otherwise."""
    ckpt = Path(ckpt)
    try:
        f = read_adapter(ckpt / "adapter.safetensors")
    except TloraError as e:  # AdapterFileError, MissingFileError: the message names the file
        raise CheckpointError(f"{e}: {FIX}") from None
    state_file = ckpt / "state.safetensors"
    tensors, strings, rng = _read_state_file(ckpt, state_file)
    step = _read_step(ckpt, strings)
    groups, scalars, kind = _read_optimizer(state_file, strings["optimizer"])
    shapes = _trainable_shapes(f)
    _check_groups(state_file, groups, len(shapes))
    ema_tensors = {k: tensors.pop(k) for k in list(tensors) if k.startswith("ema.")}
    state = _optimizer_state(state_file, tensors, scalars, rng)
    _check_state(state_file, state, shapes, kind, groups, step)
    for key, t in rng.items():
        if t.dtype != torch.uint8 or t.shape != _GENERATOR_STATE.shape:
            raise _fail(
                state_file,
                key,
                f"is {str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}, not a CPU generator's state "
                f"(uint8 {tuple(_GENERATOR_STATE.shape)})",
            )
    scheduler = _read_scheduler(state_file, strings.get("scheduler"), len(groups), step)
    ema, ema_step = _read_ema(state_file, ema_tensors, strings.get("ema"), shapes, step)
    return Checkpoint(
        path=ckpt,
        step=step,
        adapter=f,
        state=state,
        groups=groups,
        rng=rng,
        optimizer=kind,
        scheduler=scheduler,
        ema=ema,
        ema_step=ema_step,
    )


def _read_scheduler(path: Path, text: str | None, n_groups: int, step: int) -> dict | None:
    """The lr schedule's position: last_epoch and step_count the checkpoint's step (the schedule steps
    with the optimizer), one positive base lr per parameter group."""
    if text is None:
        return None
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or set(data) != {"last_epoch", "base_lrs", "step_count"}:
            raise ConfigError("must be a JSON object {last_epoch, base_lrs, step_count}")
        check_int("last_epoch", data["last_epoch"], step, step)
        check_int("step_count", data["step_count"], step + 1, step + 1)
        lrs = data["base_lrs"]
        if not isinstance(lrs, list) or len(lrs) != n_groups:
            raise ConfigError(f"base_lrs must list one lr per parameter group ({n_groups}), got {lrs!r}"[:300])
        for lr in lrs:
            check_float("base_lrs", lr, 0.0, 1.0, lo_inclusive=False)
    except (ValueError, RecursionError) as e:  # ConfigError is a ValueError
        raise _fail(path, "scheduler", str(e)) from None
    return data


def _read_ema(
    path: Path, tensors: dict[str, torch.Tensor], text: str | None, shapes: list[tuple[int, ...]], step: int
) -> tuple[list[torch.Tensor] | None, int]:
    """The EMA's factors (`ema.<i>`, one per trainable factor with its shape, float32, finite) and
    its step count (at most the checkpoint's step)."""
    if text is None and not tensors:
        return None, 0
    try:
        data = json.loads(text) if text is not None else None
        if not isinstance(data, dict) or set(data) != {"optimization_step"}:
            raise ConfigError("ema must be a JSON object {optimization_step} beside the ema.<i> tensors")
        ema_step = check_int("ema.optimization_step", data["optimization_step"], 0, step)
    except (ValueError, RecursionError) as e:
        raise _fail(path, "ema", str(e)) from None
    want = [f"ema.{i}" for i in range(len(shapes))]
    if sorted(tensors) != sorted(want):
        raise _fail(path, "ema", f"holds {len(tensors)} tensors, the adapter has {len(shapes)} trainable factors")
    shadow = []
    for key, shape in zip(want, shapes):
        t = tensors[key]
        if tuple(t.shape) != shape:
            raise _fail(path, key, f"has shape {tuple(t.shape)}, its factor {shape}")
        problem = _value_problem("exp_avg", t)  # float32, finite; any sign
        if problem:
            raise _fail(path, key, problem)
        shadow.append(t)
    return shadow, ema_step


def _read_state_file(
    ckpt: Path, state_file: Path
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, torch.Tensor]]:
    """state.safetensors' tensors, metadata strings and RNG states, its parts present and its
    checksum verified (a file written before checksums: a warning)."""
    if not state_file.exists():
        raise CheckpointError(
            f"{ckpt} has no state.safetensors (optimizer and RNG state): it cannot be resumed exactly; {FIX}"
        )
    try:
        check_regular_file(state_file, "checkpoint state file")
        raw, strings = read_raw(state_file)
    except TloraError as e:
        raise CheckpointError(f"{e}: {FIX}") from None
    tensors = dict(raw)
    # The parts first (their own messages), then the checksum, then what the metadata says.
    if "optimizer" not in strings:
        raise CheckpointError(f"{state_file} has no optimizer state ('optimizer' missing): it cannot be resumed; {FIX}")
    rng = {k: v for k, v in tensors.items() if k == "rng.generator" or re.fullmatch(r"rng\.generator\.\d+", k)}
    if "rng.generator" not in rng:
        raise CheckpointError(
            f"{state_file} has no RNG state (rng.generator): the run cannot continue the same random "
            "sequence; start a new run (--overwrite) instead"
        )
    expected = strings.get("checksum")
    if expected is None:
        warnings.warn(
            f"{state_file} has no checksum (written by an older tlora): its state is checked but cannot be verified",
            UserWarning,
            stacklevel=3,
        )
    elif adapter_checksum(raw, strings) != expected:
        raise _fail(
            state_file,
            "checksum",
            "the optimizer state and its description do not match the file's checksum: the file is corrupted "
            "(or was edited)",
        )
    return tensors, strings, rng


def _optimizer_state(
    state_file: Path, tensors: dict[str, torch.Tensor], scalars: dict, rng: dict[str, torch.Tensor]
) -> dict[int, dict[str, Any]]:
    """Trainable factor index -> its AdamW state, from the `state.<i>.<name>` tensors and the
    optimizer description's `<i>.<name>` scalars (each named so, each name once)."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key in rng:
            continue
        m = re.fullmatch(r"state\.(0|[1-9]\d*)\.(\w+)", key)
        if not m:
            raise _fail(state_file, key, "is not an optimizer or RNG state tensor")
        state.setdefault(int(m.group(1)), {})[m.group(2)] = value
    for key, value in scalars.items():
        m = re.fullmatch(r"(0|[1-9]\d*)\.(\w+)", key) if isinstance(key, str) else None
        if not m:
            raise _fail(state_file, f"optimizer.scalars[{key!r}]", "must be named '<index>.<state name>'")
        name = m.group(2)
        if name in state.get(int(m.group(1)), {}):
            raise _fail(state_file, f"optimizer.scalars[{key!r}]", "is also stored as a tensor")
        state.setdefault(int(m.group(1)), {})[name] = value
    return state


def _trainable_shapes(f: AdapterFile) -> list[tuple[int, ...]]:
    """The shape of each trainable factor of an adapter file, in `Adapter.parameters()` order
    (the file's modules in order, each module's trainable factors in the kernels' order)."""
    c = f.config
    return [
        factors.shape(k, c.rank, out_f, in_f)
        for out_f, in_f in f.modules.values()
        for k in factors.trainable(c.variant)
    ]


def _read_step(ckpt: Path, strings: dict[str, str]) -> int:
    """The checkpoint's step: state.json's, which must agree with the folder's name and the state file."""
    path = ckpt / "state.json"
    try:
        check_input_file(path, "checkpoint step file", kind='a JSON file {"step": N}')
        data = json.loads(path.read_bytes().decode("utf-8"))
    except TloraError as e:
        raise CheckpointError(f"{e}: {FIX}") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _fail(path, None, f"is not a JSON object with the checkpoint's step ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or "step" not in data:
        raise _fail(path, "step", 'missing: state.json must be a JSON object {"step": N}')
    try:
        step = check_int("step", data["step"], 1)
    except ConfigError as e:
        raise _fail(path, None, str(e)) from None
    m = _NAME.search(ckpt.name)
    if m and int(m.group(1)) != step:
        raise _fail(path, "step", f"is {step}, but the folder {ckpt.name} is the checkpoint of step {m.group(1)}")
    if "step" in strings and strings["step"] != str(step):
        raise _fail(
            path, "step", f"is {step}, but {ckpt / 'state.safetensors'} was written at step {strings['step']!r}"
        )
    return step


def _read_optimizer(path: Path, text: str) -> tuple[list[dict], dict, str]:
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise _fail(path, "optimizer", f"is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or "param_groups" not in meta or "scalars" not in meta:
        raise _fail(path, "optimizer", "must be a JSON object with param_groups and scalars")
    groups, scalars = meta["param_groups"], meta["scalars"]
    if not isinstance(groups, list) or not groups or not all(isinstance(g, dict) for g in groups):
        raise _fail(path, "optimizer.param_groups", "must be a non-empty list of objects")
    if not isinstance(scalars, dict):
        raise _fail(path, "optimizer.scalars", "must be an object")
    kind = meta.get("kind", "adamw")
    if kind not in STATE_SCHEMAS:
        raise _fail(path, "optimizer.kind", f"must be one of {', '.join(STATE_SCHEMAS)}, got {kind!r}"[:300])
    groups = [{k: _from_json_number(v) for k, v in g.items()} for g in groups]
    return groups, scalars, kind


# Settings that are flags in every optimizer tlora builds (torch's AdamW, Prodigy, bitsandbytes'
# 8-bit AdamW): a number there is a corrupted file, never a running value.
GROUP_FLAGS = frozenset(
    {
        "amsgrad",
        "foreach",
        "maximize",
        "capturable",
        "differentiable",
        "fused",
        "decoupled_weight_decay",
        "decouple",
        "use_bias_correction",
        "safeguard_warmup",
        "block_wise",
        "skip_zeros",
        "is_paged",
    }
)


def _check_groups(path: Path, groups: list[dict], n_params: int) -> None:
    """AdamW's parameter groups: together they hold each trainable factor once; hyperparameters in range."""
    seen: list[int] = []
    for i, g in enumerate(groups):
        name = f"optimizer.param_groups[{i}]"
        params = g.get("params")
        if not isinstance(params, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in params):
            raise _fail(path, f"{name}.params", f"must be a list of parameter indices, got {params!r}"[:300])
        seen += params
        try:
            for key, (lo, hi, lo_inclusive) in GROUP_NUMBERS.items():
                if key not in g:
                    raise ConfigError(f"{key} missing")
                check_float(key, g[key], lo, hi, lo_inclusive)
            betas = g.get("betas")
            if not (isinstance(betas, list) and len(betas) == 2):
                raise ConfigError(f"betas must be a list of two numbers in [0, 1), got {betas!r}")
            for b in betas:
                check_float("betas", b, 0.0, 1.0)
                if b == 1.0:
                    raise ConfigError(f"betas must be < 1, got {b!r}")
        except ConfigError as e:
            raise _fail(path, name, str(e)) from None
        for key, value in g.items():
            if key in GROUP_FLAGS and not isinstance(value, (bool, type(None))):
                raise _fail(path, f"{name}.{key}", f"must be true, false or null, got {value!r}"[:300])
            if key in GROUP_NUMBERS or key in ("params", "betas") or isinstance(value, (bool, type(None))):
                continue
            # Other optimizers' settings and running values (Prodigy's d, its growth rate, ...).
            if isinstance(value, (int, float)) and (math.isfinite(value) or key == "growth_rate" and value > 0):
                continue
            raise _fail(path, f"{name}.{key}", f"must be true, false, null or a finite number, got {value!r}"[:300])
    if sorted(seen) != list(range(n_params)):
        raise _fail(
            path,
            "optimizer.param_groups",
            f"hold parameter indices {sorted(seen)[:8]}{' ...' if len(seen) > 8 else ''}, but the adapter has "
            f"{n_params} trainable factors (0..{n_params - 1}, each once)",
        )


def _check_state(
    path: Path,
    state: dict[int, dict[str, Any]],
    shapes: list[tuple[int, ...]],
    kind: str,
    groups: list[dict[str, Any]],
    step: int,
) -> None:
    """The optimizer's per-factor state against the factors' `shapes` and optimizer `kind`'s
    schema (tlora.train.optim.state_schema): each tensor's dtype, shape and values, and step
    counts that agree with each other and do not exceed the checkpoint's `step`."""
    group_of = {i: g for g in groups for i in g["params"]}
    counts = set()
    for idx in sorted(state):
        s = state[idx]
        if idx >= len(shapes):
            raise _fail(
                path,
                f"state.{idx}",
                f"belongs to no trainable factor (the adapter has {len(shapes)} trainable factors)",
            )
        shape = shapes[idx]
        schema = state_schema(kind, group_of[idx], math.prod(shape))
        keys = {"step"} | set(schema)
        if set(s) != keys:
            missing, extra = sorted(keys - set(s)), sorted(set(s) - keys)
            what = ", ".join([f"missing {k}" for k in missing] + [f"unknown {k}" for k in extra])
            raise _fail(path, f"state.{idx}", f"{kind}'s state is {', '.join(sorted(keys))} ({what})")
        for key, (dtype, rule, nonneg) in sorted(schema.items()):
            t = s[key]
            if not isinstance(t, torch.Tensor):
                raise _fail(path, f"state.{idx}.{key}", f"must be a tensor, got {t!r}"[:300])
            allowed = {"factor": [shape], "flat": [(math.prod(shape),)], "flat_or_zero": [(math.prod(shape),), ()]}
            if rule is not None and tuple(t.shape) not in allowed[rule]:
                raise _fail(path, f"state.{idx}.{key}", f"has shape {tuple(t.shape)}, its factor {shape}")
            problem = _value_problem(key, t, dtype, nonneg)
            if problem:
                raise _fail(path, f"state.{idx}.{key}", problem)
        count = s["step"]
        if isinstance(count, torch.Tensor):
            if count.dim() != 0 or not count.dtype.is_floating_point:
                raise _fail(
                    path, f"state.{idx}.step", f"must be a 0-d float tensor, got {count.dtype} {tuple(count.shape)}"
                )
            count = float(count)
        if isinstance(count, bool) or not isinstance(count, (int, float)) or not math.isfinite(count):
            raise _fail(path, f"state.{idx}.step", f"must be a finite number, got {count!r}")
        if count != int(count) or not 1 <= count <= step:
            raise _fail(
                path,
                f"state.{idx}.step",
                f"is {count:g}: an optimizer step count is a whole number in 1..{step} (the checkpoint's step)",
            )
        counts.add(int(count))
    if len(counts) > 1:
        raise _fail(path, "state.*.step", f"the factors' step counts differ ({sorted(counts)}): they step together")


def load_checkpoint(
    ckpt: Path | Checkpoint,
    adapter: Adapter,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    process_index: int = 0,
    scheduler=None,
    ema=None,
    optimizer_name: str = "adamw",
) -> int:
    """Restore adapter weights, optimizer and RNG (this process's own, when the checkpoint has one
    per process) from `ckpt` (a folder, or its `read_checkpoint`); returns its step. Everything is
    read and checked before anything is restored; a checkpoint of another adapter or one missing a
    part is a CheckpointError."""
    cp = ckpt if isinstance(ckpt, Checkpoint) else read_checkpoint(ckpt)
    _check_fits(cp, adapter, optimizer, optimizer_name, ema is not None)
    state_file = cp.path / "state.safetensors"
    rng = cp.rng.get(f"rng.generator.{process_index}", cp.rng["rng.generator"])
    # Restore into copies first, so that a bad optimizer or RNG state changes nothing.
    saved_opt = optimizer.state_dict()
    saved_rng = generator.get_state()
    try:
        optimizer.load_state_dict({"state": cp.state, "param_groups": cp.groups})
        generator.set_state(rng)
        if scheduler is not None and cp.scheduler is not None:
            load_scheduler_state(scheduler, cp.scheduler)
    except (ValueError, RuntimeError, TypeError, KeyError, IndexError) as e:
        optimizer.load_state_dict(saved_opt)
        generator.set_state(saved_rng)
        raise _fail(state_file, None, f"cannot restore the optimizer or RNG state ({e})") from None
    own = adapter.state_dict()
    with torch.no_grad():
        for k, v in cp.adapter.tensors.items():
            own[k].copy_(v)
    if ema is not None:
        ema.load(cp.ema, cp.ema_step)
    return cp.step


def _check_fits(
    cp: Checkpoint, adapter: Adapter, optimizer: torch.optim.Optimizer, optimizer_name: str, ema: bool
) -> None:
    """Checkpoint `cp` belongs to this run: the adapter's settings and tensors, the optimizer
    (which one, its parameter groups, flags and factor shapes) and the EMA (CheckpointError otherwise)."""
    f, path = cp.adapter, cp.path
    if cp.optimizer != optimizer_name:
        raise CheckpointError(
            f"{path} was trained with --optimizer {cp.optimizer}, this run asks for {optimizer_name}: resume with "
            f"--optimizer {cp.optimizer}, or start a new run (--overwrite or another --out)"
        )
    if ema and cp.ema is None:
        raise CheckpointError(
            f"{path} has no EMA of the factors (its run had no --ema-decay): resume without --ema-decay, or "
            "start a new run (--overwrite or another --out)"
        )
    own, c = adapter.state_dict(), adapter.config
    for field in ("variant", "rank", "min_rank", "rank_exponent", *SCHEDULE_OPTIONS, "num_train_timesteps"):
        theirs, ours = getattr(f.config, field), getattr(c, field)
        if theirs != ours:
            raise CheckpointError(
                f"{path} was trained with {field} = {theirs!r}, this run asks for {ours!r}: "
                "resume with the checkpoint's setting, or start a new run (--overwrite or another --out)"
            )
    if set(f.tensors) != set(own) or any(tuple(f.tensors[k].shape) != tuple(v.shape) for k, v in own.items()):
        raise CheckpointError(f"{path} belongs to another adapter (different modules or variant)")

    state_file = path / "state.safetensors"
    live = optimizer.state_dict()["param_groups"]
    if [g["params"] for g in cp.groups] != [h["params"] for h in live]:
        raise _fail(state_file, "optimizer.param_groups", "do not match this run's optimizer (other parameter groups)")
    for i, (g, h) in enumerate(zip(cp.groups, live)):
        for key, value in g.items():
            # a flag of this run's optimizer must be the same flag in the checkpoint
            flag = isinstance(h.get(key), (bool, type(None)))
            if key in h and flag and (not isinstance(value, (bool, type(None))) or h[key] != value):
                raise _fail(
                    state_file,
                    f"optimizer.param_groups[{i}].{key}",
                    f"is {value!r}, this run's optimizer has {h[key]!r}",
                )
    # read_checkpoint checked the state against the file's factors; these are this run's.
    params = [p for h in optimizer.param_groups for p in h["params"]]
    group_of = {i: g for g in cp.groups for i in g["params"]}
    for idx, s in cp.state.items():
        schema = state_schema(cp.optimizer, group_of[idx], params[idx].numel())
        for key, t in s.items():
            if schema.get(key, (None, None))[1] == "factor" and tuple(t.shape) != tuple(params[idx].shape):
                raise _fail(
                    state_file,
                    f"state.{idx}.{key}",
                    f"has shape {tuple(t.shape)}, this run's factor {tuple(params[idx].shape)}",
                )
