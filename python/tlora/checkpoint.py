"""Training checkpoints: `checkpoint-N/` folders holding the adapter, the optimizer state, the RNG
state and the step, all as safetensors + JSON (never pickle).

A checkpoint is written into a temporary folder and renamed into place as a whole, so a folder
named `checkpoint-N` is always complete; a crash or a full disk leaves older checkpoints intact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from .adapter import Adapter
from .atomic import write_atomic
from .errors import CheckpointError
from .io import save as save_adapter
from .io import write_tensors

_NAME = re.compile(r"checkpoint-(\d+)$")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically."""
    write_atomic(path, json.dumps(data, indent=2))


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[list[tuple[str, torch.Tensor]], dict]:
    sd = opt.state_dict()
    tensors, scalars = [], {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors.append((f"state.{idx}.{key}", value.detach().cpu().contiguous()))
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save_checkpoint(
    out: Path,
    step: int,
    adapter: Adapter,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    extra: dict[str, Any],
    generator_states: list[torch.Tensor] | None = None,
) -> Path:
    """`generator_states`: under DDP, every process's generator state (index = process index), so
    that each process resumes its own random stream."""
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_adapter(adapter, tmp / "adapter.safetensors", extra=extra)
        tensors, meta = _optimizer_tensors(optimizer)
        tensors.append(("rng.generator", generator.get_state()))
        for i, state in enumerate(generator_states or []):
            tensors.append((f"rng.generator.{i}", state.cpu().contiguous()))
        write_tensors(tmp / "state.safetensors", tensors, {"optimizer": json.dumps(meta)})
        write_json(tmp / "state.json", {"step": step})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint; temporary folders of checkpoints cut short are removed."""
    for stale in out.glob(".checkpoint-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    found = [(int(m.group(1)), p) for p in out.glob("checkpoint-*") if (m := _NAME.search(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


def load_checkpoint(
    ckpt: Path, adapter: Adapter, optimizer: torch.optim.Optimizer, generator: torch.Generator, process_index: int = 0
) -> int:
    """Restore adapter weights, optimizer and RNG (this process's own, when the checkpoint has one
    per process) from `ckpt`; returns its step. Everything is read and checked before anything is
    restored; a checkpoint of another adapter or one missing a part is a CheckpointError."""
    from .io import read_adapter, read_raw

    f = read_adapter(ckpt / "adapter.safetensors")
    own, c = adapter.state_dict(), adapter.config
    for field in ("variant", "rank", "min_rank", "rank_exponent", "num_train_timesteps"):
        theirs, ours = getattr(f.config, field), getattr(c, field)
        if theirs != ours:
            raise CheckpointError(
                f"{ckpt} was trained with {field} = {theirs!r}, this run asks for {ours!r}: "
                "resume with the checkpoint's setting, or start a new run (--overwrite or another --out)"
            )
    if set(f.tensors) != set(own):
        raise CheckpointError(f"{ckpt} belongs to another adapter (different modules or variant)")

    state_file = ckpt / "state.safetensors"
    if not state_file.exists():
        raise CheckpointError(
            f"{ckpt} has no state.safetensors (optimizer and RNG state): it cannot be resumed exactly"
        )
    raw, meta = read_raw(state_file)
    state_tensors = dict(raw)
    try:
        opt_meta = json.loads(meta["optimizer"])
        groups, scalars = opt_meta["param_groups"], opt_meta["scalars"]
        if not isinstance(groups, list) or not isinstance(scalars, dict):
            raise TypeError("param_groups must be a list and scalars an object")
        state: dict[int, dict[str, Any]] = {}
        for key, value in state_tensors.items():
            if key.startswith("state."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        for key, value in scalars.items():
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = value
    except KeyError as e:
        raise CheckpointError(
            f"{state_file} has no optimizer state ({e.args[0]!r} missing): it cannot be resumed"
        ) from None
    except (TypeError, ValueError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"{state_file}: the optimizer state is malformed ({e})") from None
    rng = state_tensors.get(f"rng.generator.{process_index}", state_tensors.get("rng.generator"))
    if rng is None:
        raise CheckpointError(
            f"{state_file} has no RNG state (rng.generator): the run cannot continue the same random "
            "sequence; start a new run (--overwrite) instead"
        )
    try:
        step = json.loads((ckpt / "state.json").read_text())["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise TypeError(f"step must be an integer >= 0, got {step!r}")
    except (OSError, KeyError, TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(
            f"{ckpt / 'state.json'} does not hold the checkpoint's step ({type(e).__name__}: {e})"
        ) from None
    # Restore into copies first, so that a bad optimizer or RNG state changes nothing.
    saved_opt = optimizer.state_dict()
    saved_rng = generator.get_state()
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        generator.set_state(rng)
    except (ValueError, RuntimeError, TypeError, KeyError, IndexError) as e:
        optimizer.load_state_dict(saved_opt)
        generator.set_state(saved_rng)
        raise CheckpointError(f"{state_file}: cannot restore the optimizer or RNG state ({e})") from None
    with torch.no_grad():
        for k, v in f.tensors.items():
            own[k].copy_(v)
    return step
