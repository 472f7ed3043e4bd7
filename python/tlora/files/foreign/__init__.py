"""Other tools' T-LoRA checkpoints: the layouts `tlora.load` reads besides its own.

- the reference implementation's attention-processor checkpoints (SD-XL `pytorch_lora_weights`):
  `<attention>.processor.to_q_lora.q_layer.weight`, `.p_layer.weight`, `.lambda_layer`,
  `.base_q.weight`, `.base_p.weight`, `.base_lambda` (T-LoRA), or `...to_q_lora.down.weight` /
  `.up.weight` (LoRA with timestep ranks); `to_out_lora` is `to_out.0`;
- LyCORIS `tlora` networks: `lycoris_<module with . as _>.q_layer.weight`, `.p_layer.weight`,
  `.lambda_layer`, `.alpha` and the frozen copies `.base_q`, `.base_p`, `.base_lambda`.

One parser per layout (reference.py, lycoris.py; their shared checks in common.py): `read_foreign`
recognizes the layout and turns such a file's tensors and metadata into a tlora config and
per-module factors for `tlora.files.io.load` to inject; it reads nothing itself and never touches
the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...adapter.targets import linear_at
from ...config import AdapterConfig
from ...errors import AdapterFileError
from ...layer import factors
from . import common, lycoris, reference

# The layouts, in the order they are tried: each module has SOURCE (its name in messages),
# detects(tensors), parse(path, tensors, module paths) and missing_base(...).
_LAYOUTS = (reference, lycoris)


def read_foreign(
    model: nn.Module,
    model_modules: dict[str, nn.Module],
    path: Path,
    raw_tensors: list[tuple[str, torch.Tensor]],
    raw_meta: dict[str, str],
    min_rank: int | None = None,
    rank_exponent: float | None = None,
    num_train_timesteps: int | None = None,
    reconstruct_base: bool = False,
) -> tuple[AdapterConfig, dict[str, dict[str, torch.Tensor]]]:
    """The config and the float32 CPU factors (by module path) of another tool's T-LoRA file,
    read with `tlora.files.io.read_raw`, for `model` (whose `named_modules()` are `model_modules`).

    The rank is read from the shapes; `min_rank`, `rank_exponent` and `num_train_timesteps` from
    the arguments, else from the file's metadata, else the paper's defaults (r_min = r // 2, with
    a warning: the file does not say).

    LyCORIS's own `save_weights` leaves out the frozen copies base_q, base_p, base_lambda, without
    which the update cannot be computed: such a file is refused, unless `reconstruct_base=True`,
    which rebuilds them as LyCORIS's loader does (the top-r singular triplets of the model's
    weight: right only for LyCORIS's default init, use_data_init=True, sig_type="principal").
    """
    tensors = dict(raw_tensors)
    linear = {n: m for n in model_modules if type(m := linear_at(model_modules, n)[1]) is nn.Linear}
    layout = next((parser for parser in _LAYOUTS if parser.detects(tensors)), None)
    if layout is None:
        raise AdapterFileError(path, _unknown_layout(path, tensors))
    modules, variant, alpha = layout.parse(path, tensors, [n for n in model_modules if n])
    r = common.one_rank(path, layout.SOURCE, model, model_modules, linear, modules, variant)
    if variant == "tlora" and any("p0" not in f for f in modules.values()):
        layout.missing_base(path, modules, linear, r, reconstruct_base)
    settings = common.rank_settings(path, raw_meta, min_rank, rank_exponent, num_train_timesteps)
    names = sorted(modules)
    config = common.adapter_config(path, layout.SOURCE, r, variant, alpha, names, settings)
    keys = factors.names(variant)
    return config, {name: {k: modules[name][k].float().contiguous() for k in keys} for name in names}


def _unknown_layout(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    keys = sorted(tensors)
    head = f"{path} has no 'tlora' metadata: it is a safetensors file, but not a tlora adapter"
    if any(k.endswith((".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight")) for k in keys):
        return (
            f"{head}; it holds a static LoRA (lora_A/lora_B or lora_down/lora_up keys), which has no "
            "timestep ranks: load it with pipe.load_lora_weights(file)"
        )
    return (
        f"{head}, nor a T-LoRA checkpoint of the reference code (<attention>.processor.to_q_lora.q_layer.weight "
        f"...) or of LyCORIS (lycoris_<module>.q_layer.weight ...). First keys: {', '.join(keys[:4]) or '(none)'}"
    )
