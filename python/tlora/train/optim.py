"""What steps the adapter's factors in `tlora train`: the optimizer (`--optimizer`), its learning-rate
schedule (`--lr-scheduler`) and the exponential moving average of the factors (`--ema-decay`).

- adamw: torch's AdamW (the paper's setting: betas (0.9, 0.999), weight decay 1e-4).
- prodigy: Prodigy from the `prodigyopt` package, which estimates the step size itself; its lr
  multiplies that estimate, so lr 1 is the usual setting (the paper's FLUX runs).
- adamw8bit: bitsandbytes' AdamW8bit (block-wise 8-bit moments; factors smaller than its
  `min_8bit_size` keep float32 moments, as bitsandbytes decides).

Each optimizer's state is checkpointed as tensors and JSON (tlora.train.checkpoint), and checked
there against `STATE_SCHEMAS` below: the state each optimizer keeps per factor.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import ConfigError

# Per trainable factor, the state tensors each optimizer keeps beside its step count: name ->
# (dtype, shape: "factor" (the factor's), "flat" (its values in one row), "flat_or_zero" (or a 0-d
# zero: Prodigy's p0 of an all-zero factor), None (any); values >= 0). `state_schema` picks.
STATE_SCHEMAS = {
    "adamw": {
        "exp_avg": ("float32", "factor", False),
        "exp_avg_sq": ("float32", "factor", True),
    },
    "prodigy": {
        "exp_avg": ("float32", "factor", False),  # only with beta1 > 0
        "exp_avg_sq": ("float32", "factor", True),
        "s": ("float32", "flat", False),
        "p0": ("float32", "flat_or_zero", False),
    },
    # bitsandbytes' 8-bit AdamW: uint8 moments with their block-wise scales and code books; factors
    # under its min_8bit_size keep float32 moments (STATE_8BIT_SMALL).
    "adamw8bit": {
        "state1": ("uint8", "factor", False),
        "state2": ("uint8", "factor", False),
        "qmap1": ("float32", None, False),
        "qmap2": ("float32", None, False),
        "absmax1": ("float32", None, True),
        "absmax2": ("float32", None, True),
    },
}
STATE_8BIT_SMALL = {
    "state1": ("float32", "factor", False),
    "state2": ("float32", "factor", True),
}


def state_schema(optimizer: str, group: dict, numel: int) -> dict[str, tuple]:
    """The state tensors optimizer `optimizer` keeps for a factor of `numel` values in parameter group `group`."""
    schema = dict(STATE_SCHEMAS[optimizer])
    if optimizer == "adamw" and group.get("amsgrad") is True:
        schema["max_exp_avg_sq"] = ("float32", "factor", True)
    if optimizer == "prodigy" and not group.get("betas", [0.9])[0] > 0:
        del schema["exp_avg"]
    if optimizer == "adamw8bit" and numel < group.get("min_8bit_size", 4096):
        schema = dict(STATE_8BIT_SMALL)
    return schema


def build_optimizer(cfg, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` names, with cfg's hyperparameters (a ConfigError naming the
    option when its package is missing or cannot run on `device`)."""
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=cfg.lr, betas=betas, eps=cfg.adam_epsilon, weight_decay=cfg.adam_weight_decay
        )
    if cfg.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ConfigError(
                "optimizer 'prodigy' needs the prodigyopt package: pip install prodigyopt", field="optimizer"
            ) from None
        return Prodigy(
            params,
            lr=cfg.lr,
            betas=betas,
            beta3=cfg.prodigy_beta3,
            eps=cfg.adam_epsilon,
            weight_decay=cfg.adam_weight_decay,
            decouple=cfg.prodigy_decouple,
            use_bias_correction=cfg.prodigy_use_bias_correction,
            safeguard_warmup=cfg.prodigy_safeguard_warmup,
        )
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(
            "optimizer 'adamw8bit' needs the bitsandbytes package: pip install bitsandbytes", field="optimizer"
        ) from None
    opt = bnb.optim.AdamW8bit(params, lr=cfg.lr, betas=betas, eps=cfg.adam_epsilon, weight_decay=cfg.adam_weight_decay)
    _probe_8bit(opt, device)
    return opt


def _probe_8bit(opt, device: torch.device) -> None:
    """One step of a copy on a throwaway parameter: bitsandbytes' kernels for `device` exist."""
    import bitsandbytes as bnb

    probe = torch.nn.Parameter(torch.zeros(64, 64, device=device))  # 8-bit state (>= min_8bit_size)
    probe.grad = torch.ones_like(probe)
    try:
        bnb.optim.AdamW8bit([probe], lr=1e-3).step()
    except (RuntimeError, NotImplementedError, AttributeError, TypeError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ConfigError(
            f"optimizer 'adamw8bit' does not run on {device.type} with this bitsandbytes ({first}): "
            "use --optimizer adamw, or train on a GPU",
            field="optimizer",
        ) from None


def build_scheduler(cfg, optimizer: torch.optim.Optimizer):
    """diffusers' `get_scheduler` of `cfg.lr_scheduler` over `cfg.steps` optimizer steps."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=cfg.steps,
        num_cycles=cfg.lr_num_cycles,
        power=cfg.lr_power,
    )


def scheduler_state(scheduler) -> dict:
    """The schedule's position as JSON (its lambdas are functions of the step: rebuilt from the settings)."""
    sd = scheduler.state_dict()
    return {"last_epoch": sd["last_epoch"], "base_lrs": sd["base_lrs"], "step_count": sd["_step_count"]}


def load_scheduler_state(scheduler, state: dict) -> None:
    sd = scheduler.state_dict()
    sd.update(last_epoch=state["last_epoch"], base_lrs=list(state["base_lrs"]), _step_count=state["step_count"])
    scheduler.load_state_dict(sd)
    apply_schedule(scheduler)


def apply_schedule(scheduler) -> None:
    """Set each group's lr to the schedule's at its position (what its last step set; the lambdas
    are the schedule's functions of the step)."""
    lrs = [base * f(scheduler.last_epoch) for f, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


class FactorEMA:
    """diffusers' EMAModel over the adapter's factors. `swapped()` puts the averaged values into the
    factors (validation, the saved adapter) and the raw ones back after; the fold cache sees the
    writes, as it checks the factors' values."""

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float):
        from diffusers.training_utils import EMAModel

        self.params = list(params)
        self.ema = EMAModel(self.params, decay=decay, foreach=False)

    def step(self) -> None:
        self.ema.step(self.params)

    def swapped(self):
        import contextlib

        @contextlib.contextmanager
        def swap():
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
            try:
                yield
            finally:
                self.ema.restore(self.params)

        return swap()

    @property
    def shadow(self) -> list[torch.Tensor]:
        return self.ema.shadow_params

    @property
    def optimization_step(self) -> int:
        return int(self.ema.optimization_step)

    def load(self, shadow: list[torch.Tensor], optimization_step: int) -> None:
        with torch.no_grad():
            for mine, theirs in zip(self.ema.shadow_params, shadow):
                mine.copy_(theirs)
        self.ema.optimization_step = optimization_step
