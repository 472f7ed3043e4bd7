"""The adapter's settings: one validated dataclass, stored in every adapter file."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

VARIANTS = ("tlora", "vanilla", "lora")
INITS = ("principal", "middle", "last")
INIT_SOURCES = ("random", "weight")
# The shapes of r(t) (src/schedule.rs): the paper's power law first, the default.
RANK_SCHEDULES = ("power", "cosine", "step")
# How the update is scaled at a timestep's rank r(t) < r: "none" (the paper and its reference code:
# the same alpha / r at every rank) or "rank" (alpha / r times r / r(t), per sample).
RANK_SCALINGS = ("none", "rank")
# The step schedule's default boundary as a fraction of T: full rank for t < 875 of 1000.
DEFAULT_RANK_BOUNDARY = 0.875
# The config fields of those choices (absent from files written before them: the defaults).
SCHEDULE_OPTIONS = ("rank_schedule", "rank_boundary", "rank_scaling")

# Bounds that keep every derived number finite (scale = alpha / rank, seeds in 64 bits).
MAX_RANK = 65536
MAX_TIMESTEPS = 10**9
# Fewer than 2 training timesteps leave r(t) nothing to vary over: training draws t from 0..T-1 (only
# t = 0, full rank, at T = 1), and the EDM convention interpolates between two table entries.
MIN_TIMESTEPS = 2
SEED_RANGE = 2**63

# Attention projections adapted by default: self- and cross-attention of UNets, plus the
# context-stream projections of FLUX/SD3-style joint attention.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")

# Which timestep argument each diffusers model class passes: see timesteps.py (BY_CLASS, CONVENTIONS).


@dataclass
class AdapterConfig:
    """How an adapter is built. See `tlora.inject` for the meaning of each field."""

    rank: int = 64
    min_rank: int | None = None
    rank_exponent: float = 1.0
    rank_schedule: str = "power"
    rank_boundary: float = DEFAULT_RANK_BOUNDARY
    rank_scaling: str = "none"
    variant: str = "tlora"
    init: str = "last"
    init_from: str = "random"
    target_modules: Sequence[str] | str | None = None
    lora_alpha: float | None = None
    num_train_timesteps: int = 1000
    timestep_scale: float | None = None
    seed: int = 0
    # Name of the timestep convention (timesteps.py); None = the model class's own, resolved at inject.
    timestep_convention: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not is_int(self.rank) or self.rank < 1:
            raise ConfigError(f"rank must be an integer >= 1, got {self.rank!r}")
        if self.rank > MAX_RANK:
            raise ConfigError(f"rank must be at most {MAX_RANK}, got {self.rank!r}")
        if self.variant not in VARIANTS:
            raise ConfigError(f"unknown variant {self.variant!r}: choose one of {', '.join(VARIANTS)}")
        if self.min_rank is None:
            # The paper uses r_min = r / 2; plain LoRA has no mask.
            self.min_rank = self.rank if self.variant == "lora" else max(1, self.rank // 2)
        if not is_int(self.min_rank) or not 1 <= self.min_rank <= self.rank:
            raise ConfigError(f"min_rank must be an integer in 1..rank ({self.rank}), got {self.min_rank!r}")
        if self.variant == "lora" and self.min_rank != self.rank:
            raise ConfigError("variant 'lora' has no timestep mask: leave min_rank unset (or equal to rank)")
        _check_positive("rank_exponent", self.rank_exponent)
        if self.rank_schedule not in RANK_SCHEDULES:
            raise ConfigError(
                f"unknown rank_schedule {self.rank_schedule!r}: choose one of {', '.join(RANK_SCHEDULES)}"
            )
        self.rank_boundary = check_float(
            "rank_boundary (the step schedule's boundary, a fraction of T: 0.875 is 875 of 1000)",
            self.rank_boundary,
            0.0,
            1.0,
            lo_inclusive=False,
        )
        if self.rank_scaling not in RANK_SCALINGS:
            raise ConfigError(f"unknown rank_scaling {self.rank_scaling!r}: choose one of {', '.join(RANK_SCALINGS)}")
        if self.variant == "lora" and (self.rank_schedule, self.rank_scaling) != ("power", "none"):
            raise ConfigError(
                "variant 'lora' has no timestep mask: leave rank_schedule and rank_scaling unset (power, none)"
            )
        if self.init not in INITS:
            raise ConfigError(f"unknown init {self.init!r}: choose one of {', '.join(INITS)}")
        if self.init_from not in INIT_SOURCES:
            raise ConfigError(f"unknown init_from {self.init_from!r}: choose one of {', '.join(INIT_SOURCES)}")
        if self.variant != "tlora" and (self.init, self.init_from) != ("last", "random"):
            raise ConfigError(f"init/init_from apply to variant 'tlora' only, not {self.variant!r}")
        if not (is_int(self.num_train_timesteps) and MIN_TIMESTEPS <= self.num_train_timesteps <= MAX_TIMESTEPS):
            raise ConfigError(
                f"num_train_timesteps must be an integer >= {MIN_TIMESTEPS} and <= {MAX_TIMESTEPS} (the scheduler's "
                f"training steps, e.g. 1000, over which r(t) varies), got {self.num_train_timesteps!r}"
            )
        if self.timestep_scale is not None:
            _check_positive("timestep_scale", self.timestep_scale)
        if self.lora_alpha is not None:
            _check_positive("lora_alpha", self.lora_alpha)
        if not is_int(self.seed) or not -SEED_RANGE <= self.seed < SEED_RANGE:
            raise ConfigError(f"seed must be an integer in -2**63..2**63-1, got {self.seed!r}")
        t = self.target_modules
        if (
            t is not None
            and not isinstance(t, str)
            and not (isinstance(t, (list, tuple)) and all(isinstance(x, str) for x in t))
        ):
            raise ConfigError(
                f"target_modules must be None, a regular expression or a list of module-name suffixes, got {t!r}"
            )
        if isinstance(t, str):
            try:
                re.compile(t)
            except (re.error, RecursionError, OverflowError) as e:
                raise ConfigError(
                    f"target_modules {t!r} is not a valid regular expression ({e}): fix it, or pass a list "
                    "of module-name suffixes such as ['to_q', 'to_v']"
                ) from None
        if self.timestep_convention is not None and not isinstance(self.timestep_convention, str):
            raise ConfigError(f"timestep_convention must be a name (str) in a config, got {self.timestep_convention!r}")
        if not isinstance(self.extra, dict):
            raise ConfigError(f"extra must be a dict, got {type(self.extra).__name__}")

    @property
    def scale(self) -> float:
        """The update's multiplier: lora_alpha / rank, or 1 (the paper's setting) without alpha."""
        return 1.0 if self.lora_alpha is None else self.lora_alpha / self.rank

    def scale_at(self, k: int) -> float:
        """The update's multiplier at rank k: `scale`, times r / k under rank_scaling "rank" (so
        that a timestep's fewer active ranks are not relatively weaker). The one rule the masks,
        the folded weights and the exports use."""
        # (at k = r exactly `scale`, as the full-rank mask holds it: (scale * r) / r can round off it)
        return self.scale * self.rank / k if self.rank_scaling == "rank" and k != self.rank else self.scale

    @property
    def masked(self) -> bool:
        return self.variant != "lora"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["target_modules"] is not None and not isinstance(d["target_modules"], str):
            d["target_modules"] = list(d["target_modules"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"an adapter config is a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def is_int(value: Any) -> bool:
    """An integer that is not a bool (True is an int in Python, never a rank or a count): the one
    test of "an integer" for settings, JSON fields and arguments (numpy integers pass; a JSON
    integer always does)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_positive(name: str, value: Any) -> None:
    """A finite number > 0 (not a bool, not a string, not inf or NaN)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not value > 0:
        raise ConfigError(f"{name} must be > 0 and finite, got {value!r}")


def check_rank(k: Any, rank: int) -> int:
    """`k` as an int if it is a rank of a rank-`rank` adapter (an integer in 1..rank), else a
    ConfigError: the Python side's one rule for a rank asked of an adapter (`adapter.rank(...)`,
    the kernels' functional form, `interop.export(rank=...)`; Rust's is `ranks::check_rank_in`)."""
    if not is_int(k):
        raise ConfigError(f"rank {k!r} is not an integer: ranks are integers in 1..{rank}")
    if not 1 <= k <= rank:
        raise ConfigError(f"rank {k} is outside 1..{rank}")
    return int(k)


def check_ranks(ranks: Sequence[Any], rank: int) -> list[int]:
    """`ranks` (one, or one per sample), each checked by `check_rank`, as ints."""
    if len(ranks) == 0:
        raise ConfigError("ranks must not be empty")
    return [check_rank(k, rank) for k in ranks]


def rank_limit_error(rank: int, out_features: int, in_features: int, module: str) -> str | None:
    """Why a rank-`rank` adapter cannot adapt an out x in linear module (None when it can): the
    one place the rule "rank <= min(out, in)" lives."""
    limit = min(out_features, in_features)
    if rank <= limit:
        return None
    return f"rank {rank} is larger than module {module!r} allows ({out_features} x {in_features}, at most {limit})"


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    """`value` if it is an integer (not a bool) in lo..hi, else a ConfigError naming `name`."""
    if not is_int(value) or value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ConfigError(f"{name} must be an integer {bound}, got {value!r}")
    return int(value)


def check_float(name: str, value: Any, lo: float, hi: float | None = None, lo_inclusive: bool = True) -> float:
    """`value` if it is a finite number in [lo, hi] ((lo, hi] without lo_inclusive), else a ConfigError."""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and math.isfinite(value)
        and (value >= lo if lo_inclusive else value > lo)
        and (hi is None or value <= hi)
    )
    if not ok:
        bound = f"{'>=' if lo_inclusive else '>'} {lo:g}" + ("" if hi is None else f" and <= {hi:g}")
        raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)
