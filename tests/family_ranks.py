"""What the family tests measure: the ranks every adapted layer uses at each call of a denoiser,
against the paper's r(t) in exact arithmetic (rank R = 8, R_MIN = 1, T = 1000; batches of B = 2).

Shared by tests/adapter/test_family_pipelines.py, test_family_forward.py, test_family_calls.py and
test_timestep_conventions.py; the tiny models are in family_models.py and family_calls.py.
"""

from __future__ import annotations

import pytest
import reference
import torch

import tlora

R, R_MIN, T = 8, 1, 1000
B = 2


def r_of(t: float) -> int:
    """The paper's schedule r(t) = floor(((T - t) / T) * (r - r_min)) + r_min, exact (benches/reference.py's)."""
    return reference.rank_at(t, R, R_MIN, T)


class RankLog:
    """The ranks every adapted layer uses, one entry per model forward (per sample)."""

    def __init__(self, adapter: tlora.Adapter, batch: int):
        self.adapter, self.batch, self.steps = adapter, batch, []
        self._hooks = [layer.register_forward_pre_hook(self._seen) for layer in adapter.layers.values()]
        self._model_hook = adapter.model.register_forward_pre_hook(lambda *_: self.steps.append(set()))

    def _seen(self, module, args):
        ranks = self.adapter.state.ranks
        ranks = ranks.tolist() if isinstance(ranks, torch.Tensor) else list(ranks)
        self.steps[-1].add(tuple(ranks * self.batch if len(ranks) == 1 else ranks))

    def per_step(self) -> list[tuple[int, ...]]:
        for i, seen in enumerate(self.steps):
            assert len(seen) == 1, f"forward {i}: adapted layers used different ranks {seen}"
        return [next(iter(s)) for s in self.steps]


def inject(model, **kw):
    return tlora.inject(model, rank=R, min_rank=R_MIN, **kw)


def drive(model, kwargs, passes, t_steps, adapter, timestep_arg="timestep"):
    log = RankLog(adapter, batch=B)
    with torch.no_grad():
        for t in t_steps:
            model(**kwargs, **{timestep_arg: passes(t)})
    return log.per_step()


class _Stop(Exception):
    """Raised by a hook that runs after tlora's: the ranks of the call are set, the body is not needed."""


def ranks_of_call(adapter: tlora.Adapter, call, batch: int = B) -> tuple[int, ...]:
    """The per-sample ranks tlora's hook sets for `call()` (a forward written as the pipeline calls
    the model: same positional and keyword arguments), without running the model's body."""
    seen = []

    def grab(module, args, kwargs):
        ranks = adapter.state.ranks
        ranks = ranks.tolist() if isinstance(ranks, torch.Tensor) else list(ranks)
        seen.append(tuple(ranks * batch if len(ranks) == 1 else ranks))
        raise _Stop

    handle = adapter.model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), pytest.raises(_Stop):
            call()
    finally:
        handle.remove()
    return seen[0]
