"""Model surgery: `inject` patches a model in place and returns the `Adapter` that owns the patch."""

from __future__ import annotations

import contextlib
import numbers
import weakref
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .. import _native, timesteps
from ..config import DEFAULT_RANK_BOUNDARY, AdapterConfig, check_ranks, is_int, rank_limit_error
from ..errors import ConfigError, ModelMismatchError
from ..layer import RankState, TLoraLinear, factors
from ..layer.ops import KERNEL_DEVICES
from ..layer.ranks import ranks_of_levels
from .peft_config import inject_options, is_lora_config
from .quantized import adaptable_linear, dequantized_weight, describe
from .targets import find_targets, linear_at

_ATTR = "_tlora_adapter"
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def rank_schedule(
    timesteps,
    rank: int,
    min_rank: int,
    rank_exponent: float = 1.0,
    num_train_timesteps: int = 1000,
    shape: str = "power",
    rank_boundary: float = DEFAULT_RANK_BOUNDARY,
) -> torch.Tensor:
    """r(t) for each timestep: an int64 CPU tensor (exact at every timestep: see src/schedule.rs).
    `shape` (an adapter's `rank_schedule`): "power", the paper's floor(((T - t) / T)^a * (r - r_min))
    + r_min; "cosine", floor(cos(pi t / 2T) * (r - r_min)) + r_min; "step", r for t < rank_boundary * T
    and r_min from there."""
    # Types here (a bool, a float rank or an integer past 64 bits is no setting); ranges in ranks.rs.
    ints = {"rank": rank, "min_rank": min_rank, "num_train_timesteps": num_train_timesteps}
    for name, value in ints.items():
        if not is_int(value) or not -(2**63) <= value < 2**63:
            raise ConfigError(f"{name} must be an integer (64-bit), got {value!r}")
    if isinstance(rank_exponent, bool) or not isinstance(rank_exponent, numbers.Real):
        raise ConfigError(f"rank_exponent must be a finite number > 0, got {rank_exponent!r}")
    if not isinstance(shape, str):
        raise ConfigError(f"the schedule's shape must be a name (power, cosine, step), got {shape!r}")
    if isinstance(rank_boundary, bool) or not isinstance(rank_boundary, numbers.Real):
        raise ConfigError(f"rank_boundary must be a fraction of T in (0, 1], got {rank_boundary!r}")
    t = _timestep_tensor(timesteps)
    return _native.rank_schedule(
        t, int(rank), int(min_rank), float(rank_exponent), int(num_train_timesteps), shape, float(rank_boundary)
    )


def config_ranks(level: Any, c: AdapterConfig) -> torch.Tensor:
    """r(t) of adapter config `c` at noise levels `level` (on the host): `rank_schedule` with its settings."""
    return rank_schedule(
        level, c.rank, c.min_rank, c.rank_exponent, c.num_train_timesteps, c.rank_schedule, c.rank_boundary
    )


def _timestep_tensor(timesteps: Any) -> torch.Tensor:
    """`timesteps` as a real tensor, or a ConfigError saying what a timestep is."""
    if isinstance(timesteps, (str, bytes)) or timesteps is None:
        raise ConfigError(f"a timestep is a number or a numeric tensor, got {timesteps!r}")
    try:
        t = torch.as_tensor(timesteps)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise ConfigError(f"a timestep is a number or a numeric tensor, got {timesteps!r} ({err})") from None
    if t.dtype == torch.bool or t.is_complex() or not (t.is_floating_point() or t.dtype in _INT_DTYPES):
        raise ConfigError(f"a timestep is a real number, got dtype {t.dtype}")
    return t


def inject(
    model: nn.Module,
    rank: int | Any = 64,
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
    timestep_convention: str | timesteps.Mapping | None = None,
    fast_path: bool = True,
    fold_cache_bytes: int | None = None,
    host_ranks: bool | None = None,
    rank_schedule: str = "power",
    rank_boundary: float = DEFAULT_RANK_BOUNDARY,
    rank_scaling: str = "none",
) -> Adapter:
    """Patch the matching `nn.Linear` layers of `model` in place with T-LoRA and return the Adapter.

    - `rank` may instead be a `peft.LoraConfig` (what a LoRA script builds for `add_adapter`):
      its r, lora_alpha and target_modules are used, and each option T-LoRA does not do (DoRA,
      dropout, ...) is named in a warning (`tlora.adapter.peft_config`).
    - `rank`, `min_rank` (default rank // 2), `rank_exponent`: the schedule
      r(t) = floor(((T - t)/T)^a (r - r_min)) + r_min with T = `num_train_timesteps`.
    - `rank_schedule`: the shape of r(t): "power" (the paper's, above; the default), "cosine"
      (floor(cos(pi t / 2T) (r - r_min)) + r_min) or "step" (r for t < `rank_boundary` * T, r_min
      from there; `rank_boundary` is a fraction of T, default 0.875: 875 of 1000).
    - `rank_scaling`: "none" (the paper's: the same scale at every rank) or "rank" (the update at
      rank r(t) scaled by r / r(t), per sample, so that fewer active ranks are not relatively weaker).
    - `variant`: "tlora" (Ortho-LoRA factors + timestep ranks; the paper's method), "vanilla"
      (LoRA factors + timestep ranks) or "lora" (no mask). `min_rank=rank` turns the mask off, which
      gives Ortho-LoRA for "tlora".
    - `init` ("principal" | "middle" | "last") and `init_from` ("random" | "weight"): which SVD
      triplets initialise P, lambda, Q, of a seeded N(0, 1/r^2) matrix or of the pretrained weight.
    - `target_modules`: module-name suffixes or one regular expression over full module paths.
      Default: the family's (`tlora.options.FAMILY_TARGETS`, what diffusers' DreamBooth
      LoRA scripts adapt: a UNet's attention to_k, to_q, to_v, to_out.0; FLUX's attention of both
      streams and both feed-forwards), else attention to_q, to_k, to_v, to_out.0 and add_{q,k,v}_proj.
    - `lora_alpha`: scale the update by alpha / rank (default: no scaling, as in the paper).
    - `timestep_convention`: how the model's timestep argument (found from its forward's signature:
      `timestep`, `timesteps`, `t`, ...) maps to the noise level t in 0..T: a name from
      `tlora.timesteps` ("timesteps", "unit", "reversed_unit", "edm", ...), or a function (tensor
      ops, argument -> a real tensor of the argument's shape on its device; stored in files as
      "custom"). Default: the diffusers class's own convention (`tlora.timesteps.BY_CLASS`); an
      unknown diffusers class is refused. `tlora.timesteps.convention_for(pipe)` also reads the
      pipeline and scheduler (EDM schedulers, Sana-Sprint, classes whose pipelines disagree).
    - `timestep_scale`: the "scale" convention, t = argument * timestep_scale.

    How the adapter runs (not saved with it; also settable later as attributes of the Adapter):
    - `fast_path`: at inference, fold the update at the forward's rank into the weight (one plain
      matmul per layer); False always runs the factored update.
    - `fold_cache_bytes`: folded weights kept per device (default 1 GiB on the CPU, 1/8 of a GPU).
    - `host_ranks`: where the ranks are computed: None reads a timestep that lives on the host
      there and keeps one on a GPU there (no synchronisation); False always keeps them on the
      timestep's device; True always reads them back.

    The base model's parameters are frozen; the adapter's are float32 and trainable.
    """
    if is_lora_config(rank):
        given = [n for n, v in (("lora_alpha", lora_alpha), ("target_modules", target_modules)) if v is not None]
        if given:
            raise ConfigError(
                f"{', '.join(given)}: given both in the LoraConfig and as an argument; set them in the LoraConfig"
            )
        peft_options = inject_options(rank)
        rank, lora_alpha, target_modules = (peft_options[k] for k in ("rank", "lora_alpha", "target_modules"))
    config = AdapterConfig(
        rank=rank,
        min_rank=min_rank,
        rank_exponent=rank_exponent,
        rank_schedule=rank_schedule,
        rank_boundary=rank_boundary,
        rank_scaling=rank_scaling,
        variant=variant,
        init=init,
        init_from=init_from,
        target_modules=target_modules,
        lora_alpha=lora_alpha,
        num_train_timesteps=num_train_timesteps,
        timestep_scale=timestep_scale,
        seed=seed,
        timestep_convention=timesteps.resolve_name(model, timestep_convention, timestep_scale),
    )
    options = {"fast_path": fast_path, "fold_cache_bytes": fold_cache_bytes, "host_ranks": host_ranks}
    for name, value in options.items():
        _check_option(name, value)
    adapter = inject_config(model, config, timestep_fn=timestep_convention if callable(timestep_convention) else None)
    for name, value in options.items():
        setattr(adapter, name, value)
    return adapter


# The run options (see `inject`): what each accepts, as a test and as words for the error.
_RUN_OPTIONS = {
    "fast_path": (lambda v: isinstance(v, bool), "True or False"),
    "fold_cache_bytes": (
        lambda v: v is None or (is_int(v) and v >= 0),
        "None or an integer >= 0",
    ),
    "host_ranks": (lambda v: v is None or isinstance(v, bool), "None, True or False"),
}


def _check_option(name: str, value: Any) -> Any:
    accepts, words = _RUN_OPTIONS[name]
    if not accepts(value):
        raise ConfigError(f"{name} must be {words}, got {value!r}")
    return value


def inject_config(
    model: nn.Module,
    config: AdapterConfig,
    module_names: Sequence[str] | None = None,
    factors: dict[str, dict[str, torch.Tensor]] | None = None,
    timestep_fn: timesteps.Mapping | None = None,
) -> Adapter:
    """`inject` from a config; `module_names` (exact paths) and `factors` (per module) are used by
    `tlora.load`; `timestep_fn` is the function behind a "custom" convention. Everything is checked
    before the model is touched."""
    existing = getattr(model, _ATTR, None)
    if existing is not None:
        raise ModelMismatchError(
            f"{type(model).__name__} already has a tlora adapter ({existing.config.variant}, rank "
            f"{existing.config.rank}); call tlora.remove(model) (or adapter.remove()) before injecting again"
        )
    names = list(module_names) if module_names is not None else find_targets(model, config.target_modules)
    # Exact module names come from a file (tlora.load): a module that does not fit is the model's
    # mismatch; for `inject` it is the settings'.
    error = ConfigError if module_names is None else ModelMismatchError
    modules = dict(model.named_modules())
    for name in names:
        _, base = linear_at(modules, name)
        if not adaptable_linear(base):
            raise error(
                f"module {name!r} is {describe(base)}, expected nn.Linear (plain or quantized by "
                "optimum-quanto, torchao or bitsandbytes)"
            )
        too_large = rank_limit_error(config.rank, base.out_features, base.in_features, name)
        if too_large:
            raise error(f"{too_large}: lower rank or leave this module out of target_modules")
    timestep_map = _timestep_map(model, config, timestep_fn)
    state = RankState(config)
    bases = {n: linear_at(modules, n)[1] for n in names}
    built = {n: factors[n] if factors is not None else _init_factors(bases[n], n, config) for n in names}
    # From here on nothing can fail for a reason the user controls: swap the modules in.
    return Adapter(model, config, {n: (bases[n], built[n]) for n in names}, state, timestep_map)


def _timestep_map(model: nn.Module, config: AdapterConfig, fn: timesteps.Mapping | None) -> timesteps.Mapping:
    """The argument -> t function of `config` for `model` (files from before conventions: resolved
    from the class and timestep_scale, as inject does)."""
    name = config.timestep_convention or timesteps.resolve_name(model, None, config.timestep_scale)
    return timesteps.mapping(name, model, config.num_train_timesteps, config.timestep_scale, fn)


def _module_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _init_factors(base: nn.Linear, name: str, config: AdapterConfig) -> dict[str, torch.Tensor]:
    out_f, in_f, r = base.out_features, base.in_features, config.rank
    dev = base.weight.device
    seed = _module_seed(config.seed, name)
    if config.variant == "tlora":
        # (a quantized base's weight is dequantised for the SVD only, then dropped)
        weight = dequantized_weight(base) if config.init_from == "weight" else None
        # The random init draws the triplets from their law (no out x in matrix) and runs its QRs on
        # the layer's device where that is CUDA; other devices (the kernels run on none of them: a
        # meta model materialised later, say) get the CPU result moved over.
        native_dev = str(dev) if dev.type in KERNEL_DEVICES else None
        p, lam, q = _native.orthogonal_init(out_f, in_f, r, config.init, seed, weight, native_dev)
        del weight
        p, lam, q = (t.to(dev) for t in (p, lam, q))
        return dict(zip(factors.TLORA, (p, lam, q, p.clone(), lam.clone(), q.clone())))
    # LoRA init: A ~ N(0, 1/r^2) (as the reference code), B = 0, so the update starts at zero.
    down = _native.gaussian(r, in_f, 1.0 / r, seed).to(dev)
    return {"down": down, "up": torch.zeros(out_f, r, device=dev)}


class Adapter:
    """A T-LoRA patch on one model. Holds the adapted layers, the timestep hook and what `remove`
    needs to put the model back exactly as it was."""

    def __init__(
        self,
        model: nn.Module,
        config: AdapterConfig,
        parts: dict[str, tuple[nn.Linear, dict[str, torch.Tensor]]],
        state: RankState,
        timestep_map: timesteps.Mapping | None = None,
    ):
        self.model = model
        self.config = config
        self.timestep_map = timestep_map or _timestep_map(model, config, None)
        self.state = state
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        # Keyed by the adapted module's name; inside a PEFT LoRA layer the patch sits at
        # `<name>.base_layer`, and the files keep the plain name.
        self.layers: dict[str, TLoraLinear] = {}
        modules = dict(model.named_modules())
        for name, (base, initial) in parts.items():
            layer = TLoraLinear(base, config, state, {k: v.float() for k, v in initial.items()})
            path = linear_at(modules, name)[0]
            if path != name:  # inside a PEFT LoRA layer: its merge() writes our base weight
                layer._peft_owner = weakref.ref(modules[name])
            _set_submodule(model, path, layer)
            self.layers[name] = layer
        own = {id(p) for p in self._own_parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in own)
        self._host_ranks: bool | None = None
        # (name, positional index) of the forward's timestep argument, from its signature.
        self._timestep_arg = timesteps.timestep_parameter(model)
        self._ckpt_modules = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        self._hook = model.register_forward_pre_hook(self._on_forward, with_kwargs=True)
        # (always_call: a forward that raises still ends, so later direct layer calls check their folds)
        self._end_hook = model.register_forward_hook(self._on_forward_end, always_call=True)
        # Hooks registered elsewhere for this adapter (tlora.register_accelerate_hooks), removed with it.
        self._removal_handles: list = []
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
        return {
            f"{name}.{key}": t
            for name, layer in self.layers.items()
            for key, t in zip(layer.factor_names(), layer.factors())
        }

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Write `state_dict` (the keys and shapes of `state_dict()`, every one of them, float
        values) into the adapter's own tensors, in place: the parameters stay the very objects an
        optimizer or accelerate holds, on their device, float32. Everything is checked before
        anything is written; the inference folds of every layer are dropped."""
        own = self.state_dict()
        if not isinstance(state_dict, dict):
            raise ConfigError(f"load_state_dict takes a dict of tensors, got {type(state_dict).__name__}")
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            wrong = [
                f"{what} {', '.join(keys[:3])}"
                for what, keys in (("missing", missing), ("unexpected", unexpected))
                if keys
            ]
            raise ModelMismatchError(
                f"the state dict does not fit this adapter ({'; '.join(wrong)}): it must hold exactly the keys "
                "of adapter.state_dict()"
            )
        for key, t in own.items():
            given = state_dict[key]
            if not isinstance(given, torch.Tensor) or not given.is_floating_point():
                raise ConfigError(f"state dict entry {key} must be a floating-point tensor, got {_what(given)}")
            if given.shape != t.shape:
                raise ModelMismatchError(
                    f"state dict entry {key} has shape {tuple(given.shape)}, expected {tuple(t.shape)}"
                )
            bad = factors.bad_values(given.detach())
            if bad:
                raise ConfigError(f"state dict entry {key} has {bad}")
        with torch.no_grad():
            for key, t in own.items():
                t.copy_(state_dict[key])  # (a new in-place version: the layers' operand caches see it)
        for layer in self.layers.values():
            self.state.fold_cache.drop(layer)

    # ---- run options (see `inject`) ----------------------------------------------------------
    @property
    def fast_path(self) -> bool:
        """Fold the update into the weight at inference."""
        return self.state.fast_path

    @fast_path.setter
    def fast_path(self, value: bool) -> None:
        self.state.fast_path = _check_option("fast_path", value)

    @property
    def fold_cache_bytes(self) -> int | None:
        """Folded weights kept per device (None: 1 GiB on the CPU, 1/8 of a GPU)."""
        return self.state.fold_cache.budget

    @fold_cache_bytes.setter
    def fold_cache_bytes(self, value: int | None) -> None:
        self.state.fold_cache.budget = _check_option("fold_cache_bytes", value)

    @property
    def host_ranks(self) -> bool | None:
        """Where the ranks are computed: None decides by the timestep's device (host or not)."""
        return self._host_ranks

    @host_ranks.setter
    def host_ranks(self, value: bool | None) -> None:
        self._host_ranks = _check_option("host_ranks", value)

    # ---- ranks ------------------------------------------------------------------------------
    @property
    def timestep_scale(self) -> float | None:
        """The multiplier the timestep convention amounts to (None when it is not a multiplier)."""
        c = self.config
        return timesteps.scale_of(self.timestep_map.convention, c.num_train_timesteps, c.timestep_scale)

    def noise_level(self, timesteps: Any) -> torch.Tensor:
        """The model's timestep argument mapped to the noise level t in 0..T, as tensor ops on
        the argument's device (no host round trip)."""
        return self.timestep_map(_timestep_tensor(timesteps))

    def ranks_for(self, timesteps: Any, batch: int | None = None) -> list[int]:
        """The ranks for a timestep (number or tensor on the model's own scale): one shared rank,
        or one per sample when the timesteps differ. `batch` checks a (B,) tensor's length. Reads
        the timestep on the host."""
        t = self._checked_shape(timesteps, batch)
        c = self.config
        level = self.noise_level(t).detach().cpu()
        if level.dim() == 2:
            level = level.amax(dim=1)
        ranks = config_ranks(level, c)
        values = ranks.tolist()
        return values[:1] if all(v == values[0] for v in values) else values

    def _checked_shape(self, timesteps: Any, batch: int | None) -> torch.Tensor:
        t = _timestep_tensor(timesteps)
        if t.dim() > 2:
            raise ConfigError(f"timestep must be a number, a 1-D tensor or (batch, tokens), got shape {tuple(t.shape)}")
        if t.dim() == 2:
            # One timestep per token or frame (Wan 2.2 TI2V, LTX conditioning): each sample takes
            # the ranks of its noisiest token, the fewest any of its tokens would get.
            if batch is not None and t.shape[0] not in (1, batch):
                raise ConfigError(
                    f"{type(self.model).__name__} got timesteps of shape {tuple(t.shape)} for a batch of {batch}"
                )
            return t
        t = t.reshape(-1)
        if t.numel() == 0:
            raise ConfigError(f"{type(self.model).__name__} got an empty timestep tensor")
        if batch is not None and t.numel() not in (1, batch):
            raise ConfigError(
                f"{type(self.model).__name__} got {t.numel()} timesteps for a batch of {batch}: "
                "pass one timestep, or one per sample"
            )
        return t

    def device_ranks(self, timesteps: torch.Tensor) -> torch.Tensor:
        """r(t) as tensor ops on the timestep's device: (B,) int64, no host synchronisation. Values
        are clamped into [0, T] (NaN counts as T) since they cannot be checked without reading
        them back; host timesteps are checked instead (`ranks_for`)."""
        c = self.config
        level = self.noise_level(timesteps)
        if level.is_floating_point():
            level = torch.nan_to_num(level, nan=float(c.num_train_timesteps))
        level = level.clamp(0, c.num_train_timesteps)
        level = level.amax(dim=1) if level.dim() == 2 else level.reshape(-1)
        return ranks_of_levels(
            level, c.rank, c.min_rank, c.rank_exponent, c.num_train_timesteps, c.rank_schedule, c.rank_boundary
        )

    def _find_timestep(self, args: tuple, kwargs: dict):
        if self._timestep_arg is not None:
            name, index = self._timestep_arg
            if name in kwargs:
                return kwargs[name]
            if index is not None and len(args) > index:
                return args[index]
        # A forward(*args, **kwargs) wrapper shows no names: look for the usual keyword.
        return next((kwargs[n] for n in ("timestep", "timesteps") if n in kwargs), None)

    # The hook is plain tensor code: under torch.compile it is traced into the model's graph
    # (ranks as data, no graph break); eagerly, a timestep on the host gives host ranks (checked,
    # and usable by the inference fold), one on a GPU stays there unless no gradient is needed.
    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        compiling = torch.compiler.is_compiling()
        if not compiling:
            self.state.begin_forward()
            self._wrap_checkpointing()
        if self.state.pinned:
            return
        t = self._find_timestep(args, kwargs)
        if t is None:
            raise ConfigError(
                f"{type(module).__name__}.forward was called without a timestep, so T-LoRA cannot pick "
                "its ranks: pass timestep=..., or wrap the call in `with adapter.timestep(t):`"
            )
        if compiling:
            self.state.set_device(self.device_ranks(torch.as_tensor(t)))
            return
        sample = (
            args[0]
            if args and isinstance(args[0], torch.Tensor)
            else next((v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dim() >= 2), None)
        )
        batch = sample.shape[0] if sample is not None and sample.dim() >= 2 else None
        if self._host_ranks is not None:
            on_host = self._host_ranks
        else:
            on_host = not isinstance(t, torch.Tensor) or t.device.type == "cpu"
        if on_host or (not torch.is_grad_enabled() and self.state.fast_path):
            # (on a GPU at inference: one read-back per forward buys the folded weights)
            self.state.set_host(self.ranks_for(t, batch))
        else:
            self.state.set_device(self.device_ranks(self._checked_shape(t, batch)))

    def _on_forward_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not torch.compiler.is_compiling():
            self.state.end_forward()

    @contextlib.contextmanager
    def timestep(self, t: Any):
        """Use the ranks of timestep(s) `t` (model scale) for every forward inside the block."""
        with self._pinned(self.ranks_for(t)):
            yield self

    @contextlib.contextmanager
    def rank(self, r: int | Sequence[int]):
        """Use rank(s) `r` (one, or one per sample) for every forward inside the block."""
        ranks = check_ranks(list(r) if isinstance(r, (list, tuple)) else [r], self.config.rank)
        with self._pinned(ranks if self.config.masked else None):
            yield self

    @contextlib.contextmanager
    def _pinned(self, ranks: list[int] | None):
        saved = (self.state.snapshot(), self.state.pinned)
        self.state.set_host(ranks)
        self.state.pinned = True
        try:
            yield
        finally:
            self.state.restore(saved[0])
            self.state.pinned = saved[1]

    # ---- gradient checkpointing -------------------------------------------------------------
    def _wrap_checkpointing(self) -> None:
        """Make checkpoint recomputation run with the ranks of the forward it replays, even when
        other forwards (with other timesteps) ran in between."""
        state = self.state
        for m in self._ckpt_modules:
            func = getattr(m, "_gradient_checkpointing_func", None)
            if func is None or getattr(func, "_tlora_wrapped", False):
                continue

            def wrapped(block, *args, _orig=func, **kwargs):
                ranks = state.snapshot()

                def replay(*a, **k):
                    saved = state.snapshot()
                    state.restore(ranks)
                    try:
                        return block(*a, **k)
                    finally:
                        state.restore(saved)

                return _orig(replay, *args, **kwargs)

            wrapped._tlora_wrapped = True  # type: ignore[attr-defined]
            wrapped._tlora_original = func  # type: ignore[attr-defined]
            m._gradient_checkpointing_func = wrapped

    # ---- removal ----------------------------------------------------------------------------
    def remove(self) -> nn.Module:
        """Put back the original modules and requires_grad flags; returns the model."""
        if getattr(self.model, _ATTR, None) is not self:
            raise ModelMismatchError(
                f"this adapter was already removed from its {type(self.model).__name__}: nothing to remove"
            )
        self._hook.remove()
        self._end_hook.remove()
        for handle in self._removal_handles:
            handle.remove()
        self._removal_handles.clear()
        self.state.fold_cache.clear()
        for m in self._ckpt_modules:
            func = getattr(m, "_gradient_checkpointing_func", None)
            if getattr(func, "_tlora_wrapped", False):
                m._gradient_checkpointing_func = func._tlora_original
        # Each layer where it is now (a PEFT layer around it may have been added or unloaded since).
        where = {id(m): n for n, m in self.model.named_modules(remove_duplicate=False)}
        for layer in self.layers.values():
            path = where.get(id(layer))
            if path is not None:
                _set_submodule(self.model, path, layer.base_layer)
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
        delattr(self.model, _ATTR)
        return self.model

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Adapter({c.variant}, rank={c.rank}, min_rank={c.min_rank}, layers={len(self.layers)}, "
            f"model={type(self.model).__name__})"
        )


def _what(value: Any) -> str:
    return f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def adapter_of(model: nn.Module) -> Adapter | None:
    """The adapter injected into `model`, if any."""
    return getattr(model, _ATTR, None)


def remove(model: nn.Module) -> nn.Module:
    """Remove the adapter injected into `model` (what `adapter.remove()` does); returns the model."""
    adapter = adapter_of(model)
    if adapter is None:
        raise ModelMismatchError(f"{type(model).__name__} has no tlora adapter to remove")
    return adapter.remove()
