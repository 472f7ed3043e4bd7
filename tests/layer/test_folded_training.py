"""The training call with the update folded into the weight (src/kernel/folded.rs, float32 and
float64): against the plain-PyTorch equations of test_kernels (float64, gradcheck), against the
factored path on the same layer, and where it is (and is not) taken.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from test_kernels import F64_CASES, ORDER, TRAINABLE, Tiny, perturb, random_factors, ref_update

import tlora
from tlora.layer import lowrank_update
from tlora.layer.ops import folded_linear


def _case_inputs(case, seed=None):
    variant, in_f, out_f, r, ranks, scale, prefix = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()) if seed is None else seed)
    f = random_factors(variant, out_f, in_f, r, gen)
    weight = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
    bias = torch.randn(out_f, generator=gen, dtype=torch.float64)
    x = torch.randn(*prefix, in_f, generator=gen, dtype=torch.float64, requires_grad=True)
    return f, weight, bias, x, gen


@pytest.mark.parametrize("case", F64_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(F64_CASES)])
@pytest.mark.parametrize("with_bias,keep", [(True, False), (False, False), (True, True)])
def test_folded_linear_float64(case, with_bias, keep):
    variant, in_f, out_f, r, ranks, scale, prefix = case
    f, weight, bias, x, gen = _case_inputs(case)
    bias = bias if with_bias else None
    trainable = TRAINABLE[variant]
    for k in trainable:
        f[k].requires_grad_(True)
    out = folded_linear(x, weight, bias, [f[k] for k in ORDER[variant]], ranks, scale, keep)
    assert out.dtype == torch.float64 and out.shape == (*prefix, out_f)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((out * g).sum(), [x, *(f[k] for k in trainable)])

    xr = x.detach().clone().requires_grad_(True)
    fr = {k: v.detach().clone().requires_grad_(k in trainable) for k, v in f.items()}
    ref = xr @ weight.T + (0.0 if bias is None else bias) + ref_update(variant, xr, fr, ranks, r, scale)
    ref_grads = torch.autograd.grad((ref * g).sum(), [xr, *(fr[k] for k in trainable)])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for name, got, want in zip(("x", *trainable), grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("case", F64_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(F64_CASES)])
def test_folded_gradcheck(case):
    variant = case[0]
    f, weight, bias, x, _ = _case_inputs(case, seed=7)
    trainable = TRAINABLE[variant]
    frozen = [k for k in ORDER[variant] if k not in trainable]
    inputs = (x, *(f[k].requires_grad_(True) for k in trainable))

    for keep in (False, True):

        def fn(x, *train, keep=keep):
            return folded_linear(x, weight, bias, [*train, *(f[k] for k in frozen)], case[4], case[5], keep)

        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_folded_path_trains_no_base_weight():
    f, weight, bias, x, _ = _case_inputs(F64_CASES[0])
    with pytest.raises(tlora.ConfigError, match="freeze them"):
        folded_linear(x, weight.requires_grad_(True), bias, [f[k] for k in ORDER["tlora"]], [4, 1, 3])


def _layer(in_f=24, out_f=16, dtype=torch.float32, variant="tlora"):
    torch.manual_seed(0)
    model = Tiny(in_f, out_f)
    kw = dict(rank=8, min_rank=2, variant=variant, target_modules=["to_q"], seed=3)
    if variant == "lora":
        kw.pop("min_rank")
    tlora.inject(model, **kw)
    perturb(model.to_q, torch.Generator().manual_seed(1))
    return model.to(dtype)


def _folded(out: torch.Tensor) -> bool:
    return type(out.grad_fn).__name__ == "FoldedUpdateBackward"


@pytest.mark.parametrize("variant", ["tlora", "vanilla", "lora"])
@pytest.mark.parametrize("timesteps", [[100, 900], [400, 400]])
def test_folded_and_factored_calls_agree(variant, timesteps, monkeypatch):
    """The same training call through both paths: the same output and gradients (float32)."""
    model = _layer(variant=variant)
    x = torch.randn(2, 64, 24, generator=torch.Generator().manual_seed(2))
    t = torch.tensor(timesteps)
    g = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(3))
    results = []
    for fold in (True, False):
        if not fold:
            monkeypatch.setattr(tlora._native, "fold_plan", lambda *a: None)
        xg = x.clone().requires_grad_(True)
        out = model(xg, t)
        assert _folded(out) == fold
        (out * g).sum().backward()
        grads = {n: getattr(model.to_q, n).grad for n in TRAINABLE[variant]}
        model.zero_grad(set_to_none=True)
        results.append((out.detach(), xg.grad, grads))
    (y1, gx1, g1), (y2, gx2, g2) = results
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-5)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-5, msg=n)
    assert model.to_q.base_layer.weight.grad is None


def test_training_folds_only_where_it_pays_and_keeps_precision():
    """Folded: float32 with many tokens per folded weight. Factored: few tokens, half precision
    and autocast (the folded weight would round the update away), a base weight that trains,
    no gradient at all (inference has its own fold cache)."""
    t = torch.tensor([100, 900])
    model = _layer()
    assert _folded(model(torch.randn(2, 64, 24, requires_grad=True), t))
    assert _folded(model(torch.randn(1, 16, 24, requires_grad=True), torch.tensor([300])))  # 16 tokens, one rank
    assert not _folded(model(torch.randn(2, 2, 24, requires_grad=True), t))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _folded(model(torch.randn(2, 64, 24, requires_grad=True), t))
    model.to_q.base_layer.weight.requires_grad_(True)
    out = model(torch.randn(2, 64, 24), t)
    assert not _folded(out)
    out.sum().backward()
    assert model.to_q.base_layer.weight.grad is not None
    for dtype in (torch.bfloat16, torch.float16):
        low = _layer(dtype=dtype)
        assert not _folded(low(torch.randn(2, 64, 24, dtype=dtype, requires_grad=True), t))


@pytest.mark.parametrize("case", F64_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(F64_CASES)])
@pytest.mark.parametrize("path", ["factored", "folded"])
def test_factor_gradients_when_the_input_needs_none(case, path):
    """A frozen input (a text encoder's states entering cross-attention): the factors' gradients
    still match the equations (the factored backward then forms Q's from a narrower product)."""
    variant, in_f, out_f, r, ranks, scale, prefix = case
    f, weight, bias, x, gen = _case_inputs(case)
    x = x.detach()
    trainable = TRAINABLE[variant]
    for k in trainable:
        f[k].requires_grad_(True)
    factors = [f[k] for k in ORDER[variant]]
    if path == "folded":
        out = folded_linear(x, weight, bias, factors, ranks, scale) - x @ weight.T - bias
    else:
        out = lowrank_update(x, factors, ranks, scale)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((out * g).sum(), [f[k] for k in trainable])
    fr = {k: v.detach().clone().requires_grad_(k in trainable) for k, v in f.items()}
    ref_grads = torch.autograd.grad((ref_update(variant, x, fr, ranks, r, scale) * g).sum(), [fr[k] for k in trainable])
    for name, got, want in zip(trainable, grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)
