"""The inference fast path (tlora.layer.linear): with no gradient needed, the update is folded into the
weight, W_k = W + dW_k per rank, and cached. It must give what the factored path gives (1e-5
relative in float32), fold only when that is cheaper, never run when a gradient is needed, and
never serve a folded weight built from factors that have changed since."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tiny_calls
import torch
from torch import nn

import tlora
import tlora.layer
import tlora.testing.tiny
from tlora.testing.tiny import denoiser, sample_kwargs, tiny_pipeline

RTOL = 1e-5
perturb = functools.partial(tiny_calls.perturb, std=0.1)


class Holder(nn.Module):
    def __init__(self, in_f: int = 32, out_f: int = 24):
        super().__init__()
        self.to_q = nn.Linear(in_f, out_f)

    def forward(self, x, timestep=None):
        return self.to_q(x)


# The adapter the test works on and the fold cache budget its `cache_mode` asks for.
_LAST: list = [None]
_BUDGET: list = [None]


def inject(model, variant: str = "tlora", **kw):
    if variant == "lora":
        adapter = tlora.inject(model, rank=8, variant="lora", **kw)
    else:
        adapter = tlora.inject(model, rank=8, min_rank=2, variant=variant, **kw)
    adapter.state.fold_cache.budget = _BUDGET[0]
    _LAST[0] = adapter
    return adapter


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


class Calls:
    """Counts the native calls of each path."""

    def __init__(self, monkeypatch):
        self.fold = self.factored = 0
        native = tlora._native
        fold, fwd = native.fold_weight, native.lowrank_forward

        def fold_weight(*a):
            self.fold += 1
            return fold(*a)

        def lowrank_forward(*a):
            self.factored += 1
            return fwd(*a)

        monkeypatch.setattr(native, "fold_weight", fold_weight)
        monkeypatch.setattr(native, "lowrank_forward", lowrank_forward)


@pytest.fixture
def calls(monkeypatch):
    return Calls(monkeypatch)


def inference_folds(adapter) -> int:
    cache = adapter.state.fold_cache
    return sum(len(cache.folds_of(layer)) for layer in adapter.layers.values())


def factored(fn):
    """fn() with the fast path of the test's adapter switched off."""
    state = _LAST[0].state
    saved = state.fast_path
    state.fast_path = False
    try:
        return fn()
    finally:
        state.fast_path = saved


@pytest.fixture(autouse=True)
def _reset_budget():
    _BUDGET[0] = None
    yield
    _BUDGET[0] = None


@pytest.fixture(params=["cache", "no-cache"])
def cache_mode(request):
    if request.param == "no-cache":
        _BUDGET[0] = 0
    return request.param


# ---- one layer --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["tlora", "vanilla", "lora"])
@pytest.mark.parametrize("timesteps", [[500], [0, 500, 999], [999, 999, 10], None])
def test_layer_matches_factored_path(variant, timesteps, cache_mode, calls):
    torch.manual_seed(0)
    model = Holder()
    adapter = inject(model, variant)
    perturb(adapter)
    x = torch.randn(3, 40, 32)  # 120 tokens * (32 + 24) > 32 * 24: folding pays
    with torch.no_grad():
        if timesteps is None:
            with adapter.rank(8):
                want = factored(lambda: model(x))
                calls.fold = calls.factored = 0
                got = model(x)
        else:
            t = torch.tensor(timesteps)
            want = factored(lambda: model(x, t))
            calls.fold = calls.factored = 0
            got = model(x, t)
            again = model(x, t)
    assert calls.fold > 0 and calls.factored == 0
    assert rel_err(got, want) < RTOL
    if timesteps is not None:
        assert torch.equal(again, got)
        distinct = len(set(adapter.ranks_for(torch.tensor(timesteps)))) if variant != "lora" else 1
        # One fold per distinct rank, and none the second time when cached.
        assert calls.fold == distinct * (1 if cache_mode == "cache" else 2)
        assert len(adapter.state.fold_cache) == (distinct if cache_mode == "cache" else 0)


def test_mixed_ranks_group_by_rank(calls):
    """A batch whose samples use different ranks: each sample equals that sample alone."""
    torch.manual_seed(1)
    model = Holder()
    adapter = inject(model)
    perturb(adapter)
    x = torch.randn(4, 30, 32)
    t = torch.tensor([999, 10, 999, 500])
    with torch.no_grad():
        both = model(x, t)
        for i in range(4):
            alone = factored(lambda: model(x[i : i + 1], t[i : i + 1]))
            assert rel_err(both[i : i + 1], alone) < RTOL
    assert calls.fold == 3


def test_small_inputs_keep_the_factored_path(calls):
    torch.manual_seed(2)
    model = Holder(64, 64)
    adapter = inject(model)
    perturb(adapter)
    x = torch.randn(2, 8, 64)  # 16 tokens * 128 < 64 * 64: the factored update is cheaper
    with torch.no_grad():
        got = model(x, torch.tensor([300]))
    assert calls.fold == 0 and calls.factored == 1
    with torch.no_grad():
        # Once a rank is folded and cached (a large batch), small batches use it too: it is free.
        model(torch.randn(2, 64, 64), torch.tensor([300]))
        calls.factored = 0
        again = model(x, torch.tensor([300]))
    assert calls.factored == 0 and calls.fold == 1
    assert rel_err(again, got) < RTOL


def test_hooked_base_layer_runs_as_itself(calls):
    """A base layer with hooks (or a patched forward, e.g. accelerate's offloading) is called, not folded."""
    torch.manual_seed(12)
    model = Holder()
    adapter = inject(model)
    perturb(adapter)
    seen = []
    model.to_q.base_layer.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    x = torch.randn(2, 50, 32)
    with torch.no_grad():
        got = model(x, torch.tensor([100]))
    assert calls.fold == 0 and len(seen) == 1
    assert rel_err(got, factored(lambda: model(x, torch.tensor([100])))) < RTOL


def test_inference_mode_and_no_grad_requirements(calls):
    torch.manual_seed(3)
    model = Holder()
    adapter = inject(model)
    perturb(adapter)
    x = torch.randn(2, 50, 32)
    t = torch.tensor([700])
    want = factored(lambda: model(x, t).detach())
    calls.factored = 0
    with torch.inference_mode():
        a = model(x, t)
    # Grad mode on, but nothing requires grad (e.g. a frozen adapter): the fast path applies too.
    for p in adapter.parameters():
        p.requires_grad_(False)
    b = model(x, t)
    assert rel_err(a, want) < RTOL and rel_err(b, want) < RTOL
    assert calls.factored == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_and_autocast(dtype):
    torch.manual_seed(4)
    model = Holder(64, 48)
    adapter = inject(model)
    perturb(adapter, std=0.3)
    x = torch.randn(2, 64, 64)
    t = torch.tensor([100])
    with torch.no_grad():
        want = model(x, t)
        with torch.autocast("cpu", dtype=dtype):
            auto = model(x, t)
            auto_factored = factored(lambda: model(x, t))
        model.to_q.base_layer.to(dtype)
        half = model(x.to(dtype), t)
        half_factored = factored(lambda: model(x.to(dtype), t))
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    for got, ref in ((auto, auto_factored), (half, half_factored)):
        assert got.dtype == ref.dtype == dtype
        assert rel_err(got, want) < tol and rel_err(got, ref) < tol


# ---- training: never folded, cache invalidated --------------------------------------------------


@pytest.mark.parametrize("variant", ["tlora", "vanilla"])
def test_gradients_unaffected(variant, calls):
    torch.manual_seed(5)
    x = torch.randn(2, 40, 32)
    t = torch.tensor([100, 800])
    grads = {}
    for fast in (True, False):
        torch.manual_seed(6)
        model = Holder()
        adapter = inject(model, variant)
        perturb(adapter)
        adapter.state.fast_path = fast
        try:
            xi = x.clone().requires_grad_(True)
            model(xi, t).square().sum().backward()
        finally:
            adapter.state.fast_path = True
        grads[fast] = [xi.grad] + [p.grad for p in adapter.parameters()]
    assert calls.fold == 0
    for a, b in zip(grads[True], grads[False]):
        assert torch.equal(a, b)


def test_cache_invalidated_by_optimizer_step(calls):
    torch.manual_seed(7)
    model = Holder()
    adapter = inject(model)
    perturb(adapter)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    x = torch.randn(2, 40, 32)
    t = torch.tensor([400])
    with torch.no_grad():
        before = model(x, t)
    assert len(adapter.state.fold_cache) == 1
    # A training step: the forward with gradients drops the layer's folded weights at once.
    model(x, torch.tensor([900])).square().mean().backward()
    assert inference_folds(adapter) == 0 and len(adapter.state.fold_cache) == 0
    opt.step()
    with torch.no_grad():
        after = model(x, t)
        want = factored(lambda: model(x, t))
    assert calls.fold == 2
    assert rel_err(after, want) < RTOL and not torch.allclose(after, before)

    # Factors changed in place without any training forward (no_grad edit, load_state_dict):
    # the version counters tell.
    for edit in (
        lambda: adapter.layers["to_q"].lam.mul_(1.5),
        lambda: model.load_state_dict({k: v * 0.9 for k, v in model.state_dict().items()}),
        lambda: adapter.layers["to_q"].base_layer.weight.add_(0.1),
    ):
        with torch.no_grad():
            model(x, t)
            edit()
            got = model(x, t)
            want = factored(lambda: model(x, t))
        assert rel_err(got, want) < RTOL
    assert inference_folds(adapter) == 1  # stale entries are dropped, not kept


def _writes(adapter, model):
    """Every way users and libraries write factors, each a different change of their values."""
    from diffusers.training_utils import EMAModel

    params = list(adapter.parameters())
    layer = adapter.layers["to_q"]
    ema = EMAModel(params, decay=0.5)
    ema.step([p * 0 + 0.01 for p in params])  # shadow weights that differ from the live ones
    buffers = [b for b in layer.buffers() if b.dtype == torch.float32 and b.dim() > 0]

    def numpy_view():
        p = params[0]
        p.detach().numpy()[...] *= 1.25  # shares memory; no counter sees it

    return {
        "data.add_": lambda: params[0].data.add_(0.05),
        "data.copy_": lambda: params[-1].data.copy_(params[-1].data * 1.3),
        "EMAModel.copy_to": lambda: ema.copy_to(params),
        "vector_to_parameters": lambda: torch.nn.utils.vector_to_parameters(
            torch.nn.utils.parameters_to_vector(params) * 0.8, params
        ),
        "no_grad in place": lambda: params[0].mul_(1.1),
        "load_state_dict": lambda: model.load_state_dict({k: v * 0.9 for k, v in model.state_dict().items()}),
        "numpy view": numpy_view,
        # (the frozen copies are constants of the method; tlora.load writes them in place)
        "frozen buffer in place": lambda: buffers[0].mul_(1.2) if buffers else params[0].mul_(1.2),
    }


@pytest.mark.parametrize("variant", ["tlora", "vanilla"])
@pytest.mark.parametrize("call", ["model", "layer"])
def test_folds_follow_every_write_to_the_factors(variant, call):
    """Whatever writes the factors (EMA, `.data`, numpy, load_state_dict, an optimizer), the
    folded inference output equals the factored one, whether the layer runs inside its model's
    forward or is called on its own."""
    torch.manual_seed(3)
    model = Holder()
    adapter = inject(model, variant)
    perturb(adapter)
    x = torch.randn(2, 40, 32)
    t = torch.tensor([300])
    layer = adapter.layers["to_q"]

    def run():
        if call == "model":
            return model(x, t)
        with adapter.timestep(t):
            return layer(x)

    names = list(_writes(adapter, model))
    for name in names:
        write = _writes(adapter, model)[name]
        with torch.no_grad():
            run()  # folds (and caches) at the current factors
            assert len(adapter.state.fold_cache) == 1, name
            before = run()
            write()
            got = run()
            want = factored(run)
        assert not torch.equal(got, before), f"{name}: the write changed nothing"
        assert rel_err(got, want) < RTOL, f"{name}: folded output is stale ({rel_err(got, want):.3g})"


def test_ema_validation_on_a_unet_matches_factored_path():
    """diffusers' EMAModel on a tiny SD UNet, as training scripts use it: validate with the EMA
    weights (copy_to after store), then restore the raw ones; both outputs equal the factored path."""
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    unet = tlora.testing.tiny.tiny_sd_unet()
    adapter = inject(unet)
    perturb(adapter, std=0.05)
    params = list(adapter.parameters())
    ema = EMAModel(params, decay=0.9)
    ema.step(params)  # (its first step copies: decay 0 at step 0)
    perturb(adapter, seed=2, std=0.5)
    ema.step(params)  # the shadow weights: 0.9 of the first state, far from the live ones
    g = torch.Generator().manual_seed(0)
    kwargs = dict(
        sample=torch.randn(2, 4, tlora.testing.tiny.LATENT_SIZE, tlora.testing.tiny.LATENT_SIZE, generator=g),
        timestep=torch.tensor([700, 20]),
        encoder_hidden_states=torch.randn(2, tlora.testing.tiny.TOKENS, tlora.testing.tiny.SD_CROSS_DIM, generator=g),
    )
    with torch.no_grad():
        raw = unet(**kwargs).sample
        ema.store(params)
        ema.copy_to(params)
        with_ema = unet(**kwargs).sample
        want_ema = factored(lambda: unet(**kwargs).sample)
        ema.restore(params)
        back = unet(**kwargs).sample
        want_raw = factored(lambda: unet(**kwargs).sample)
    assert rel_err(with_ema, want_ema) < RTOL and rel_err(with_ema, raw) > 100 * RTOL
    assert rel_err(back, want_raw) < RTOL and torch.equal(back, raw)


def test_cache_is_bounded_and_never_thrashes(calls):
    """A full cache keeps what it has and folds the rest on the spot: a repeated sweep over more
    ranks than fit re-folds only those that do not fit (LRU eviction would re-fold every one)."""
    torch.manual_seed(8)
    model = Holder()
    adapter = inject(model)
    perturb(adapter)
    one = 32 * 24 * 4
    adapter.state.fold_cache.budget = 3 * one
    x = torch.randn(2, 40, 32)
    cache = adapter.state.fold_cache
    sweep = (0, 200, 400, 600, 800)  # five distinct ranks (8, 7, 6, 4, 3)
    with torch.no_grad():
        for t in sweep:
            model(x, torch.tensor([t]))
            assert cache.nbytes <= 3 * one
        assert len(cache) == 3 and calls.fold == 5 and cache.stores == 3 and cache.misses == 2
        for t in sweep:
            model(x, torch.tensor([t]))
        # The first three stay; only the two that never fit are folded again.
        assert calls.fold == 7 and cache.hits == 3 and cache.misses == 4 and len(cache) == 3
        got = model(x, torch.tensor([800]))
        assert rel_err(got, factored(lambda: model(x, torch.tensor([800])))) < RTOL
    assert cache.stats()["entries"] == 3
    adapter.remove()
    assert len(cache) == 0 and cache.nbytes == 0


def test_many_layers_over_budget_refold_only_the_overflow(calls):
    """The issue's case: room for 8 of 10 layers. Per sampling step LRU re-folded all 10; now 2."""

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.ModuleDict({"to_q": nn.Linear(32, 32)}) for _ in range(10))

        def forward(self, x, timestep=None):
            for block in self.layers:
                x = block["to_q"](x)
            return x

    torch.manual_seed(9)
    model = Stack()
    adapter = inject(model)
    perturb(adapter)
    adapter.state.fold_cache.budget = 8 * 32 * 32 * 4
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        model(x, torch.tensor([500]))
        first = calls.fold
        model(x, torch.tensor([500]))
    assert first == 10 and calls.fold - first == 2
    assert adapter.state.fold_cache.hits == 8


def test_the_cache_owns_the_folds():
    """Folds are the cache's, by layer and (rank, device, dtype): kept by `put` (under what they
    depend on; None: untrackable, never kept), served by `get`, and gone at `drop`, or at `check`
    when that dependency changed or the layer's factors no longer hold the values folded from."""
    torch.manual_seed(0)
    layer = inject(Holder()).layers["to_q"]
    cache = tlora.layer.FoldCache()
    key, other = (4, torch.device("cpu"), torch.float32), (2, torch.device("cpu"), torch.float32)
    w = torch.ones(24, 32)
    assert cache.put(layer, key, w, ("v",)) and cache.get(layer, key) is w and cache.get(layer, other) is None
    assert not cache.put(layer, other, w, None) and cache.misses == 1
    assert cache.folds_of(layer) == {key: w} and len(cache) == 1 and cache.nbytes == w.numel() * 4
    cache.check(layer, ("v",), None)
    assert cache.get(layer, key) is w  # the factors still hold the values folded from
    layer.q.data.add_(1.0)  # a write no version counter sees
    cache.check(layer, ("v",), None)
    assert cache.folds_of(layer) == {} and len(cache) == 0 and cache.nbytes == 0
    assert cache.put(layer, key, w, ("v",))
    cache.check(layer, ("another weight",), None)
    assert cache.get(layer, key) is None and cache.nbytes == 0
    assert cache.put(layer, key, w, ("v",))
    cache.drop(layer)
    assert cache.folds_of(layer) == {} and cache.nbytes == 0 and cache.stores == 3


def test_default_budget_is_per_device():
    cache = tlora.layer.FoldCache()
    assert cache.budget_for(torch.device("cpu")) == 1 << 30
    cache.budget = 123
    assert cache.budget_for(torch.device("cpu")) == 123


# ---- a stock pipeline --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["tlora", "lora"])
def test_sd_pipeline_images_match_factored_path(variant, cache_mode, calls):
    pipe = tiny_pipeline("sd")
    adapter = inject(denoiser(pipe), variant)
    perturb(adapter, std=0.05)
    kw = dict(sample_kwargs("sd", steps=5), guidance_scale=5.0, output_type="np")

    def sample():
        return pipe(**kw, generator=torch.Generator().manual_seed(0)).images

    want = factored(sample)
    calls.fold = calls.factored = 0
    got = sample()
    assert calls.fold > 0
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max())
    # A second run with the same schedule reuses every folded weight when caching.
    folds = calls.fold
    again = sample()
    np.testing.assert_array_equal(again, got)
    if cache_mode == "cache":
        assert calls.fold == folds
        assert len(adapter.state.fold_cache) > 0
    else:
        assert calls.fold == 2 * folds
    # Without the adapter's update (perturbation removed) the images differ: the check is not vacuous.
    adapter.remove()
    bare = sample()
    assert not np.allclose(bare, got, rtol=1e-3, atol=1e-3)
