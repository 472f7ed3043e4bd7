"""Which modules of a model an adapter patches."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from torch import nn

from ..config import DEFAULT_TARGETS
from ..errors import ConfigError
from ..options import DENOISER_FAMILIES, FAMILY_TARGETS
from .quantized import adaptable_linear


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The target_modules used when none are given: the family's of the model's class (the module
    suffixes its diffusers DreamBooth LoRA script adapts, options.FAMILY_TARGETS, through
    options.DENOISER_FAMILIES), so that tlora in such a script adapts what PEFT did; else
    DEFAULT_TARGETS. `tlora train` and `inject` read this one table."""
    for cls in type(model).__mro__:
        family = DENOISER_FAMILIES.get(cls.__name__)
        if family is not None:
            return FAMILY_TARGETS.get(family) or DEFAULT_TARGETS
    return DEFAULT_TARGETS


def _matches(name: str, targets: Sequence[str] | str) -> bool:
    if isinstance(targets, str):  # a regular expression over the full module path, as in PEFT
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def wrapped_linear(module: nn.Module | None) -> nn.Linear | None:
    """The `nn.Linear` (plain or quantized, see tlora.adapter.quantized) inside another tool's adapter
    layer: PEFT's LoRA layers (what diffusers' `load_lora_weights` and `add_adapter` install) keep
    the original layer as `base_layer` and call it, so T-LoRA adapts that layer and both updates
    apply. None for anything else."""
    if module is None or adaptable_linear(module) or _is_adapted(module):
        return None
    base = getattr(module, "base_layer", None)
    return base if adaptable_linear(base) else None


def linear_at(modules: dict[str, nn.Module], name: str) -> tuple[str, nn.Module | None]:
    """(path, module) of the layer T-LoRA patches for the module called `name`: the module itself,
    or `name.base_layer` inside a PEFT LoRA layer."""
    module = modules.get(name)
    inner = wrapped_linear(module)
    return (f"{name}.base_layer", inner) if inner is not None else (name, module)


def find_targets(model: nn.Module, targets: Sequence[str] | str | None) -> list[str]:
    """Full paths of the `nn.Linear` modules (plain or quantized) that `targets` selects
    (suffixes or one regex).

    Raises ConfigError when nothing matches (naming close candidates) or when a matched module is
    not an `nn.Linear`.
    """
    targets = default_targets(model) if targets is None else targets
    if not isinstance(targets, str):  # (a regex is checked to compile by AdapterConfig)
        targets = list(targets)
        if not targets:
            raise ConfigError("target_modules is empty: name at least one module suffix, e.g. ['to_q', 'to_v']")
    names, wrong_type = [], []
    for name, module in model.named_modules():
        if not name or not _matches(name, targets):
            continue
        if adaptable_linear(module) or wrapped_linear(module) is not None:
            names.append(name)
        elif not list(module.children()) and not _is_adapted(module):
            wrong_type.append(f"{name} ({type(module).__name__})")
    if wrong_type:
        raise ConfigError(
            "target_modules selects modules that are not nn.Linear, which T-LoRA cannot adapt: "
            + ", ".join(wrong_type[:5])
            + ("" if len(wrong_type) <= 5 else f" and {len(wrong_type) - 5} more")
        )
    if not names:
        raise ConfigError(_no_match_message(model, targets))
    # A regex may select both a PEFT layer and its base_layer: they are one target.
    taken = set(names)
    return [n for n in names if not (n.endswith(".base_layer") and n[: -len(".base_layer")] in taken)]


def _is_adapted(module: nn.Module) -> bool:
    from ..layer import TLoraLinear

    return isinstance(module, TLoraLinear)


def _no_match_message(model: nn.Module, targets: Sequence[str] | str) -> str:
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    suffixes = sorted({".".join(n.split(".")[-k:]) for n in linear for k in (1, 2)})
    wanted = [targets] if isinstance(targets, str) else targets
    close = sorted({c for t in wanted for c in difflib.get_close_matches(t, suffixes, n=4, cutoff=0.5)})
    hint = f" Close names: {', '.join(close)}." if close else ""
    examples = ", ".join(sorted({n.split(".")[-1] for n in linear})[:12])
    return (
        f"target_modules {targets!r} matches no nn.Linear in {type(model).__name__}.{hint} "
        f"Linear layers here end in: {examples or '(none)'}."
    )
