"""Inputs for `tlora train` runs on the tiny offline pipelines, good and bad: the photo, the
argument list, and the faults (a decompression bomb, broken model_index.json files, a checkpoint
missing part of its state, a loss that turns NaN, masks and float images).

Used by tests/train/test_train.py and benches/badinput.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import load_file, save_file

TRAIN_FLAGS = [
    "--token",
    "sks",
    "--class-name",
    "dog",
    "--resolution",
    "16",
    "--rank",
    "4",
    "--lr",
    "3e-2",
    "--seed",
    "0",
]


def write_photo(path: Path) -> Path:
    """A 16x16 RGB photo: a yellow disc on a colour gradient."""
    y, x = np.mgrid[0:16, 0:16]
    a = np.zeros((16, 16, 3), np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = x * 16, y * 16, 90
    a[(x - 8) ** 2 + (y - 8) ** 2 < 20] = (255, 255, 0)
    Image.fromarray(a).save(path)
    return path


def train_args(model: Path, image: Path, out: Path, steps: int, every: int, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        str(model),
        "--image",
        str(image),
        "--out",
        str(out),
        *TRAIN_FLAGS,
        "--steps",
        str(steps),
        "--checkpoint-every",
        str(every),
        *extra,
    ]


def set_flag(args: list[str], flag: str, value: str) -> list[str]:
    """`args` with `flag` set to `value`: replaced where present, else appended (in place)."""
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


def write_bomb(path: Path, side: int) -> Path:
    Image.new("1", (side, side)).save(path)  # a few kB on disk, side^2 pixels when decoded
    return path


# model_index.json rewritten from its parsed content.
BROKEN_MODEL_INDEX: dict[str, Callable[[dict], str]] = {
    "index is a list": lambda spec: json.dumps([spec]),
    "class name is a list": lambda spec: json.dumps({**spec, "_class_name": [spec["_class_name"]]}),
    "sd labelled sdxl": lambda spec: json.dumps({**spec, "_class_name": "StableDiffusionXLPipeline"}),
    "index not json": lambda spec: "{" + json.dumps(spec),
}


def break_model_index(model: Path, case: str) -> None:
    """Rewrites the model folder's model_index.json as BROKEN_MODEL_INDEX[case] says."""
    index = model / "model_index.json"
    index.write_text(BROKEN_MODEL_INDEX[case](json.loads(index.read_text())))


def _metadata(path: Path) -> dict:
    with open(path, "rb") as f:
        return json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]


def drop_checkpoint_state(state: Path, drop: str) -> None:
    """Rewrites a checkpoint's state.safetensors without its RNG state (drop="rng"), its
    optimizer state (drop="optimizer") or its checksum (drop="checksum", as an older tlora wrote it)."""
    meta = _metadata(state)
    tensors = load_file(str(state))
    if drop == "rng":
        tensors = {k: v for k, v in tensors.items() if not k.startswith("rng.")}
    elif drop == "checksum":
        del meta["checksum"]
    else:
        meta = {}
    save_file(tensors, str(state), metadata=meta)


def optimizer_lrs(state: Path) -> list[float]:
    """The learning rate of each parameter group in a checkpoint's state.safetensors."""
    return [g["lr"] for g in json.loads(_metadata(state)["optimizer"])["param_groups"]]


def nan_on_call(loss_fn: Callable, n: int) -> Callable:
    """`loss_fn` whose n-th call (from 1) returns NaN."""
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = loss_fn(*args, **kwargs)
        return loss * float("nan") if len(calls) == n else loss

    return poisoned


def write_array(path: Path, a: np.ndarray, mode: str | None = None) -> Path:
    """An image file of array `a` (PIL's mode for it unless `mode` is given)."""
    Image.fromarray(a, mode).save(path)
    return path


def disc(side: int, radius: float) -> np.ndarray:
    """A centred disc of `radius` px in a side x side boolean array."""
    y, x = np.mgrid[0:side, 0:side]
    return (x - (side - 1) / 2) ** 2 + (y - (side - 1) / 2) ** 2 < radius**2
