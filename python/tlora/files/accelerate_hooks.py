"""`register_accelerate_hooks`: `accelerator.save_state(folder)` writes the adapter into accelerate's
state folder (as `save_pretrained` does: tlora's file and the static LoRA beside it) and
`accelerator.load_state(folder)` loads it back in place, so the optimizer that holds the
adapter's parameters resumes exactly. accelerate itself saves and restores the optimizer, the
schedulers, the RNG states and any other prepared model.

Multi-process: every process runs the hooks; only the main process writes, every process reads.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..adapter.inject import Adapter, adapter_of
from ..errors import ConfigError, TloraError
from .folder import save_pretrained
from .io import load


def register_accelerate_hooks(accelerator: Any, model_or_adapter: nn.Module | Adapter) -> Adapter:
    """Register save/load state pre-hooks on `accelerator` for the adapter of `model_or_adapter`;
    returns the Adapter (so `tlora.register_accelerate_hooks(accelerator, tlora.inject(unet, ...))`
    is one line). The adapted model's full weights are then left out of the state folder (accelerate
    saves and loads every other prepared model as usual). `adapter.remove()` unregisters them."""
    adapter = model_or_adapter if isinstance(model_or_adapter, Adapter) else adapter_of(model_or_adapter)
    if adapter is None:
        raise TloraError(
            f"{type(model_or_adapter).__name__} has no tlora adapter: call tlora.inject before registering its hooks"
        )
    if not all(hasattr(accelerator, f) for f in ("register_save_state_pre_hook", "register_load_state_pre_hook")):
        raise ConfigError(f"expected an accelerate.Accelerator, got {type(accelerator).__name__}")

    def ours(models: list) -> int | None:
        """The index of the adapted model among accelerate's (wrapped: DDP, torch.compile)."""
        for i, m in enumerate(models):
            if _unwrapped(accelerator, m) is adapter.model:
                return i
        return None

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            save_pretrained(adapter, output_dir)
        i = ours(models)
        if i is not None and i < len(weights):
            weights.pop(i)  # (accelerate would write the whole model's weights)

    def load_hook(models: list, input_dir: str) -> None:
        load(adapter.model, input_dir)
        i = ours(models)
        if i is not None:
            models.pop(i)

    handles = [
        accelerator.register_save_state_pre_hook(save_hook),
        accelerator.register_load_state_pre_hook(load_hook),
    ]
    adapter._removal_handles.extend(handles)
    return adapter


def _unwrapped(accelerator: Any, model: nn.Module) -> nn.Module:
    try:
        return accelerator.unwrap_model(model, keep_torch_compile=False)
    except TypeError:  # an accelerate without keep_torch_compile
        model = accelerator.unwrap_model(model)
        return getattr(model, "_orig_mod", model)
