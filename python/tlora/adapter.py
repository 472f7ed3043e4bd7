"""Model surgery: `inject` patches a model in place and returns the `Adapter` that owns the patch."""

from __future__ import annotations

import contextlib
import inspect
import zlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from . import _native
from .config import TIMESTEP_SCALE_BY_CLASS, AdapterConfig
from .layer import RankState, TLoraLinear
from .targets import find_targets, linear_at

_ATTR = "_tlora_adapter"


def rank_schedule(timesteps, rank: int, min_rank: int, exponent: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """r(t) = floor(((T - t) / T)^a * (r - r_min)) + r_min for each timestep: an int64 CPU tensor."""
    t = torch.as_tensor(timesteps)
    return _native.rank_schedule(t, rank, min_rank, float(exponent), float(num_train_timesteps))


def inject(
    model: nn.Module,
    rank: int = 64,
    min_rank: int | None = None,
    rank_exponent: float = 1.0,
    variant: str = "tlora",
    init: str = "last",
    init_from: str = "random",
    target_modules: Sequence[str] | str | None = None,
    lora_alpha: float | None = None,
    num_train_timesteps: int = 1000,
    timestep_scale: float | None = None,
    seed: int = 0,
) -> "Adapter":
    """Patch the matching `nn.Linear` layers of `model` in place with T-LoRA and return the Adapter.

    - `rank`, `min_rank` (default rank // 2), `rank_exponent`: the schedule
      r(t) = floor(((T - t)/T)^a (r - r_min)) + r_min with T = `num_train_timesteps`.
    - `variant`: "tlora" (Ortho-LoRA factors + timestep ranks; the paper's method), "vanilla"
      (LoRA factors + timestep ranks) or "lora" (no mask). `min_rank=rank` turns the mask off, which
      gives Ortho-LoRA for "tlora".
    - `init` ("principal" | "middle" | "last") and `init_from` ("random" | "weight"): which SVD
      triplets initialise P, lambda, Q, of a seeded N(0, 1/r^2) matrix or of the pretrained weight.
    - `target_modules`: module-name suffixes (default: attention to_q, to_k, to_v, to_out.0 and the
      joint-attention add_{q,k,v}_proj) or one regular expression over full module paths.
    - `lora_alpha`: scale the update by alpha / rank (default: no scaling, as in the paper).
    - `timestep_scale`: multiply the model's `timestep` argument by this to get 0..T; detected for
      models whose pipelines pass t / 1000 (FLUX).

    The base model's parameters are frozen; the adapter's are float32 and trainable.
    """
    config = AdapterConfig(
        rank=rank, min_rank=min_rank, rank_exponent=rank_exponent, variant=variant, init=init,
        init_from=init_from, target_modules=target_modules, lora_alpha=lora_alpha,
        num_train_timesteps=num_train_timesteps, timestep_scale=timestep_scale, seed=seed,
    )
    return inject_config(model, config)


def inject_config(model: nn.Module, config: AdapterConfig, module_names: Sequence[str] | None = None,
                  factors: dict[str, dict[str, torch.Tensor]] | None = None) -> "Adapter":
    """`inject` from a config; `module_names` (exact paths) and `factors` (per module) are used by
    `tlora.load`. Everything is checked before the model is touched."""
    existing = getattr(model, _ATTR, None)
    if existing is not None:
        raise ValueError(
            f"{type(model).__name__} already has a tlora adapter ({existing.config.variant}, rank "
            f"{existing.config.rank}); call adapter.remove() (or tlora.remove(model)) before injecting again"
        )
    names = list(module_names) if module_names is not None else find_targets(model, config.target_modules)
    modules = dict(model.named_modules())
    for name in names:
        _, base = linear_at(modules, name)
        if type(base) is not nn.Linear:
            raise ValueError(f"module {name!r} is {'missing' if base is None else type(base).__name__}, expected nn.Linear")
        limit = min(base.in_features, base.out_features)
        if config.rank > limit:
            raise ValueError(
                f"rank {config.rank} is larger than module {name!r} allows ({base.out_features} x "
                f"{base.in_features}, at most {limit}): lower rank or leave this module out of target_modules"
            )
    state = RankState()
    bases = {n: linear_at(modules, n)[1] for n in names}
    built = {n: factors[n] if factors is not None else _init_factors(bases[n], n, config) for n in names}
    # From here on nothing can fail for a reason the user controls: swap the modules in.
    return Adapter(model, config, {n: (bases[n], built[n]) for n in names}, state)


def _module_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _init_factors(base: nn.Linear, name: str, config: AdapterConfig) -> dict[str, torch.Tensor]:
    out_f, in_f, r = base.out_features, base.in_features, config.rank
    dev = base.weight.device
    seed = _module_seed(config.seed, name)
    if config.variant == "tlora":
        weight = base.weight.detach() if config.init_from == "weight" else None
        # The random init draws the triplets from their law (no out x in matrix) and runs its QRs on
        # the layer's device where that is CUDA; other devices get the CPU result moved over.
        native_dev = str(dev) if dev.type in ("cpu", "cuda", "mps") else None
        p, lam, q = _native.orthogonal_init(out_f, in_f, r, config.init, seed, weight, native_dev)
        p, lam, q = (t.to(dev) for t in (p, lam, q))
        return {"p": p, "lam": lam, "q": q, "p0": p.clone(), "lam0": lam.clone(), "q0": q.clone()}
    # LoRA init: A ~ N(0, 1/r^2) (as the reference code), B = 0, so the update starts at zero.
    down = _native.gaussian(r, in_f, 1.0 / r, seed).to(dev)
    return {"down": down, "up": torch.zeros(out_f, r, device=dev)}


class Adapter:
    """A T-LoRA patch on one model. Holds the adapted layers, the timestep hook and what `remove`
    needs to put the model back exactly as it was."""

    def __init__(self, model: nn.Module, config: AdapterConfig,
                 parts: dict[str, tuple[nn.Linear, dict[str, torch.Tensor]]], state: RankState):
        self.model = model
        self.config = config
        self.state = state
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        # Keyed by the adapted module's name; inside a PEFT LoRA layer the patch sits at
        # `<name>.base_layer`, and the files keep the plain name.
        self.layers: dict[str, TLoraLinear] = {}
        modules = dict(model.named_modules())
        for name, (base, factors) in parts.items():
            layer = TLoraLinear(base, config, state, {k: v.float() for k, v in factors.items()})
            _set_submodule(model, linear_at(modules, name)[0], layer)
            self.layers[name] = layer
        own = {id(p) for p in self._own_parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in own)
        self._signature = inspect.signature(model.forward)
        self._ckpt_modules = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        self._hook = model.register_forward_pre_hook(self._on_forward, with_kwargs=True)
        setattr(model, _ATTR, self)

    # ---- parameters -------------------------------------------------------------------------
    def _own_parameters(self) -> Iterator[nn.Parameter]:
        for layer in self.layers.values():
            yield from layer.parameters(recurse=False)

    def parameters(self) -> list[nn.Parameter]:
        """The trainable tensors, for an optimizer."""
        return list(self._own_parameters())

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, layer in self.layers.items():
            for key, p in layer.named_parameters(recurse=False):
                yield f"{name}.{key}", p

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every factor (trainable and frozen) under the adapter file's keys."""
        return {f"{name}.{key}": t for name, layer in self.layers.items()
                for key, t in zip(layer.factor_names(), layer.factors())}

    # ---- ranks ------------------------------------------------------------------------------
    @property
    def timestep_scale(self) -> float:
        if self.config.timestep_scale is not None:
            return self.config.timestep_scale
        return TIMESTEP_SCALE_BY_CLASS.get(type(self.model).__name__, 1.0)

    def ranks_for(self, timesteps: Any, batch: int | None = None) -> list[int]:
        """The ranks for a timestep (number or tensor on the model's own scale): one shared rank,
        or one per sample when the timesteps differ. `batch` checks a (B,) tensor's length."""
        t = torch.as_tensor(timesteps).detach()
        if t.dim() > 1:
            raise ValueError(f"timestep must be a number or a 1-D tensor, got shape {tuple(t.shape)}")
        t = t.reshape(-1)
        if batch is not None and t.numel() not in (1, batch):
            raise ValueError(
                f"{type(self.model).__name__} got {t.numel()} timesteps for a batch of {batch}: "
                "pass one timestep, or one per sample"
            )
        c = self.config
        ranks = rank_schedule(t.double() * self.timestep_scale, c.rank, c.min_rank, c.rank_exponent, c.num_train_timesteps)
        values = ranks.tolist()
        return values[:1] if all(v == values[0] for v in values) else values

    # Under torch.compile the hook runs outside the graph (the ranks become Python ints that the
    # layers' ops take as constants: one graph break per forward, one graph per set of ranks).
    @torch.compiler.disable
    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._wrap_checkpointing()
        if self.state.pinned:
            return
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        t = bound.get("timestep", bound.get("timesteps"))
        if t is None:
            raise ValueError(
                f"{type(module).__name__}.forward was called without a timestep, so T-LoRA cannot pick "
                "its ranks: pass timestep=..., or wrap the call in `with adapter.timestep(t):`"
            )
        batch = next((v.shape[0] for v in bound.values() if isinstance(v, torch.Tensor) and v.dim() >= 2), None)
        self.state.ranks = self.ranks_for(t, batch)

    @contextlib.contextmanager
    def timestep(self, t: Any):
        """Use the ranks of timestep(s) `t` (model scale) for every forward inside the block."""
        with self._pinned(self.ranks_for(t)):
            yield self

    @contextlib.contextmanager
    def rank(self, r: int | Sequence[int]):
        """Use rank(s) `r` (one, or one per sample) for every forward inside the block."""
        ranks = [int(r)] if isinstance(r, int) else [int(v) for v in r]
        for v in ranks:
            if not 1 <= v <= self.config.rank:
                raise ValueError(f"rank {v} is outside 1..{self.config.rank}")
        with self._pinned(ranks if self.config.masked else None):
            yield self

    @contextlib.contextmanager
    def _pinned(self, ranks: list[int] | None):
        saved = (self.state.ranks, self.state.pinned)
        self.state.ranks, self.state.pinned = ranks, True
        try:
            yield
        finally:
            self.state.ranks, self.state.pinned = saved

    # ---- gradient checkpointing -------------------------------------------------------------
    def _wrap_checkpointing(self) -> None:
        """Make checkpoint recomputation run with the ranks of the forward it replays, even when
        other forwards (with other timesteps) ran in between."""
        for m in self._ckpt_modules:
            func = getattr(m, "_gradient_checkpointing_func", None)
            if func is None or getattr(func, "_tlora_wrapped", False):
                continue
            state = self.state

            def wrapped(block, *args, _orig=func, **kwargs):
                ranks = state.ranks

                def replay(*a, **k):
                    saved = state.ranks
                    state.ranks = ranks
                    try:
                        return block(*a, **k)
                    finally:
                        state.ranks = saved

                return _orig(replay, *args, **kwargs)

            wrapped._tlora_wrapped = True  # type: ignore[attr-defined]
            wrapped._tlora_original = func  # type: ignore[attr-defined]
            m._gradient_checkpointing_func = wrapped

    # ---- removal ----------------------------------------------------------------------------
    def remove(self) -> nn.Module:
        """Put back the original modules and requires_grad flags; returns the model."""
        if getattr(self.model, _ATTR, None) is not self:
            raise ValueError("this adapter was already removed from its model")
        self._hook.remove()
        self.state.fold_cache.clear()
        for m in self._ckpt_modules:
            func = getattr(m, "_gradient_checkpointing_func", None)
            if getattr(func, "_tlora_wrapped", False):
                m._gradient_checkpointing_func = func._tlora_original
        # Each layer where it is now (a PEFT layer around it may have been added or unloaded since).
        where = {id(m): n for n, m in self.model.named_modules(remove_duplicate=False)}
        for name, layer in self.layers.items():
            path = where.get(id(layer))
            if path is not None:
                _set_submodule(self.model, path, layer.base_layer)
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
        delattr(self.model, _ATTR)
        return self.model

    def __repr__(self) -> str:
        c = self.config
        return (f"Adapter({c.variant}, rank={c.rank}, min_rank={c.min_rank}, layers={len(self.layers)}, "
                f"model={type(self.model).__name__})")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def adapter_of(model: nn.Module) -> Adapter | None:
    """The adapter injected into `model`, if any."""
    return getattr(model, _ATTR, None)
