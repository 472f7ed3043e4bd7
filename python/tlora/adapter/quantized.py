"""Quantized frozen bases: which quantized Linear layers T-LoRA adapts, and their weights.

diffusers quantizes a model's Linear layers through its quantization configs into one of:
- optimum-quanto (`QuantoConfig`, int8 / int4 weights): `optimum.quanto.nn.QLinear`;
- torchao (`TorchAoConfig`, e.g. int8 weight-only): a plain `nn.Linear` whose weight is a torchao
  tensor subclass (`torchao.utils.TorchAOBaseTensor`);
- bitsandbytes (`BitsAndBytesConfig`, 4-bit nf4/fp4 and LLM.int8): `bitsandbytes.nn.Linear4bit`
  and `bitsandbytes.nn.Linear8bitLt`.

A TLoraLinear calls such a layer as it is and adds the low-rank update into its output (the
factored path; the inference fold needs a float weight and is skipped), so the base stays
quantized and frozen and no dequantised copy of its weight is kept. `dequantized_weight` builds
one only for the moment an SVD initialisation (`init_from="weight"`) needs it.

The backends are recognised without importing them: a layer of a backend's class can only exist
once that backend is imported, so its module is looked up in `sys.modules`.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, InputError
from ..options import QUANTIZE

# The `tlora train --quantize` choices, and the backend each one uses.
QUANTIZE_CHOICES = QUANTIZE  # (options.py: the one list, also the parser's)


def _class(module: str, name: str):
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


def quantized_kind(module: nn.Module | None) -> str | None:
    """'quanto', 'torchao', 'bnb4' or 'bnb8' for a quantized Linear layer T-LoRA can adapt; None
    for anything else (a plain nn.Linear included)."""
    if module is None or not isinstance(module, nn.Linear):
        return None
    qlinear = _class("optimum.quanto.nn", "QLinear")
    if qlinear is not None and isinstance(module, qlinear):
        return "quanto"
    linear4 = _class("bitsandbytes.nn", "Linear4bit")
    if linear4 is not None and isinstance(module, linear4):
        return "bnb4"
    linear8 = _class("bitsandbytes.nn", "Linear8bitLt")
    if linear8 is not None and isinstance(module, linear8):
        return "bnb8"
    ao_tensor = _class("torchao.utils", "TorchAOBaseTensor")
    if type(module) is nn.Linear and ao_tensor is not None and isinstance(module._parameters.get("weight"), ao_tensor):
        return "torchao"
    return None


def adaptable_linear(module: nn.Module | None) -> bool:
    """A plain nn.Linear, or a quantized Linear layer of a supported backend."""
    return module is not None and (type(module) is nn.Linear or quantized_kind(module) is not None)


def describe(module: nn.Module | None) -> str:
    """The module's class for error messages, with the weight's class for tensor subclasses."""
    if module is None:
        return "missing"
    w = getattr(module, "_parameters", {}).get("weight")
    if type(module) is nn.Linear and w is not None and type(w) not in (nn.Parameter, torch.Tensor):
        return f"nn.Linear with a {type(w).__name__} weight"
    return type(module).__name__


def dequantized_weight(module: nn.Linear) -> torch.Tensor:
    """The weight of a quantized layer dequantised to a float32 (out, in) matrix on the layer's
    device, built for the caller alone (drop it when done); a plain layer's weight as it is."""
    kind = quantized_kind(module)
    with torch.no_grad():
        if kind is None:
            return module.weight.detach()
        if kind == "quanto":
            w = module.qweight
            return (w.dequantize() if hasattr(w, "dequantize") else w).detach().float()
        if kind == "torchao":
            return module.weight.dequantize().float()
        import bitsandbytes.functional as bnb_f

        w = module.weight
        if kind == "bnb4":
            if getattr(w, "quant_state", None) is None:  # not quantized yet (still float)
                return w.detach().float()
            return bnb_f.dequantize_4bit(w.data, w.quant_state).float()
        # LLM.int8: int8 rows CB with one absmax per row (SCB), on the weight before the first
        # forward and on the layer's state after it.
        if w.dtype != torch.int8:
            return w.detach().float()
        scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
        return bnb_f.int8_vectorwise_dequant(w.data, scb).float()


def quantization_config(choice: str):
    """The diffusers quantization config for a `tlora train --quantize` choice: int8 and int4
    through optimum-quanto (runs on CPU and GPU), nf4 through bitsandbytes (diffusers asks for a
    GPU for it). Raises a clear error when the backend is not installed."""
    if choice not in QUANTIZE_CHOICES:
        raise ConfigError(f"quantize {choice!r} is not one of {', '.join(QUANTIZE_CHOICES)}", field="quantize")
    if choice in ("int8", "int4"):
        try:
            import optimum.quanto  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"--quantize {choice} needs optimum-quanto: pip install optimum-quanto") from e
        if choice == "int4":
            _ninja_for_quanto()
        guard_quanto_builds()
        from diffusers import QuantoConfig

        return QuantoConfig(weights_dtype=choice)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ConfigError("--quantize nf4 needs bitsandbytes: pip install bitsandbytes") from e
    if not torch.cuda.is_available():
        raise ConfigError(
            "--quantize nf4 (bitsandbytes through diffusers) needs a CUDA GPU, which diffusers asks for: "
            "on the CPU use --quantize int8 or int4 (optimum-quanto)"
        )
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def _ninja_for_quanto() -> None:
    """quanto unpacks int4 weights on the CPU with a C++ extension that torch builds (once) with
    ninja, found on PATH. The `ninja` package puts it next to the interpreter, which is not on
    PATH when a virtualenv's script runs unactivated: add that folder then."""
    if shutil.which("ninja"):
        return
    here = Path(sys.executable).parent
    if (here / "ninja").exists():
        os.environ["PATH"] = f"{here}{os.pathsep}{os.environ.get('PATH', '')}"
        return
    raise ConfigError(
        "--quantize int4 (optimum-quanto) builds a C++ extension with ninja on the CPU: pip install ninja"
    )


# ---- quanto's C++ extensions ---------------------------------------------------------------------
# optimum-quanto (0.2.7: optimum/quanto/library/extensions/extension.py, `Extension.lib`) builds
# each extension on first use with torch.utils.cpp_extension.load(build_directory=<the package's
# extensions/<kind>/build>, inside site-packages), which takes the file lock `<build dir>/lock`
# (torch's FileBaton: created empty, removed when the build ends) and waits forever while another
# holds it. A process killed mid-build leaves the lock behind, so every later build waits forever.

# How long to wait for another process's build before giving up (a build takes about 2 minutes).
QUANTO_LOCK_WAIT_S = 20 * 60


def guard_quanto_builds() -> None:
    """Route quanto's extension builds through `_guarded_load` (once per process)."""
    try:
        from optimum.quanto.library.extensions import extension
    except ImportError:  # another quanto layout: its builds run unguarded
        return
    if not getattr(extension.load, "_tlora_guarded", False):
        extension.load = _guarded_load(extension.load)


def _guarded_load(load):
    """torch's cpp_extension `load` as quanto calls it, saying first that it builds (when the
    extension is not built yet) and refusing a stale lock instead of waiting on it forever."""

    @functools.wraps(load)
    def guarded(*args, name: str = "", build_directory: str | None = None, **kwargs):
        if build_directory is not None:
            build = Path(build_directory)
            wait_for_build_lock(build / "lock", name)
            # quanto writes pytorch_version.txt after a build, and removes the folder when torch changed
            if not (build / "pytorch_version.txt").exists():
                print(
                    f"tlora: optimum-quanto is building its C++ extension {name} in {build} (once, about 2 minutes)",
                    file=sys.stderr,
                    flush=True,
                )
        return load(*args, name=name, build_directory=build_directory, **kwargs)

    guarded._tlora_guarded = True
    return guarded


def wait_for_build_lock(lock: Path, name: str, timeout_s: float | None = None, poll_s: float = 0.5) -> None:
    """Return once `lock` is gone. A lock that no process holds open (a build that was killed)
    is refused at once, naming it and how to remove it; one that another process holds is waited
    for, up to `timeout_s` (default QUANTO_LOCK_WAIT_S)."""
    timeout_s = QUANTO_LOCK_WAIT_S if timeout_s is None else timeout_s
    start, said, unheld = time.monotonic(), False, 0
    while lock.exists():
        holders = _lock_holders(lock)
        advice = (
            f"if no other process is building it, remove the lock (rm {lock}) and run again; "
            "the build restarts from the beginning"
        )
        # Twice in a row: torch closes the lock a moment before it removes it.
        unheld = unheld + 1 if holders == [] else 0
        if unheld >= 2:
            raise InputError(
                f"optimum-quanto's C++ extension {name} has a stale build lock {lock}, left by a build "
                f"that was stopped (no process holds it): {advice}"
            )
        if time.monotonic() - start > timeout_s:
            raise InputError(
                f"waited {timeout_s:.0f} s for the build lock {lock} of optimum-quanto's C++ extension {name} "
                f"(held by {'process ' + ', '.join(map(str, holders)) if holders else 'another process'}): {advice}"
            )
        if not said and unheld == 0:
            print(f"tlora: waiting for another process's build of {name} (lock {lock})", file=sys.stderr, flush=True)
            said = True
        time.sleep(poll_s)


def _lock_holders(lock: Path) -> list[int] | None:
    """PIDs of the processes that hold `lock` open (torch's FileBaton keeps it open while it
    builds), from /proc; None where that cannot be told (no /proc, processes we may not inspect)."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target = os.path.realpath(lock)
    holders, unsure = [], False
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except PermissionError:
            unsure = True
            continue
        except OSError:  # the process ended meanwhile
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    holders.append(int(entry.name))
                    break
            except OSError:
                continue
    return holders if holders or not unsure else None
