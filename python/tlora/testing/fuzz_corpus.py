"""A deterministic corpus of corrupted adapter files, built from one valid tlora file, and the
readers to run each file through; and one of corrupted training checkpoints (resume_cases), with
what runs and judges a resume of each.

Used by tests/files/test_fuzz.py and benches/badinput.py. Building the corpus uses only `tlora.inject`,
`tlora.save` and the safetensors package (so that it runs against older tlora versions too); the
checksum of rewritten files is recomputed here independently, as tlora.files.io documents it (sha256 of
the description without "checksum" as sorted-key JSON, then per tensor sorted by name: JSON
[name, dtype, shape] and the stored bytes).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import random
import shutil
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

RANK = 4


class Attn(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)


class FuzzModel(nn.Module):
    """Two attention blocks under `blocks.*.attn`, called with (x, timestep) like a denoiser."""

    def __init__(self, dim: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Module() for _ in range(2)])
        for b in self.blocks:
            b.attn = Attn(dim)

    def forward(self, x, timestep=None):
        for b in self.blocks:
            x = b.attn.to_q(x) + b.attn.to_k(x)
        return x


@dataclass
class Case:
    name: str
    data: bytes
    # True: every reader must refuse it; False: it must load (exactly); None: either, but a load
    # must give exactly the valid file's tensors and settings.
    must_fail: bool | None
    kind: str  # "tlora" (a tlora file), "foreign" (reference / LyCORIS layout)


def valid_file(path: Path) -> Path:
    import tlora

    model = FuzzModel()
    adapter = tlora.inject(model, rank=RANK, lora_alpha=2.0, target_modules=["to_q", "to_k"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    tlora.save(model, path, extra={"token": "sks", "class_name": "dog"})
    adapter.remove()
    return path


def checksum(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _parts(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = st_load(data)
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return tensors, json.loads(header["__metadata__"]["tlora"])


def _write(tensors: dict[str, torch.Tensor], meta: Any, restamp: bool, raw: str | None = None) -> bytes:
    """Safetensors bytes with `meta` as the tlora description; `restamp`: recompute the checksum
    (when the valid file has one) so that the checks behind it are reached."""
    if raw is None:
        if restamp and isinstance(meta, dict) and "checksum" in meta:
            meta = dict(meta, checksum=checksum(tensors, meta))
        raw = json.dumps(meta)
    return st_save({k: v.contiguous().clone() for k, v in tensors.items()}, metadata={"tlora": raw})


def build(valid: bytes) -> list[Case]:
    """The corpus of corrupted adapter files made from `valid`. Long on purpose: a table of cases,
    one or two lines each, grouped by the part of the file they break; split up, the corpus would
    no longer read as one list."""
    rng = random.Random(1234)
    tensors, meta = _parts(valid)
    header_len = int.from_bytes(valid[:8], "little")
    cases: list[Case] = []

    def add(name, data, must_fail, kind="tlora"):
        cases.append(Case(name, data, must_fail, kind))

    # Truncations: inside the length prefix, the header and the data.
    cuts = sorted(
        {
            0,
            1,
            4,
            7,
            8,
            9,
            16,
            8 + header_len // 2,
            8 + header_len - 1,
            8 + header_len,
            8 + header_len + 1,
            len(valid) - 1,
            len(valid) - 4,
        }
        | {rng.randrange(1, len(valid)) for _ in range(30)}
    )
    for n in cuts:
        add(f"truncated at {n}", valid[:n], True)
    # Byte flips in the header (JSON, metadata) and in the tensor data.
    for _i in range(70):
        pos = rng.randrange(0, 8 + header_len)
        b = bytearray(valid)
        b[pos] ^= rng.randrange(1, 256)
        add(f"header byte {pos} flipped", bytes(b), None)
    for _i in range(70):
        pos = rng.randrange(8 + header_len, len(valid))
        b = bytearray(valid)
        b[pos] ^= 1 << rng.randrange(8)
        add(f"data byte {pos} flipped", bytes(b), True)
    # Appended junk and a header length pointing past the end.
    add("junk appended", valid + b"\0" * 13, None)
    add("header length huge", (2**62).to_bytes(8, "little") + valid[8:], True)

    # Malformed descriptions, each with a stale and with a recomputed checksum.
    def edit(name: str, change: Callable[[dict], Any], must_fail=True, restamps=(False, True)):
        """`change` edits the description in place, or returns ("replace", new description)."""
        for restamp in restamps:
            m = copy.deepcopy(meta)
            new = change(m)
            m = new[1] if isinstance(new, tuple) else m
            add(f"{name} ({'restamped' if restamp else 'stale checksum'})", _write(tensors, m, restamp), must_fail)

    def setter(path: list, value):
        def change(m):
            target = m
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value

        return change

    def deleter(path: list):
        def change(m):
            target = m
            for key in path[:-1]:
                target = target[key]
            del target[path[-1]]

        return change

    for value in ([1, 2], "adapter", 42, None, True):
        edit(f"metadata is {type(value).__name__}", lambda m, v=value: ("replace", v))
    for key in ("format_version", "config", "modules", "base_model"):
        edit(f"{key} missing", deleter([key]))
    for value in (True, "1", 1.0, 2, 0, None, [1]):
        edit(f"format_version {value!r}", setter(["format_version"], value))
    for key in ("config", "modules"):
        for value in ([], "x", 3, None):
            edit(f"{key} is {value!r}", setter([key], value))
    edit("modules empty", setter(["modules"], {}))
    first = next(iter(meta["modules"]))
    for value in (
        None,
        [32],
        [16, "16"],
        [16, 16.0],
        [True, 16],
        [0, 16],
        [-1, 16],
        [16, 16, 16],
        "16x16",
        [10**30, 16],
        [2, 2],
    ):
        edit(f"module shape {value!r}", setter(["modules", first], value))
    edit("module name empty", lambda m: m.update(modules={"" if k == first else k: v for k, v in m["modules"].items()}))
    for key, value in (
        ("scale", "1"),
        ("scale", 2.0),
        ("scale", float("nan")),
        ("scale", -0.5),
        ("timestep_scale", "x"),
        ("timestep_scale", float("inf")),
        ("timestep_scale", 0),
        ("base_model", 5),
        ("base_model", None),
        ("checksum", 5),
        ("checksum", "md5:00"),
        ("checksum", "sha256:" + "0" * 64),
    ):
        edit(f"{key} {value!r}", setter([key], value), restamps=(False,) if key == "checksum" else (False, True))
    for key, value in (
        ("rank", True),
        ("rank", "4"),
        ("rank", 4.0),
        ("rank", 1e400),
        ("rank", 0),
        ("rank", 8),
        ("rank", 10**400),
        ("rank", 2**70),
        ("min_rank", "1e400"),
        ("min_rank", 9),
        ("min_rank", 0),
        ("rank_exponent", float("inf")),
        ("rank_exponent", 0),
        ("rank_exponent", "1"),
        ("rank_schedule", "linear"),
        ("rank_schedule", None),
        ("rank_boundary", 0),
        ("rank_boundary", 1.5),
        ("rank_boundary", "0.5"),
        ("rank_scaling", "alpha"),
        ("rank_scaling", True),
        ("lora_alpha", float("inf")),
        ("lora_alpha", float("nan")),
        ("lora_alpha", -1),
        ("seed", "x"),
        ("seed", 1.5),
        ("seed", None),
        ("seed", 10**30),
        ("variant", "dora"),
        ("variant", 5),
        ("variant", "lora"),
        ("init", []),
        ("num_train_timesteps", True),
        ("num_train_timesteps", 0),
        ("timestep_scale", float("nan")),
        ("target_modules", 5),
        ("target_modules", [1, 2]),
        ("num_train_timesteps", 10**40),
        ("extra", []),
    ):
        edit(f"config.{key} {str(value)[:20]}", setter(["config", key], value))
    for raw in (
        "{not json",
        "",
        "[" * 100_000 + "]" * 100_000,
        '{"a":' * 50_000 + "1" + "}" * 50_000,
        "\x00\x01",
        json.dumps(meta)[:-1],
        '{"format_version": 1e400}',
    ):
        add(f"raw metadata {raw[:12]!r}... ({len(raw)} chars)", _write(tensors, None, False, raw=raw), True)
    add("no tlora metadata", st_save(tensors), True)

    # Tensors: other dtypes (floats convert with a warning, integers are refused), shapes, values.
    names = sorted(tensors)
    for name in (names[0], names[2]):
        for dtype in (torch.float16, torch.bfloat16, torch.float64):
            t = dict(tensors, **{name: tensors[name].to(dtype)})
            add(f"{name} as {dtype} (restamped)", _write(t, meta, True), False)
            add(f"{name} as {dtype} (stale checksum)", _write(t, meta, False), True)
        for dtype in (torch.int64, torch.int32, torch.uint8, torch.int8, torch.bool):
            t = dict(tensors, **{name: tensors[name].to(dtype)})
            add(f"{name} as {dtype}", _write(t, meta, True), True)
    for name in names:
        t0 = tensors[name]
        shapes = {
            "0-d": t0.reshape(-1)[0].clone(),
            "empty": t0.reshape(-1)[:0].clone(),
            "one more row": torch.cat([t0, t0[:1]]),
            "flattened": t0.reshape(-1).clone(),
        }
        if t0.dim() == 2:
            shapes["transposed"] = t0.t().contiguous()
        else:
            shapes["as a row"] = t0[None].clone()
        for label, new in shapes.items():
            if tuple(new.shape) == tuple(t0.shape):
                continue
            add(f"{name} {label} {tuple(new.shape)}", _write(dict(tensors, **{name: new}), meta, True), True)
        for value in (float("nan"), float("inf"), float("-inf"), 1e38):
            new = t0.clone()
            new.reshape(-1)[rng.randrange(new.numel())] = value
            add(f"{name} holds {value}", _write(dict(tensors, **{name: new}), meta, True), True)
    add("tensor missing", _write({k: v for k, v in tensors.items() if k != names[1]}, meta, True), True)
    add("tensor extra", _write(dict(tensors, **{"blocks.0.attn.to_v.q": tensors[names[0]].clone()}), meta, True), True)
    add("tensor renamed", _write({(k + "x" if k == names[3] else k): v for k, v in tensors.items()}, meta, True), True)
    cases += semantic_cases(tensors, meta)
    cases += foreign_cases(tensors, meta)
    return cases


def semantic_cases(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> list[Case]:
    """Well-typed descriptions that cannot run, re-signed with a valid checksum so that the checks
    of meaning behind it are reached; and integers too long for Python's int() (4300 digits)."""
    cases = []

    def add(name, m):
        cases.append(Case(f"semantic {name}", _write(tensors, m, True), True, "tlora"))

    for key, value in (("num_train_timesteps", 1), ("target_modules", "("), ("target_modules", "to_[qk")):
        add(f"config.{key} {value!r}", {**meta, "config": {**meta["config"], key: value}})
    # A diffusers class whose modules these are not (FLUX has no `blocks`): exports would carry
    # `transformer.blocks...` keys that no pipeline finds.
    add("base_model FluxTransformer2DModel", {**meta, "base_model": "FluxTransformer2DModel"})
    add("base_model UNet2DConditionModel", {**meta, "base_model": "UNet2DConditionModel"})
    huge = {
        "format_version": lambda m: m.update(format_version="HUGE"),
        "config.rank": lambda m: m["config"].update(rank="HUGE"),
        "config.extra.token": lambda m: m["config"]["extra"].update(token="HUGE"),
        "a module shape": lambda m: m["modules"][next(iter(m["modules"]))].__setitem__(0, "HUGE"),
    }
    for where, put in huge.items():
        m = copy.deepcopy(meta)
        put(m)
        data = _write(tensors, None, False, raw=json.dumps(m).replace('"HUGE"', "9" * 5000))
        cases.append(Case(f"semantic 5000-digit integer in {where}", data, True, "tlora"))
    return cases


def foreign_cases(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> list[Case]:
    """Reference-code and LyCORIS layouts of the same factors, valid and broken."""
    ref, lyco = {}, {}
    names = {k.rsplit(".", 1)[0] for k in tensors}
    for n in sorted(names):
        attn, proj = n.rsplit(".", 1)
        stem = f"{attn}.processor.{proj}_lora"
        f = {k: tensors[f"{n}.{k}"] for k in ("p", "lam", "q", "p0", "lam0", "q0")}
        ref.update(
            {
                f"{stem}.q_layer.weight": f["q"],
                f"{stem}.p_layer.weight": f["p"],
                f"{stem}.lambda_layer": f["lam"][None],
                f"{stem}.base_q.weight": f["q0"],
                f"{stem}.base_p.weight": f["p0"],
                f"{stem}.base_lambda": f["lam0"][None],
            }
        )
        ly = "lycoris_" + n.replace(".", "_")
        lyco.update(
            {
                f"{ly}.q_layer.weight": f["q"],
                f"{ly}.p_layer.weight": f["p"],
                f"{ly}.lambda_layer": f["lam"],
                f"{ly}.base_q": f["q0"],
                f"{ly}.base_p": f["p0"],
                f"{ly}.base_lambda": f["lam0"],
                f"{ly}.alpha": torch.tensor(2.0),
            }
        )
    cases = []
    settings = {"min_rank": str(meta["config"]["min_rank"])}

    def add(name, t, md=settings, must_fail=True):
        cases.append(Case(name, st_save({k: v.contiguous() for k, v in t.items()}, metadata=md), must_fail, "foreign"))

    for label, layout in (("reference", ref), ("lycoris", lyco)):
        add(f"{label} valid", layout, must_fail=False)
        q_key = next(k for k in layout if k.endswith("q_layer.weight"))
        lam_key = next(k for k in layout if k.endswith("lambda_layer"))
        add(f"{label} 0-d q", dict(layout, **{q_key: torch.tensor(1.0)}))
        add(f"{label} 0-d lambda", dict(layout, **{lam_key: torch.tensor(1.0)}))
        add(f"{label} empty lambda", dict(layout, **{lam_key: torch.zeros(0)}))
        add(f"{label} NaN in q", dict(layout, **{q_key: layout[q_key].clone().fill_(float("nan"))}))
        add(f"{label} 1e38 in q", dict(layout, **{q_key: layout[q_key].clone().fill_(1e38)}))
        add(f"{label} int64 q", dict(layout, **{q_key: layout[q_key].long()}))
        add(f"{label} min_rank 1e400", layout, {"min_rank": "1e400"})
        add(f"{label} min_rank nan", layout, {"min_rank": "nan"})
        add(f"{label} min_rank 1.5", layout, {"min_rank": "1.5"})
        add(f"{label} min_rank 99", layout, {"min_rank": "99"})
        add(f"{label} rank_exponent inf", layout, {**settings, "rank_exponent": "inf"})
        add(f"{label} num_train_timesteps x", layout, {**settings, "num_train_timesteps": "x"})
    alpha_key = next(k for k in lyco if k.endswith(".alpha"))
    add("lycoris empty alpha", dict(lyco, **{alpha_key: torch.zeros(0)}))
    add("lycoris NaN alpha", dict(lyco, **{alpha_key: torch.tensor(float("nan"))}))
    add("lycoris negative alpha", dict(lyco, **{alpha_key: torch.tensor(-1.0)}))
    add("lycoris bool alpha", dict(lyco, **{alpha_key: torch.tensor(True)}))
    return cases


def file_tensors(path: Path) -> dict[str, torch.Tensor]:
    """An independent read of a file's tensors (safetensors' own reader), as float32."""
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).float() for k in f.keys()}


# ---- running the readers ----------------------------------------------------------------------

READERS = ("load", "read", "info", "export", "import")


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """`tlora ARGS` in this process with its output captured: (exit code, stderr, stdout)."""
    from tlora import cli

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = cli.main(args)
    return rc, err.getvalue(), out.getvalue()


def run_reader(reader: str, path: Path, model: nn.Module, out_dir: Path):
    """One of READERS on the file at `path`: load or import into `model`, read, export into
    `out_dir`, or `tlora info` (which returns (exit code, stderr))."""
    import tlora
    from tlora.files.export import export, import_file

    if reader == "load":
        return tlora.load(model, path)
    if reader == "read":
        return tlora.read(path)
    if reader == "info":
        rc, err, _ = run_cli(["info", str(path)])
        return rc, err
    if reader == "export":
        return export(path, out_dir / f"{path.stem}-export.safetensors")
    adapter, _ = import_file(path, model, out_dir / f"{path.stem}-import.safetensors")
    return adapter


def run_in_thread(fn: Callable, *args, timeout: float) -> dict:
    """fn(*args) in a daemon thread, its warnings recorded: {"result": ..., "warnings": [messages]}
    or {"error": the exception}, with "hang": True when it did not return within `timeout` s."""
    box: dict = {}

    def target():
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                box["result"] = fn(*args)
            box["warnings"] = [str(w.message) for w in caught]
        except BaseException as e:  # noqa: BLE001 - recorded and judged by the caller
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        box["hang"] = True
    return box


# ---- resume state: corrupted training checkpoints (`tlora train --resume`) --------------------
#
# Each case edits a copy of a finished run folder (tiny SD, 2 steps, checkpoints 1 and 2; made by
# the caller with tests/train_inputs.py) in one place: checkpoint-2's state.safetensors, state.json
# or adapter.safetensors, or the run's config.json or loss.jsonl. `file` is the edited file (the
# refusal must name it). Edits of state.safetensors are "restamped" (its checksum recomputed here,
# as tlora.train.checkpoint documents it: the adapter files' scheme over its metadata strings) so that the
# checks behind the checksum are reached, unless the case says "stale checksum".


@dataclass
class ResumeCase:
    name: str
    file: str  # the edited file, relative to the run folder
    apply: Callable[[Path], None]  # edits the run folder in place
    # True: --resume must refuse it (exit 2, one line naming `file`, the folder untouched);
    # False: --resume must continue the run.
    must_fail: bool = True


STATE = "checkpoint-2/state.safetensors"
STEP_FILE = "checkpoint-2/state.json"
CKPT_ADAPTER = "checkpoint-2/adapter.safetensors"


def _header(data: bytes) -> tuple[int, dict]:
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8 : 8 + n])


def _edit_state(change: Callable[[dict, dict], Any], restamp: bool = True) -> Callable[[Path], None]:
    """An edit of state.safetensors: `change(tensors, strings)` edits the tensors and metadata
    strings in place; the checksum is recomputed when `restamp` (and the file has one)."""

    def apply(run: Path) -> None:
        path = run / STATE
        data = path.read_bytes()
        tensors = st_load(data)
        strings = dict(_header(data)[1].get("__metadata__", {}))
        change(tensors, strings)
        if restamp and "checksum" in strings:
            strings["checksum"] = checksum(tensors, strings)
        path.write_bytes(st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=strings))

    return apply


def _edit_optimizer(change: Callable[[dict], Any]) -> Callable[[Path], None]:
    """An edit of the optimizer description (parsed JSON; `change` edits it in place or returns
    ("replace", new text)), restamped."""

    def strings_change(tensors, strings):
        meta = json.loads(strings["optimizer"])
        new = change(meta)
        strings["optimizer"] = new[1] if isinstance(new, tuple) else json.dumps(meta)

    return _edit_state(strings_change)


def _put(rel: str, data: bytes | str) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        path = run / rel
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    return apply


def _edit_json(rel: str, change: Callable[[Any], Any]) -> Callable[[Path], None]:
    """An edit of a JSON file: `change(data)` edits it in place or returns ("replace", new data)."""

    def apply(run: Path) -> None:
        path = run / rel
        data = json.loads(path.read_text())
        new = change(data)
        path.write_text(json.dumps(new[1] if isinstance(new, tuple) else data))

    return apply


def _set(*keys_value):
    *keys, value = keys_value

    def change(d):
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value

    return change


def _drop(*keys):
    def change(d):
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]

    return change


def resume_cases(run: Path) -> list[ResumeCase]:
    """The corpus for the run folder `run` (read to size the truncations). Long on purpose, as
    `build`: a table of cases, grouped by the file of the checkpoint they break."""
    rng = random.Random(4321)
    cases: list[ResumeCase] = []

    def add(name, file, apply, must_fail=True):
        cases.append(ResumeCase(name, file, apply, must_fail))

    state = (run / STATE).read_bytes()
    header_len, header = _header(state)
    for n in sorted({0, 4, 8, 9, 8 + header_len // 2, 8 + header_len, 8 + header_len + 7, len(state) - 1}):
        add(f"state truncated at {n}", STATE, _put(STATE, state[:n]))
    for _ in range(8):
        b = bytearray(state)
        pos = rng.randrange(8 + header_len, len(state))
        b[pos] ^= 1 << rng.randrange(8)
        add(f"state data byte {pos} flipped", STATE, _put(STATE, bytes(b)))
    start = state.index(b'"optimizer"')
    for _ in range(4):
        b = bytearray(state)
        pos = rng.randrange(start + 14, start + 200)
        b[pos] = ord("7") if b[pos] != ord("7") else ord("8")
        add(f"state metadata byte {pos} changed", STATE, _put(STATE, bytes(b)))

    # The moments: values, dtypes, shapes (restamped).
    def tensor_edit(key, fn):
        return _edit_state(lambda t, s: t.__setitem__(key, fn(t[key])))

    def poke(value):
        def fn(x):
            x = x.clone()
            x.reshape(-1)[0] = value
            return x

        return fn

    for key in ("state.0.exp_avg_sq", "state.4.exp_avg"):
        for value in (float("nan"), float("inf"), float("-inf")):
            add(f"{key} holds {value}", STATE, tensor_edit(key, poke(value)))
    add("state.0.exp_avg_sq negative", STATE, tensor_edit("state.0.exp_avg_sq", poke(-1e-3)))
    add("state.1.exp_avg_sq all -1", STATE, tensor_edit("state.1.exp_avg_sq", lambda x: -torch.ones_like(x)))
    add(
        "state.0.exp_avg_sq NaN (stale checksum)",
        STATE,
        _edit_state(
            lambda t, s: t.__setitem__("state.0.exp_avg_sq", poke(float("nan"))(t["state.0.exp_avg_sq"])), restamp=False
        ),
    )
    for dtype in (torch.float64, torch.float16, torch.bfloat16, torch.int64):
        add(f"state.0.exp_avg as {dtype}", STATE, tensor_edit("state.0.exp_avg", lambda x, d=dtype: x.to(d)))
    add("state.0.exp_avg transposed", STATE, tensor_edit("state.0.exp_avg", lambda x: x.t().contiguous()))
    add("state.0.exp_avg one more row", STATE, tensor_edit("state.0.exp_avg", lambda x: torch.cat([x, x[:1]])))
    add("state.2.exp_avg_sq flattened", STATE, tensor_edit("state.2.exp_avg_sq", lambda x: x.reshape(-1).clone()))
    add("state.1.exp_avg 0-d", STATE, tensor_edit("state.1.exp_avg", lambda x: x.reshape(-1)[0].clone()))
    add(
        "state.0 and state.1 swapped",
        STATE,
        _edit_state(
            lambda t, s: t.update(
                {
                    "state.0.exp_avg": t["state.1.exp_avg"],
                    "state.0.exp_avg_sq": t["state.1.exp_avg_sq"],
                    "state.1.exp_avg": t["state.0.exp_avg"],
                    "state.1.exp_avg_sq": t["state.0.exp_avg_sq"],
                }
            )
        ),
    )
    # Step counts: the checkpoint is at step 2, every factor at 2.
    for value in (0.0, -1.0, 2.5, 3.0, float("nan"), 1e30):
        add(f"state.0.step {value}", STATE, tensor_edit("state.0.step", lambda x, v=value: torch.tensor(v)))
    add("state.3.step 1 (others 2)", STATE, tensor_edit("state.3.step", lambda x: torch.tensor(1.0)))
    add("state.0.step as int64", STATE, tensor_edit("state.0.step", lambda x: x.long()))
    add("state.0.step of shape (1,)", STATE, tensor_edit("state.0.step", lambda x: x.reshape(1).clone()))
    # Keys.
    add("state.0.exp_avg missing", STATE, _edit_state(lambda t, s: t.pop("state.0.exp_avg")))
    add("state.0.step missing", STATE, _edit_state(lambda t, s: t.pop("state.0.step")))
    add("state.0.foo extra", STATE, _edit_state(lambda t, s: t.__setitem__("state.0.foo", torch.zeros(2))))
    add(
        "state.999 beyond the factors",
        STATE,
        _edit_state(
            lambda t, s: t.update(
                {f"state.999.{k}": t[f"state.0.{k}"].clone() for k in ("step", "exp_avg", "exp_avg_sq")}
            )
        ),
    )
    add("state.x.step", STATE, _edit_state(lambda t, s: t.__setitem__("state.x.step", torch.tensor(2.0))))
    add("state.00.step", STATE, _edit_state(lambda t, s: t.__setitem__("state.00.step", t.pop("state.0.step"))))
    add("unknown tensor", STATE, _edit_state(lambda t, s: t.__setitem__("extra", torch.zeros(1))))
    # The RNG state.
    add("rng.generator missing", STATE, _edit_state(lambda t, s: t.pop("rng.generator")))
    add("rng.generator cut to 100 bytes", STATE, tensor_edit("rng.generator", lambda x: x[:100].clone()))
    add("rng.generator as float32", STATE, tensor_edit("rng.generator", lambda x: x.float()))
    add(
        "rng.generator.0 of the wrong size",
        STATE,
        _edit_state(lambda t, s: t.__setitem__("rng.generator.0", torch.zeros(7, dtype=torch.uint8))),
    )
    # The metadata strings.
    add("optimizer metadata missing", STATE, _edit_state(lambda t, s: s.pop("optimizer")))
    add("step metadata 7", STATE, _edit_state(lambda t, s: s.__setitem__("step", "7")))
    add(
        "checksum wrong",
        STATE,
        _edit_state(lambda t, s: s.__setitem__("checksum", "sha256:" + "0" * 64), restamp=False),
    )
    # pop(.., None): these two also apply to an older tlora's checkpoint (benches/badinput.py runs them).
    add(
        "checksum removed and a NaN moment",
        STATE,
        _edit_state(
            lambda t, s: (s.pop("checksum", None), t["state.0.exp_avg_sq"].reshape(-1).__setitem__(0, float("nan")))
        ),
    )
    old_checkpoint = _edit_state(lambda t, s: s.pop("checksum", None))
    add("checksum removed (an older tlora's checkpoint)", STATE, old_checkpoint, False)
    # The optimizer description.
    for text in ("{not json", "[1, 2]", "null", '"x"', "[" * 100_000 + "]" * 100_000):
        add(f"optimizer metadata {text[:12]!r}", STATE, _edit_optimizer(lambda m, x=text: ("replace", x)))
    add("param_groups missing", STATE, _edit_optimizer(_drop("param_groups")))
    add("scalars missing", STATE, _edit_optimizer(_drop("scalars")))
    for value in ([], [5], "x", None, [{}]):
        add(f"param_groups {value!r}", STATE, _edit_optimizer(_set("param_groups", value)))
    for key, value in (
        ("params", None),
        ("params", [0, 0, 1, 2, 3, 4, 5]),
        ("params", [1, 2, 3]),
        ("params", ["0"]),
        ("params", [True]),
        ("params", list(range(1000))),
        ("lr", float("nan")),
        ("lr", -1),
        ("lr", "x"),
        ("lr", 1e9),
        ("lr", True),
        ("betas", [0.9]),
        ("betas", [1.0, 0.999]),
        ("betas", [0.9, float("inf")]),
        ("betas", "x"),
        ("eps", 0),
        ("eps", -1e-8),
        ("weight_decay", -1),
        ("weight_decay", float("inf")),
        ("amsgrad", "yes"),
        ("amsgrad", True),  # then every factor lacks max_exp_avg_sq
        ("foreach", 5),
        ("maximize", True),  # a flag this run's optimizer does not have
        ("decoupled_weight_decay", False),
    ):
        add(f"param_groups[0].{key} {str(value)[:20]}", STATE, _edit_optimizer(_set("param_groups", 0, key, value)))
    for key in ("lr", "betas", "eps", "weight_decay", "params"):
        add(f"param_groups[0].{key} missing", STATE, _edit_optimizer(_drop("param_groups", 0, key)))
    for value in ([], "x", {"0.step": "x"}, {"x": 1}, {"0.step": 2}, {"0.foo": 1}, {"999.step": 2}):
        add(f"scalars {str(value)[:20]}", STATE, _edit_optimizer(_set("scalars", value)))

    # state.json: the step.
    for value in (10**10, -1, 0, 3, "2", True, 2.0, None, [2]):
        add(f"state.json step {value!r}", STEP_FILE, _edit_json(STEP_FILE, _set("step", value)))
    add("state.json step missing", STEP_FILE, _edit_json(STEP_FILE, _drop("step")))
    for data in ("[2]", "2", "{not json", "", b"\xff\xfe\x00garbage", "[" * 100_000 + "]" * 100_000):
        add(f"state.json holds {str(data)[:12]!r}", STEP_FILE, _put(STEP_FILE, data))
    add("state.json deleted", STEP_FILE, lambda r: (r / STEP_FILE).unlink())
    add("state.json a folder", STEP_FILE, lambda r: ((r / STEP_FILE).unlink(), (r / STEP_FILE).mkdir()))

    # The checkpoint's adapter file (its own format and checksum: the adapter corpus covers it).
    adapter = (run / CKPT_ADAPTER).read_bytes()
    add("checkpoint adapter truncated", CKPT_ADAPTER, _put(CKPT_ADAPTER, adapter[: len(adapter) // 2]))
    b = bytearray(adapter)
    b[-3] ^= 0x10
    add("checkpoint adapter data byte flipped", CKPT_ADAPTER, _put(CKPT_ADAPTER, bytes(b)))
    add("checkpoint adapter deleted", CKPT_ADAPTER, lambda r: (r / CKPT_ADAPTER).unlink())

    # config.json: sections and the settings --resume compares.
    cfg = "config.json"
    for section in ("train", "adapter"):
        for value in ([1], "x", None, 3):
            add(f"config {section} is {value!r}", cfg, _edit_json(cfg, _set(section, value)))
        add(f"config {section} missing", cfg, _edit_json(cfg, _drop(section)))
    for key, value in (
        ("model", 5),
        ("model", ""),
        ("token", None),
        ("class_name", ["dog"]),
        ("resolution", "16"),
        ("resolution", 0),
        ("seed", "0"),
        ("seed", -1),
        ("seed", 1.5),
        ("seed", True),
        ("timestep_sampling", "cosmap"),
        ("shift", 0),
        ("shift", "x"),
        ("validation_prompts", "a {}"),
        ("validation_prompts", [1]),
        ("validation_steps", 0),
    ):
        add(f"config train.{key} {value!r}", cfg, _edit_json(cfg, _set("train", key, value)))
    for key in ("model", "seed"):
        add(f"config train.{key} missing", cfg, _edit_json(cfg, _drop("train", key)))
    for key in ("timestep_sampling", "validation_prompts"):  # a run from before the setting: its default
        add(f"config train.{key} missing", cfg, _edit_json(cfg, _drop("train", key)), False)
    for key, value in (
        ("rank", "4"),
        ("rank", 0),
        ("rank", 4.0),
        ("min_rank", 99),
        ("variant", "dora"),
        ("rank_exponent", float("nan")),
        ("rank_schedule", "linear"),
        ("rank_scaling", "alpha"),
        ("target_modules", 5),
    ):
        add(f"config adapter.{key} {value!r}", cfg, _edit_json(cfg, _set("adapter", key, value)))
    for key in ("rank", "variant"):
        add(f"config adapter.{key} missing", cfg, _edit_json(cfg, _drop("adapter", key)))
    for data in ("[1]", "{not json", "", b"\xff\xfe\x00garbage", "[" * 100_000 + "]" * 100_000):
        add(f"config.json holds {str(data)[:12]!r}", cfg, _put(cfg, data))

    # loss.jsonl: every line a {step, loss, seconds} object, steps increasing.
    log = "loss.jsonl"
    first, second = (run / log).read_text().splitlines()
    for line in (
        "[1, 2]",
        '{"loss": 1}',
        '{"step": 1}',
        "garbage",
        '{"step": "1", "loss": 1}',
        '{"step": true, "loss": 1}',
        '{"step": 0, "loss": 1}',
        '{"step": 1, "loss": NaN}',
        '{"step": 1, "loss": "x"}',
        '{"step": 1, "loss": -1}',
        '{"step": 1, "loss": 1, "seconds": -1}',
        "[" * 100_000 + "]" * 100_000,
    ):
        add(f"loss.jsonl line {line[:24]!r}", log, _put(log, f"{line}\n{second}\n"))
    add("loss.jsonl steps decrease", log, _put(log, f"{second}\n{first}\n"))
    add("loss.jsonl step repeated", log, _put(log, f"{first}\n{first}\n"))
    add("loss.jsonl binary", log, _put(log, first.encode() + b"\n\xff\xfe garbage\n"))
    add("loss.jsonl last line cut short", log, _put(log, f"{first}\n{second}\n{second[:9]}"), False)
    return cases


# ---- running a resume case ---------------------------------------------------------------------

RESUME_STEPS = 3  # --resume of the finished 2-step run trains on to step 3


def train_finished_run(root: Path) -> tuple[Path, Path, Path]:
    """(model folder, photo, run folder) under `root`: the tiny SD pipeline and a finished 2-step
    run of it with checkpoints 1 and 2, the run that resume_cases edits."""
    from tlora.testing.tiny import save_tiny_pipeline
    from tlora.testing.train_inputs import train_args, write_photo

    model = save_tiny_pipeline("sd", root / "sd")
    image = write_photo(root / "dog.png")
    rc, err, _ = run_cli(train_args(model, image, root / "run", 2, 1))
    assert rc == 0, err
    return model, image, root / "run"


def resume_args(model: Path, image: Path, out: Path) -> list[str]:
    """`tlora train --resume` arguments for a copy of the finished run at `out`, on to RESUME_STEPS."""
    from tlora.testing.train_inputs import train_args

    return train_args(model, image, out, RESUME_STEPS, 1, "--resume")


def folder_bytes(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def prepare_resume(case: ResumeCase, run: Path, out: Path) -> dict[str, bytes | None]:
    """Copies the finished `run` to `out` and applies `case` there: the folder_bytes of `out` then."""
    shutil.copytree(run, out)
    case.apply(out)
    return folder_bytes(out)


def resume_outcome(case: ResumeCase, out: Path, box: dict, before: dict[str, bytes | None]) -> tuple[str, str]:
    """(outcome, what is wrong) of `tlora train --resume` on the run folder `out` that `case` edited,
    `box` being run_in_thread(run_cli, resume_args(...)) and `before` prepare_resume's snapshot.
    The outcome is one of benches/badinput.py's classes:
      ok       a case that must resume resumed and trained on to RESUME_STEPS
      clear    refused: exit 2, one line "tlora train: error: ..." naming the edited file (its path)
               that calls no checkpoint "the last good checkpoint", the run folder as it was
      unclear  refused otherwise (or a case that must resume refused)
      crash    an exception escaped the CLI, a traceback, an exit status other than 0 and 2
      hang     no answer within run_in_thread's timeout
      silent   exit 0 on a corrupted checkpoint (or a resume that did not train on)
      loss     refused, but the run folder changed (the run's checkpoints or log rewritten)
    "what is wrong" is "" for ok and clear."""
    if box.get("hang"):
        return "hang", "no answer within the time limit"
    if "error" in box:
        return "crash", f"raised {type(box['error']).__name__}: {box['error']}"
    rc, err, _ = box["result"]
    lines = [line for line in err.splitlines() if line.strip()]
    message = lines[-1] if lines else ""
    if "Traceback" in err or rc not in (0, 2):
        return "crash", f"rc {rc}, a traceback or crash: {message!r}"
    if not case.must_fail:
        if rc != 0:
            return "unclear", f"refused a run that must resume: {message}"
        if not (out / f"checkpoint-{RESUME_STEPS}").is_dir():
            return "silent", "resumed but did not train on"
        return "ok", ""
    if rc == 0:
        return "silent", "resumed from the corrupted checkpoint (exit 0)"
    if folder_bytes(out) != before:
        return "loss", f"refused, but the run folder changed: {message!r}"
    if not message.startswith("tlora train: error:"):
        return "unclear", f"rc {rc}, unclear refusal {message!r}"
    if str(out / case.file) not in message:
        return "unclear", f"the refusal does not name {case.file}: {message!r}"
    if "last good checkpoint" in message:
        return "unclear", f"the refusal calls a checkpoint good: {message!r}"
    return "clear", ""
