"""The inference fast path (tlora.layer): with no gradient needed, the update is folded into the
weight, W_k = W + dW_k per rank, and cached. It must give what the factored path gives (1e-5
relative in float32), fold only when that is cheaper, never run when a gradient is needed, and
never serve a folded weight built from factors that have changed since."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch import nn

import tlora
import tlora.layer
from tlora.tiny import denoiser, sample_kwargs, tiny_pipeline

RTOL = 1e-5


class Holder(nn.Module):
    def __init__(self, in_f: int = 32, out_f: int = 24):
        super().__init__()
        self.to_q = nn.Linear(in_f, out_f)

    def forward(self, x, timestep=None):
        return self.to_q(x)


@torch.no_grad()
def perturb(adapter, seed: int = 1, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in adapter.parameters():
        p.add_(torch.randn(p.shape, generator=g) * std)


def inject(model, variant: str = "tlora", **kw):
    if variant == "lora":
        return tlora.inject(model, rank=8, variant="lora", **kw)
    return tlora.inject(model, rank=8, min_rank=2, variant=variant, **kw)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


class Calls:
    """Counts the native calls of each path."""

    def __init__(self, monkeypatch):
        self.fold = self.factored = 0
        native = tlora.layer._native
        fold, fwd, fwd_add = native.fold_weight, native.lowrank_forward, native.lowrank_forward_add

        def fold_weight(*a):
            self.fold += 1
            return fold(*a)

        def lowrank_forward(*a):
            self.factored += 1
            return fwd(*a)

        def lowrank_forward_add(*a):
            self.factored += 1
            return fwd_add(*a)

        monkeypatch.setattr(native, "fold_weight", fold_weight)
        monkeypatch.setattr(native, "lowrank_forward", lowrank_forward)
        monkeypatch.setattr(native, "lowrank_forward_add", lowrank_forward_add)


@pytest.fixture
def calls(monkeypatch):
    return Calls(monkeypatch)


def inference_folds(adapter) -> int:
    return sum(len(layer._folded) for layer in adapter.layers.values())


def factored(fn):
    """fn() with the fast path switched off."""
    saved = tlora.layer.FAST_PATH
    tlora.layer.FAST_PATH = False
    try:
        return fn()
    finally:
        tlora.layer.FAST_PATH = saved


@pytest.fixture(params=["cache", "no-cache"])
def cache_mode(request, monkeypatch):
    if request.param == "no-cache":
        monkeypatch.setattr(tlora.layer, "FOLD_CACHE_BYTES", 0)
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
            alone = factored(lambda: model(x[i:i + 1], t[i:i + 1]))
            assert rel_err(both[i:i + 1], alone) < RTOL
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
        tlora.layer.FAST_PATH = fast
        try:
            xi = x.clone().requires_grad_(True)
            model(xi, t).square().sum().backward()
        finally:
            tlora.layer.FAST_PATH = True
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
    # A training step: the forward with gradients drops the layer's folded weights at once (what
    # stays is the training stage of the frozen branch, which depends on frozen tensors only).
    model(x, torch.tensor([900])).square().mean().backward()
    assert inference_folds(adapter) == 0
    assert [key[0] for key in adapter.layers["to_q"]._staged] == ["stage"] and len(adapter.state.fold_cache) == 1
    opt.step()
    with torch.no_grad():
        after = model(x, t)
        want = factored(lambda: model(x, t))
    assert calls.fold == 2
    assert rel_err(after, want) < RTOL and not torch.allclose(after, before)

    # Factors changed in place without any training forward (no_grad edit, load_state_dict):
    # the version counters tell.
    for edit in (lambda: adapter.layers["to_q"].lam.mul_(1.5),
                 lambda: model.load_state_dict({k: v * 0.9 for k, v in model.state_dict().items()}),
                 lambda: adapter.layers["to_q"].base_layer.weight.add_(0.1)):
        with torch.no_grad():
            model(x, t)
            edit()
            got = model(x, t)
            want = factored(lambda: model(x, t))
        assert rel_err(got, want) < RTOL
    assert inference_folds(adapter) == 1  # stale entries are dropped, not kept


def test_cache_is_bounded(monkeypatch, calls):
    torch.manual_seed(8)
    model = Holder()
    adapter = inject(model)
    perturb(adapter)
    one = 32 * 24 * 4
    monkeypatch.setattr(tlora.layer, "FOLD_CACHE_BYTES", 3 * one)
    x = torch.randn(2, 40, 32)
    cache = adapter.state.fold_cache
    with torch.no_grad():
        for t in (0, 200, 400, 600, 800):
            model(x, torch.tensor([t]))
            assert cache.nbytes <= 3 * one
        assert len(cache) == 3 and calls.fold == 5
        # least recently used first out: 400, 600, 800 are kept
        model(x, torch.tensor([800]))
        assert calls.fold == 5
        got = model(x, torch.tensor([0]))
        assert calls.fold == 6
        assert rel_err(got, factored(lambda: model(x, torch.tensor([0])))) < RTOL
    adapter.remove()
    assert len(cache) == 0 and cache.nbytes == 0


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


# ---- training: the frozen branch folded into the base weight (SplitLowRank) ---------------------

def _train_step(model, adapter, x, t):
    xi = x.clone().requires_grad_(True)
    out = model(xi, t)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(11), dtype=out.dtype)
    (out * g).sum().backward()
    grads = [xi.grad] + [p.grad.clone() for p in adapter.parameters()]
    for p in adapter.parameters():
        p.grad = None
    return out.detach(), grads


class NativeCalls:
    """Counts the calls of one native function."""

    def __init__(self, monkeypatch, name: str):
        self.n = 0
        original = getattr(tlora.layer._native, name)

        def counted(*a):
            self.n += 1
            return original(*a)

        monkeypatch.setattr(tlora.layer._native, name, counted)


def split_calls(monkeypatch) -> NativeCalls:
    return NativeCalls(monkeypatch, "lowrank_split_forward")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("timesteps", [[300], [0, 999, 500], [999, 999, 10], None])
@pytest.mark.parametrize("bias", [True, False])
def test_split_training_path_matches_factored(dtype, tol, timesteps, bias, monkeypatch):
    torch.manual_seed(9)
    model = Holder()
    model.to_q = nn.Linear(32, 24, bias=bias)
    model.to(dtype)
    adapter = inject(model, lora_alpha=4.0)
    perturb(adapter)
    x = torch.randn(3, 40, 32, dtype=dtype)
    t = None if timesteps is None else torch.tensor(timesteps)
    calls = split_calls(monkeypatch)
    ctx = adapter.rank(8) if t is None else contextlib.nullcontext()
    with ctx:
        out, grads = _train_step(model, adapter, x, t)
        assert calls.n == 1
        monkeypatch.setattr(tlora.layer, "SPLIT_FROZEN", False)
        want, want_grads = _train_step(model, adapter, x, t)
        assert calls.n == 1
    assert rel_err(out, want) < tol
    for got, ref in zip(grads, want_grads):
        # The factors are float32 even in a float64 model: their gradients are rounded to float32
        # (a batch of mixed ranks sums them sample by sample), so they are held to float32's bound.
        assert got.dtype == ref.dtype and rel_err(got, ref) < (tol if got.dtype == torch.float64 else 1e-5)


def test_split_only_where_exact_and_cheaper(monkeypatch):
    torch.manual_seed(10)
    model = Holder(64, 64)
    adapter = inject(model)
    perturb(adapter)
    calls = split_calls(monkeypatch)
    t = torch.tensor([200])

    def step(x, **kw):
        before = calls.n
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kw.get("autocast", False)):
            model(x.clone().requires_grad_(True), t).float().sum().backward()
        return calls.n - before

    assert step(torch.randn(2, 64, 64)) == 1
    assert step(torch.randn(2, 8, 64)) == 0  # 16 tokens * 128 < 64 * 64: the factored update is cheaper
    assert step(torch.randn(2, 64, 64), autocast=True) == 0  # half precision: the branches must cancel exactly
    handle = model.to_q.base_layer.register_forward_hook(lambda *a: None)
    assert step(torch.randn(2, 64, 64)) == 0  # the base layer must run as itself
    handle.remove()
    model.to_q.base_layer.weight.requires_grad_(True)
    assert step(torch.randn(2, 64, 64)) == 0  # the base weight needs its own gradient
    assert model.to_q.base_layer.weight.grad is not None


class TwoLayers(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.to_q = nn.Linear(width, width)
        self.to_k = nn.Linear(width, width)

    def forward(self, x, timestep=None):
        return self.to_k(self.to_q(x))


@contextlib.contextmanager
def layer_settings(**values):
    """tlora.layer's module switches set to `values` inside the block."""
    saved = {name: getattr(tlora.layer, name) for name in values}
    for name, value in values.items():
        setattr(tlora.layer, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(tlora.layer, name, value)


def test_split_stage_is_cached_and_changes_nothing(monkeypatch):
    """The frozen branch's r_min stage is built once per run and cached; results are bitwise those
    of the same step with the stage computed on the spot (no cache), and match the factored path."""
    torch.manual_seed(12)
    model = TwoLayers()
    adapter = inject(model)
    perturb(adapter)
    x = torch.randn(3, 64, 64)
    stages, calls = NativeCalls(monkeypatch, "fold_frozen"), split_calls(monkeypatch)
    for i, t in enumerate(([900, 10, 500], [999, 999, 999], [0, 0, 0])):
        t = torch.tensor(t)
        split_before = calls.n
        _train_step(model, adapter, x, t)
        cached = _train_step(model, adapter, x, t)
        assert calls.n == split_before + 4  # both layers took the split path, twice
        assert stages.n == 2 * (i + 1)  # one stage per layer, built by the first step only
        assert all(len(layer._staged) == 1 for layer in adapter.layers.values())
        adapter.state.fold_cache.clear()
        with layer_settings(FOLD_CACHE_BYTES=0):
            spot = _train_step(model, adapter, x, t)
        assert calls.n == split_before + 6 and len(adapter.state.fold_cache) == 0
        with layer_settings(SPLIT_FROZEN=False):
            want = _train_step(model, adapter, x, t)
        assert stages.n == 2 * (i + 1)
        assert torch.equal(cached[0], spot[0]) and all(torch.equal(a, b) for a, b in zip(cached[1], spot[1]))
        assert rel_err(cached[0], want[0]) < RTOL
        assert all(rel_err(a, b) < RTOL for a, b in zip(cached[1], want[1]))


def test_split_stage_follows_the_frozen_tensors(monkeypatch):
    """A stage is rebuilt when the base weight or a frozen factor changes, skipped for ranks below
    r_min, and a full cache keeps the stages it has instead of evicting them (no thrashing)."""
    torch.manual_seed(13)
    model = TwoLayers()
    adapter = inject(model)
    perturb(adapter)
    x = torch.randn(2, 64, 64)
    t = torch.tensor([300])
    stages = NativeCalls(monkeypatch, "fold_frozen")

    def check():
        got = _train_step(model, adapter, x, t)
        with layer_settings(SPLIT_FROZEN=False):
            want = _train_step(model, adapter, x, t)
        assert rel_err(got[0], want[0]) < RTOL and all(rel_err(a, b) < RTOL for a, b in zip(got[1], want[1]))

    check()
    assert stages.n == 2
    layer = adapter.layers["to_q"]
    for edit in (lambda: layer.lam0.mul_(1.5), lambda: layer.q0.add_(0.01), lambda: layer.base_layer.weight.add_(0.1)):
        with torch.no_grad():
            edit()
        before = stages.n
        check()
        assert stages.n == before + 1  # only the edited layer's stage is rebuilt
    assert len(adapter.state.fold_cache) == 2  # the stale stage was replaced, not kept
    # A rank pinned below r_min cannot use the stage: the factored path, still exact.
    calls = split_calls(monkeypatch)
    with adapter.rank(1):
        check()
    assert calls.n == 0

    # Room for one stage: the first layer keeps it, the second computes its stage on the spot each
    # step (bitwise the same), and nothing is evicted and rebuilt step after step.
    adapter.state.fold_cache.clear()
    one = 64 * 64 * 4
    with layer_settings(FOLD_CACHE_BYTES=one):
        before = stages.n
        for _ in range(3):
            check()
        assert stages.n == before + 1 and len(adapter.state.fold_cache) == 1
