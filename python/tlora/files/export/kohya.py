"""The sd-scripts (kohya) layout: `lora_unet_<module with . as _>.lora_down.weight` / `.lora_up.weight`
/ `.alpha`, for SD 1.x/2.x and SD-XL UNets, that `pipe.load_lora_weights(file)` converts."""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import ConfigError
from ..io import write_tensors
from .common import one_file


def output(out: Path) -> Path:
    return one_file(out, "kohya")


def check(base_model: str, names: list[str]) -> None:
    """UNets only, and module paths whose dots diffusers' conversion guesses back."""
    if "UNet" not in base_model:
        raise ConfigError(
            f"the kohya format names UNet modules (lora_unet_...); this adapter was made for a {base_model}: "
            "export it as format='diffusers' (pipe.load_lora_weights) or format='peft'"
        )
    _check_names(names)


def write(
    out: Path, baked: dict[str, tuple[torch.Tensor, torch.Tensor]], meta: dict[str, str], prefix: str
) -> tuple[Path, None]:
    """`prefix` is not used: the kohya keys name the UNet themselves (lora_unet_)."""
    lora_rank = next(iter(baked.values()))[0].shape[0]
    items = []
    for n, (a, b) in baked.items():
        key = "lora_unet_" + n.replace(".", "_")
        items += [
            (f"{key}.lora_down.weight", a),
            (f"{key}.lora_up.weight", b),
            (f"{key}.alpha", torch.tensor(float(lora_rank))),
        ]
    meta = {
        **meta,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(lora_rank),
        "ss_network_alpha": str(lora_rank),
    }
    write_tensors(out, items, meta)
    return out, None


def _check_names(names: list[str]) -> None:
    """kohya keys replace every '.' of a module path by '_', and loaders guess the dots back. Run
    diffusers' own conversion (when diffusers is installed) and refuse modules it would misplace."""
    try:
        from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
        from diffusers.utils import convert_unet_state_dict_to_peft
    except ImportError:
        return
    dummy = torch.zeros(1)
    sd = {}
    for n in names:
        key = "lora_unet_" + n.replace(".", "_")
        sd.update({f"{key}.lora_down.weight": dummy, f"{key}.lora_up.weight": dummy})
    try:
        converted, _ = _convert_non_diffusers_lora_to_diffusers(sd)
        peft_keys = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    except (AttributeError, TypeError, KeyError, ValueError):  # another diffusers version: no check
        return
    loaded = {k.rsplit(".lora_", 1)[0] for k in peft_keys}
    lost = [n for n in names if n not in loaded]
    if lost:
        raise ConfigError(
            "the kohya format cannot name these modules so that diffusers finds them again (dots become "
            f"underscores): {', '.join(lost[:5])}{' ...' if len(lost) > 5 else ''}; export as format='diffusers'"
        )
