"""The adapter's settings: one validated dataclass, stored in every adapter file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

VARIANTS = ("tlora", "vanilla", "lora")
INITS = ("principal", "middle", "last")
INIT_SOURCES = ("random", "weight")

# Attention projections adapted by default: self- and cross-attention of UNets, plus the
# context-stream projections of FLUX/SD3-style joint attention.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")

# Which timestep argument each diffusers family passes: see timesteps.py (BY_CLASS, CONVENTIONS).


@dataclass
class AdapterConfig:
    """How an adapter is built. See `tlora.inject` for the meaning of each field."""

    rank: int = 64
    min_rank: int | None = None
    rank_exponent: float = 1.0
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
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}: choose one of {', '.join(VARIANTS)}")
        if self.min_rank is None:
            # The paper uses r_min = r / 2; plain LoRA has no mask.
            self.min_rank = self.rank if self.variant == "lora" else max(1, self.rank // 2)
        if not isinstance(self.min_rank, int) or not 1 <= self.min_rank <= self.rank:
            raise ValueError(f"min_rank must be an integer in 1..rank ({self.rank}), got {self.min_rank!r}")
        if self.variant == "lora" and self.min_rank != self.rank:
            raise ValueError("variant 'lora' has no timestep mask: leave min_rank unset (or equal to rank)")
        if not self.rank_exponent > 0:
            raise ValueError(f"rank_exponent must be > 0, got {self.rank_exponent!r}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}: choose one of {', '.join(INITS)}")
        if self.init_from not in INIT_SOURCES:
            raise ValueError(f"unknown init_from {self.init_from!r}: choose one of {', '.join(INIT_SOURCES)}")
        if self.variant != "tlora" and (self.init, self.init_from) != ("last", "random"):
            raise ValueError(f"init/init_from apply to variant 'tlora' only, not {self.variant!r}")
        if not (isinstance(self.num_train_timesteps, int) and self.num_train_timesteps >= 1):
            raise ValueError(f"num_train_timesteps must be an integer >= 1, got {self.num_train_timesteps!r}")
        if self.timestep_scale is not None and not self.timestep_scale > 0:
            raise ValueError(f"timestep_scale must be > 0, got {self.timestep_scale!r}")
        if self.timestep_convention is not None and not isinstance(self.timestep_convention, str):
            raise ValueError(f"timestep_convention must be a name (str) in a config, got {self.timestep_convention!r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")

    @property
    def scale(self) -> float:
        """The update's multiplier: lora_alpha / rank, or 1 (the paper's setting) without alpha."""
        return 1.0 if self.lora_alpha is None else self.lora_alpha / self.rank

    @property
    def masked(self) -> bool:
        return self.variant != "lora"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["target_modules"] is not None and not isinstance(d["target_modules"], str):
            d["target_modules"] = list(d["target_modules"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
