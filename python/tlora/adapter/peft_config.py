"""`inject(model, lora_config)`: the settings a `peft.LoraConfig` carries, as `inject`'s. What a
LoRA script already builds (diffusers' DreamBooth scripts: r, lora_alpha, target_modules,
init_lora_weights="gaussian", lora_dropout) then adapts the same modules at the same scale.

The mapping: r -> rank; lora_alpha -> lora_alpha (the update is scaled by lora_alpha / r, as in
PEFT; with use_rslora, lora_alpha / sqrt(r), the same number); target_modules -> target_modules
(suffixes or one regular expression, matched as PEFT matches them; None: the family's default,
options.FAMILY_TARGETS). T-LoRA's update starts at zero as PEFT's default LoRA does, so
init_lora_weights True or "gaussian" changes nothing. Options T-LoRA does not have (DoRA,
dropout, bias training, per-module ranks, ...) are named in a warning and left out.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from ..errors import ConfigError

# Option -> (its value when it asks for nothing, what T-LoRA does instead).
_NOT_DONE = {
    "use_dora": (False, "T-LoRA has no DoRA magnitude vector; the adapter is trained without one"),
    "lora_dropout": (0.0, "T-LoRA applies no dropout to the adapter's input"),
    "bias": ("none", "T-LoRA trains no bias"),
    "modules_to_save": (None, "T-LoRA trains only its factors; those modules stay frozen"),
    "rank_pattern": ({}, "T-LoRA uses one rank (r) for every module"),
    "alpha_pattern": ({}, "T-LoRA uses one lora_alpha for every module"),
    "layers_to_transform": (None, "T-LoRA selects modules by target_modules only"),
    "exclude_modules": (None, "T-LoRA selects modules by target_modules only"),
}
_ZERO_START = (True, "gaussian")


def is_lora_config(value: Any) -> bool:
    """Whether `value` is a LoRA configuration object (peft.LoraConfig or one shaped like it)."""
    return not isinstance(value, (int, float, str, bytes)) and hasattr(value, "r") and hasattr(value, "target_modules")


def inject_options(lora_config: Any) -> dict[str, Any]:
    """`inject`'s rank, lora_alpha and target_modules for a LoraConfig, warning (UserWarning, naming
    the option) about each setting T-LoRA does not do."""
    r = lora_config.r
    alpha = getattr(lora_config, "lora_alpha", None)
    if getattr(lora_config, "use_rslora", False) and alpha is not None and isinstance(r, int) and r > 0:
        alpha = alpha * math.sqrt(r)  # rsLoRA scales by alpha / sqrt(r) = (alpha sqrt(r)) / r
    targets = lora_config.target_modules
    if isinstance(targets, str) and targets == "all-linear":
        raise ConfigError(
            "target_modules='all-linear' (a PEFT shorthand) is not supported by tlora: list the module suffixes, "
            "e.g. ['to_k', 'to_q', 'to_v', 'to_out.0'], or leave it None for the family's default"
        )
    if isinstance(targets, (set, frozenset)):
        targets = sorted(targets)  # (PEFT keeps a list as a set: order carries nothing)
    for name, (neutral, instead) in _NOT_DONE.items():
        value = getattr(lora_config, name, neutral)
        if value not in (neutral, None, {}, []):
            warnings.warn(f"LoraConfig {name}={value!r} is ignored: {instead}", UserWarning, stacklevel=3)
    init = getattr(lora_config, "init_lora_weights", True)
    if init not in _ZERO_START:
        warnings.warn(
            f"LoraConfig init_lora_weights={init!r} is ignored: T-LoRA initialises its own factors "
            "(orthogonal, the update zero at the start: inject's init and init_from choose how)",
            UserWarning,
            stacklevel=3,
        )
    return {"rank": r, "lora_alpha": alpha, "target_modules": targets}
