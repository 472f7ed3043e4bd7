"""The native low-rank update against a plain-PyTorch transcription of the paper's equations.

T-LoRA:   dW_t = P diag(lam * m_t) Q - P0 diag(lam0 * m_t) Q0,   m_t = (1, ..., 1, 0, ..., 0) with r(t) ones
Vanilla:  dW_t = B diag(m_t) A
LoRA:     dW   = B A
y = x W^T + b + scale * x dW_t^T, each sample of a batch with the rank of its own timestep, and
r(t) = floor(((T - t) / T)^a * (r - r_min)) + r_min.

The reference below is written from those equations only (float64, dense weight per sample) and
never calls into tlora.
"""

from __future__ import annotations

import math
import zlib

import pytest
import reference
import torch
from torch import nn

import tlora
from tlora.layer import lowrank_update

T = 1000


class Tiny(nn.Module):
    """A stand-in for a denoiser: one attention query projection, called with (x, timestep)."""

    def __init__(self, in_f: int, out_f: int, bias: bool = True):
        super().__init__()
        self.to_q = nn.Linear(in_f, out_f, bias=bias)

    def forward(self, x, timestep=None):
        return self.to_q(x)


# ---- the reference ---------------------------------------------------------------------------


def ref_rank(t: float, r: int, r_min: int, a: float, big_t: int = T) -> int:
    """r(t) from the timestep's exact binary value (benches/reference.py's, exact arithmetic)."""
    return reference.rank_at(t, r, r_min, big_t, a)


def ref_mask(rank: int, r: int, dtype=torch.float64) -> torch.Tensor:
    m = torch.zeros(r, dtype=dtype)
    m[:rank] = 1.0
    return m


def ref_delta_w(variant: str, f: dict[str, torch.Tensor], m: torch.Tensor) -> torch.Tensor:
    """The dense weight update (out x in) for one mask."""
    if variant == "tlora":
        return f["p"] @ torch.diag(f["lam"] * m) @ f["q"] - f["p0"] @ torch.diag(f["lam0"] * m) @ f["q0"]
    if variant == "vanilla":
        return f["up"] @ torch.diag(m) @ f["down"]
    return f["up"] @ f["down"]


def ref_update(
    variant: str, x: torch.Tensor, f: dict[str, torch.Tensor], ranks: list[int] | None, r: int, scale: float
) -> torch.Tensor:
    """scale * x dW^T, sample b of the batch with ranks[b] (or one shared rank, or full rank)."""
    if ranks is None:
        ranks = [r]
    if len(ranks) == 1:
        return scale * x @ ref_delta_w(variant, f, ref_mask(ranks[0], r, x.dtype)).T
    return torch.stack(
        [scale * x[b] @ ref_delta_w(variant, f, ref_mask(rb, r, x.dtype)).T for b, rb in enumerate(ranks)]
    )


TRAINABLE = {"tlora": ("p", "lam", "q"), "vanilla": ("down", "up"), "lora": ("down", "up")}
ORDER = {"tlora": ("p", "lam", "q", "p0", "lam0", "q0"), "vanilla": ("down", "up"), "lora": ("down", "up")}


def random_factors(
    variant: str, out_f: int, in_f: int, r: int, gen: torch.Generator, dtype=torch.float64
) -> dict[str, torch.Tensor]:
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    if variant == "tlora":
        return {
            "p": rnd(out_f, r),
            "lam": rnd(r),
            "q": rnd(r, in_f),
            "p0": rnd(out_f, r),
            "lam0": rnd(r),
            "q0": rnd(r, in_f),
        }
    return {"down": rnd(r, in_f), "up": rnd(out_f, r)}


def perturb(layer, gen: torch.Generator, amount: float = 0.3) -> None:
    """Move the trainable factors away from their init so that the update is not zero."""
    with torch.no_grad():
        for name in TRAINABLE[layer.config.variant]:
            p = getattr(layer, name)
            p.add_(amount * torch.randn(p.shape, generator=gen, dtype=p.dtype))


# ---- the whole layer through tlora.inject ------------------------------------------------------

CASES = [
    # variant, in, out, rank, min_rank, exponent, lora_alpha, batch, tokens, bias
    ("tlora", 24, 16, 8, 2, 1.0, None, 4, 5, True),
    ("tlora", 16, 32, 16, 4, 2.0, 8.0, 3, 1, True),
    ("tlora", 20, 20, 5, 1, 0.5, 3.0, 5, 7, False),
    ("tlora", 12, 18, 6, 6, 1.0, None, 2, 3, True),  # min_rank = rank: Ortho-LoRA, no mask
    ("vanilla", 24, 16, 8, 2, 1.0, 4.0, 4, 5, True),
    ("vanilla", 16, 40, 12, 3, 3.0, None, 3, 2, False),
    ("lora", 24, 16, 8, None, 1.0, 16.0, 4, 5, True),
    ("lora", 10, 30, 10, None, 1.0, None, 2, 4, True),
    # Many tokens per sample: training folds the update into the weight, per sample
    # (src/kernel/folded.rs); the cases above fold with a shared timestep where the batch is long enough.
    ("tlora", 24, 16, 8, 2, 1.0, None, 3, 40, True),
    ("vanilla", 16, 20, 6, 2, 2.0, 4.0, 2, 30, False),
    ("lora", 12, 10, 4, None, 1.0, 8.0, 2, 30, True),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_injected_layer_matches_reference(case):
    variant, in_f, out_f, r, r_min, a, alpha, batch, tokens, bias = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    model = Tiny(in_f, out_f, bias)
    adapter = tlora.inject(
        model,
        rank=r,
        min_rank=r_min,
        rank_exponent=a,
        variant=variant,
        target_modules=["to_q"],
        lora_alpha=alpha,
        seed=3,
    )
    layer = model.to_q
    perturb(layer, gen)
    scale = 1.0 if alpha is None else alpha / r
    r_min_eff = r if variant == "lora" else r_min

    # Distinct per-sample timesteps (including both ends of the range), then one shared timestep.
    t_batch = torch.randint(0, T + 1, (batch,), generator=gen)
    t_batch[0] = 0
    if batch > 1:
        t_batch[-1] = T
    for timestep in (t_batch, torch.tensor(float(t_batch[batch // 2])), int(t_batch[-1])):
        x = torch.randn(batch, tokens, in_f, generator=gen, requires_grad=True)
        out = model(x, timestep)
        g = torch.randn(out.shape, generator=gen)
        (out * g).sum().backward()

        ts = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).tolist()
        ranks = None if variant == "lora" else [ref_rank(t, r, r_min_eff, a) for t in ts]
        if variant == "tlora" and r_min_eff < r and len(ts) > 1:
            assert len(set(ranks)) > 1, "the test should exercise per-sample ranks"

        # Reference in float64 with autograd.
        xr = x.detach().double().requires_grad_(True)
        fr = {
            k: t.detach().double().requires_grad_(k in TRAINABLE[variant])
            for k, t in zip(layer.factor_names(), layer.factors())
        }
        w = layer.base_layer.weight.detach().double()
        b = layer.base_layer.bias.detach().double() if bias else 0.0
        ref = xr @ w.T + b + ref_update(variant, xr, fr, ranks, r, scale)
        (ref * g.double()).sum().backward()

        torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
        for name in TRAINABLE[variant]:
            param = getattr(layer, name)
            assert param.grad is not None and param.grad.dtype == torch.float32, name
            torch.testing.assert_close(param.grad.double(), fr[name].grad, rtol=1e-5, atol=1e-5, msg=name)
            param.grad = None
        # Frozen copies and the base layer never get gradients.
        assert layer.base_layer.weight.grad is None
        if variant == "tlora":
            assert not any(getattr(layer, n).requires_grad for n in ("p0", "lam0", "q0"))
    adapter.remove()
    assert type(model.to_q) is nn.Linear


def test_inactive_ranks_get_exactly_zero_gradient():
    model = Tiny(16, 16)
    tlora.inject(model, rank=8, min_rank=2, target_modules=["to_q"])
    layer = model.to_q
    perturb(layer, torch.Generator().manual_seed(0))
    x = torch.randn(3, 4, 16)
    t = torch.tensor([900, 950, 1000])  # ranks 2 or 3: ranks 3..7 are unused by every sample
    ranks = [ref_rank(float(v), 8, 2, 1.0) for v in t]
    k = max(ranks)
    assert k < 8
    model(x, t).square().sum().backward()
    assert torch.count_nonzero(layer.p.grad[:, k:]) == 0
    assert torch.count_nonzero(layer.lam.grad[k:]) == 0
    assert torch.count_nonzero(layer.q.grad[k:]) == 0
    assert torch.count_nonzero(layer.lam.grad[:k]) == k


# ---- the autograd Function directly, in float64 -----------------------------------------------

F64_CASES = [
    # variant, in, out, rank, ranks, scale, x shape prefix
    ("tlora", 7, 5, 4, [4, 1, 3], 1.0, (3, 2)),
    ("tlora", 6, 9, 5, [2], 0.75, (4, 3)),
    ("tlora", 6, 9, 5, [3, 3], 2.0, (2,)),
    ("tlora", 8, 4, 3, None, 1.5, (2, 2, 3)),
    ("vanilla", 7, 5, 4, [1, 4, 2, 2], 0.5, (4, 3)),
    ("vanilla", 5, 8, 3, [2], 1.0, (3,)),
    ("lora", 6, 6, 4, None, 1.25, (2, 5)),
]


@pytest.mark.parametrize("case", F64_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(F64_CASES)])
def test_lowrank_update_float64(case):
    variant, in_f, out_f, r, ranks, scale, prefix = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    f = random_factors(variant, out_f, in_f, r, gen)
    trainable = TRAINABLE[variant]
    for k in trainable:
        f[k].requires_grad_(True)
    x = torch.randn(*prefix, in_f, generator=gen, dtype=torch.float64, requires_grad=True)
    factors = [f[k] for k in ORDER[variant]]

    out = lowrank_update(x, factors, ranks, scale)
    assert out.dtype == torch.float64 and out.shape == (*prefix, out_f)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((out * g).sum(), [x, *(f[k] for k in trainable)])

    xr = x.detach().clone().requires_grad_(True)
    fr = {k: v.detach().clone().requires_grad_(k in trainable) for k, v in f.items()}
    ref = ref_update(variant, xr, fr, ranks, r, scale)
    ref_grads = torch.autograd.grad((ref * g).sum(), [xr, *(fr[k] for k in trainable)])

    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for name, got, want in zip(("x", *trainable), grads, ref_grads):
        assert got.dtype == torch.float64, name
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)

    # Frozen factors never get a gradient.
    if variant == "tlora":
        assert all(not f[k].requires_grad for k in ("p0", "lam0", "q0"))


@pytest.mark.parametrize("case", F64_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(F64_CASES)])
def test_gradcheck(case):
    variant, in_f, out_f, r, ranks, scale, prefix = case
    gen = torch.Generator().manual_seed(7)
    f = random_factors(variant, out_f, in_f, r, gen)
    trainable = TRAINABLE[variant]
    frozen = [k for k in ORDER[variant] if k not in trainable]
    x = torch.randn(*prefix, in_f, generator=gen, dtype=torch.float64, requires_grad=True)
    inputs = (x, *(f[k].requires_grad_(True) for k in trainable))

    def fn(x, *train):
        return lowrank_update(x, [*train, *(f[k] for k in frozen)], ranks, scale)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_lowrank_update_only_x_requires_grad():
    """The backward must handle frozen factors everywhere (e.g. evaluating with a frozen adapter)."""
    gen = torch.Generator().manual_seed(1)
    f = random_factors("tlora", 5, 6, 4, gen)
    x = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    out = lowrank_update(x, [f[k] for k in ORDER["tlora"]], [4, 2], 1.0)
    (gx,) = torch.autograd.grad(out.sum(), [x])
    xr = x.detach().clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(ref_update("tlora", xr, f, [4, 2], 4, 1.0).sum(), [xr])
    torch.testing.assert_close(gx, gr, rtol=1e-12, atol=1e-12)


# ---- rank schedule -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "r,r_min,a,big_t",
    [(64, 32, 1.0, 1000), (8, 4, 2.0, 1000), (16, 1, 0.5, 1000), (5, 5, 1.0, 1000), (32, 3, 1.7, 50), (4, 1, 3.0, 1)],
)
def test_rank_schedule_matches_formula(r, r_min, a, big_t):
    gen = torch.Generator().manual_seed(r * 100 + r_min)
    ints = torch.arange(0, big_t + 1)
    floats = torch.rand(500, generator=gen, dtype=torch.float64) * big_t
    for t in (ints, floats, floats.float()):
        got = tlora.rank_schedule(t, r, r_min, a, big_t)
        assert got.dtype == torch.int64 and got.shape == t.shape
        want = [ref_rank(v, r, r_min, a, big_t) for v in t.double().tolist()]
        assert got.tolist() == want
    # The endpoints and monotonicity: r at t = 0, r_min at t = T, never increasing with t.
    full = tlora.rank_schedule(ints, r, r_min, a, big_t)
    assert full[0] == r and full[-1] == r_min
    assert bool((full[1:] <= full[:-1]).all())
    # Scalars and 2-D tensors keep their shape.
    assert tlora.rank_schedule(0, r, r_min, a, big_t).shape == ()
    assert tlora.rank_schedule(torch.zeros(2, 3), r, r_min, a, big_t).shape == (2, 3)


@pytest.mark.parametrize(
    "r,r_min,a,big_t",
    [(128, 28, 1.0, 1000), (100, 10, 1.0, 1000), (64, 32, 1.0, 1000), (7, 3, 1.0, 999), (9, 2, 1.0, 7)]
    + [(128, 28, 2.0, 1000), (100, 10, 0.5, 1000), (64, 16, 3.0, 1000), (33, 5, 1.7, 1000)],
)
def test_host_and_device_ranks_are_exact_at_every_timestep(r, r_min, a, big_t):
    """Both ways tlora computes r(t): the native schedule (host) and tensor ops on the timestep's
    device (`Adapter.device_ranks`, here on the CPU), at every integer step (where exact products
    sit on the floor's boundaries: r 128 / 28 at t = 420, 430, 710, r 100 / 10 at t = 300) and on
    float32 and float64 timesteps, against the exact value."""
    model = Tiny(16, 16)
    adapter = tlora.inject(model, rank=r if r <= 16 else 16, min_rank=min(r_min, 16), rank_exponent=a)
    # The device path for these (r, r_min, T): the same adapter code, with its settings swapped.
    adapter.config.rank, adapter.config.min_rank, adapter.config.num_train_timesteps = r, r_min, big_t
    gen = torch.Generator().manual_seed(r * 31 + r_min)
    ints = torch.arange(0, big_t + 1)
    floats = torch.rand(400, generator=gen, dtype=torch.float64) * big_t
    for t in (ints, ints.float(), floats, floats.float()):
        want = [ref_rank(v, r, r_min, a, big_t) for v in t.double().tolist()]
        assert tlora.rank_schedule(t, r, r_min, a, big_t).tolist() == want, f"host, {t.dtype}"
        assert adapter.device_ranks(t).tolist() == want, f"device, {t.dtype}"
    if (r, r_min, a) == (128, 28, 1.0):
        assert tlora.rank_schedule(torch.tensor([420, 430, 710]), r, r_min).tolist() == [86, 85, 57]


def test_rank_schedule_hand_values():
    # floor((1000 - t) / 1000 * 32) + 32
    got = tlora.rank_schedule(torch.tensor([0.0, 1.0, 31.25, 31.26, 500.0, 999.0, 1000.0]), 64, 32)
    assert got.tolist() == [64, 63, 63, 62, 48, 32, 32]


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(timesteps=float("nan")), "NaN"),
        (dict(timesteps=torch.tensor([10.0, float("nan")])), "NaN"),
        (dict(timesteps=-1), "outside"),
        (dict(timesteps=-0.001), "outside"),
        (dict(timesteps=1000.5), "outside"),
        (dict(timesteps=torch.tensor([0, 2000])), "outside"),
        (dict(timesteps=10, min_rank=9), "min_rank"),
        (dict(timesteps=10, min_rank=0), "min_rank"),
        (dict(timesteps=10, rank=0, min_rank=0), "rank must be >= 1"),
        (dict(timesteps=10, rank_exponent=0.0), "rank_exponent"),
        (dict(timesteps=10, rank_exponent=-1.0), "rank_exponent"),
        (dict(timesteps=10, rank_exponent=float("nan")), "rank_exponent"),
        (dict(timesteps=10, num_train_timesteps=0), "num_train_timesteps"),
    ],
)
def test_rank_schedule_errors(kwargs, fragment):
    args = dict(rank=8, min_rank=4, rank_exponent=1.0, num_train_timesteps=1000)
    args.update(kwargs)
    with pytest.raises(ValueError, match=fragment):
        tlora.rank_schedule(**args)


# ---- initialisation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant,init_from", [("tlora", "random"), ("tlora", "weight"), ("vanilla", "random"), ("lora", "random")]
)
def test_zero_update_at_init(variant, init_from):
    torch.manual_seed(0)
    model = Tiny(24, 20)
    x = torch.randn(3, 5, 24)
    t = torch.tensor([0, 400, 1000])
    with torch.no_grad():
        base = model.to_q(x)
    tlora.inject(model, rank=8, variant=variant, init_from=init_from, target_modules=["to_q"], lora_alpha=4.0)
    with torch.no_grad():
        for timestep in (t, 0, 1000):
            out = model(x, timestep)
            if variant == "tlora":
                torch.testing.assert_close(out, base, rtol=0, atol=1e-6)
            else:
                assert torch.equal(out, base)
    # The update is not trivially switched off: a change to a trainable factor changes the output.
    perturb(model.to_q, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(x, t) - base).abs().max() > 1e-3


@pytest.mark.parametrize("init", ["principal", "middle", "last"])
@pytest.mark.parametrize("init_from", ["random", "weight"])
@pytest.mark.parametrize("shape", [(24, 16), (16, 40)])
def test_orthogonal_init(init, init_from, shape):
    out_f, in_f = shape
    r = 6
    torch.manual_seed(2)
    model = Tiny(in_f, out_f)
    w = model.to_q.weight.detach().double().clone()
    tlora.inject(model, rank=r, init=init, init_from=init_from, target_modules=["to_q"])
    layer = model.to_q
    p, lam, q = (t.detach().double() for t in (layer.p, layer.lam, layer.q))
    assert layer.p.dtype == layer.lam.dtype == layer.q.dtype == torch.float32
    assert p.shape == (out_f, r) and lam.shape == (r,) and q.shape == (r, in_f)
    eye = torch.eye(r, dtype=torch.float64)
    torch.testing.assert_close(p.T @ p, eye, rtol=0, atol=1e-5)
    torch.testing.assert_close(q @ q.T, eye, rtol=0, atol=1e-5)
    assert bool((lam > 0).all()) and bool((lam[1:] <= lam[:-1]).all())  # descending singular values
    # The frozen copies start equal to the trainable factors.
    assert torch.equal(layer.p0, layer.p) and torch.equal(layer.lam0, layer.lam) and torch.equal(layer.q0, layer.q)
    if init_from == "weight":
        s = torch.linalg.svdvals(w)
        full = min(out_f, in_f)
        start = {"principal": 0, "middle": (full - r) // 2, "last": full - r}[init]
        torch.testing.assert_close(lam, s[start : start + r], rtol=1e-5, atol=1e-6)
        # Each left vector is paired with its own right vector and singular value: P^T W Q^T = diag(lam).
        torch.testing.assert_close(p.T @ w @ q.T, torch.diag(lam), rtol=0, atol=1e-5)
    else:
        # Random init: singular values of an N(0, 1/r^2) matrix, so of order sqrt(max dim) / r.
        assert float(lam.max()) < 3 * (math.sqrt(out_f) + math.sqrt(in_f)) / r


def test_init_is_seeded_and_leaves_global_rng_alone():
    def factors(seed, variant="tlora"):
        model = Tiny(16, 16)
        state = torch.get_rng_state()
        tlora.inject(model, rank=4, variant=variant, target_modules=["to_q"], seed=seed)
        # inject draws its random matrices from its own seeded generator, never torch's.
        assert torch.equal(torch.get_rng_state(), state)
        layer = model.to_q
        return (layer.q if variant == "tlora" else layer.down).detach().clone()

    for variant in ("tlora", "vanilla"):
        torch.manual_seed(1)
        a = factors(0, variant)
        torch.manual_seed(2)
        b = factors(0, variant)
        assert torch.equal(a, b), variant  # same seed, same factors, whatever the global RNG
        assert not torch.equal(a, factors(1, variant)), variant


# ---- half precision and autocast ---------------------------------------------------------------


def _pair(variant: str, dtype: torch.dtype):
    """Two models with identical (non-zero) adapters: one float32, one with a `dtype` base layer."""
    torch.manual_seed(5)
    ref = Tiny(32, 24)
    low = Tiny(32, 24)
    low.load_state_dict(ref.state_dict())
    low.to(dtype)
    kw = dict(rank=8, min_rank=2, variant=variant, target_modules=["to_q"])
    if variant == "lora":
        kw.pop("min_rank")
    tlora.inject(ref, **kw)
    tlora.inject(low, **kw)
    perturb(ref.to_q, torch.Generator().manual_seed(9))
    with torch.no_grad():
        for name in TRAINABLE[variant]:
            getattr(low.to_q, name).copy_(getattr(ref.to_q, name))
    # Make the base layer of the float32 model hold the rounded weights, so that only the
    # computation's precision differs.
    with torch.no_grad():
        ref.to_q.base_layer.weight.copy_(low.to_q.base_layer.weight.float())
        ref.to_q.base_layer.bias.copy_(low.to_q.base_layer.bias.float())
    return ref, low


def _close_to(out: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert torch.isfinite(out).all()
    err = (out.float() - want).abs().max() / want.abs().max()
    assert err < tol, f"relative error {err:.3g}"


@pytest.mark.parametrize("variant", ["tlora", "vanilla", "lora"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(variant, dtype):
    ref, low = _pair(variant, dtype)
    x = torch.randn(3, 6, 32)
    t = torch.tensor([0, 500, 1000])
    want = ref(x, t)
    g = torch.randn(want.shape)
    (want * g).sum().backward()

    xl = x.to(dtype).requires_grad_(True)
    out = low(xl, t)
    assert out.dtype == dtype
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    _close_to(out, want.detach(), tol)
    (out.float() * g).sum().backward()
    assert xl.grad.dtype == dtype and torch.isfinite(xl.grad).all()
    for name in TRAINABLE[variant]:
        got, exp = getattr(low.to_q, name).grad, getattr(ref.to_q, name).grad
        assert got.dtype == torch.float32, name
        _close_to(got, exp, 4 * tol)
    assert low.to_q.base_layer.weight.grad is None


@pytest.mark.parametrize("variant", ["tlora", "vanilla"])
def test_autocast_bfloat16(variant):
    torch.manual_seed(5)
    model = Tiny(32, 24)
    tlora.inject(model, rank=8, min_rank=2, variant=variant, target_modules=["to_q"])
    perturb(model.to_q, torch.Generator().manual_seed(9))
    x = torch.randn(3, 6, 32)
    t = torch.tensor([0, 500, 1000])
    want = model(x, t)
    g = torch.randn(want.shape)
    (want * g).sum().backward()
    want_grads = {n: getattr(model.to_q, n).grad.clone() for n in TRAINABLE[variant]}
    model.zero_grad()

    xa = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(xa, t)
    assert out.dtype == torch.bfloat16
    _close_to(out, want.detach(), 3e-2)
    (out.float() * g).sum().backward()
    assert xa.grad.dtype == torch.float32 and torch.isfinite(xa.grad).all()
    for name in TRAINABLE[variant]:
        p = getattr(model.to_q, name)
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
        _close_to(p.grad, want_grads[name], 1e-1)


# ---- native errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,fragment",
    [
        (lambda: lowrank_update(torch.randn(2, 6), [torch.randn(8, 4), torch.randn(4), torch.randn(3, 6)] * 2), "rows"),
        (lambda: tlora._native.rank_schedule(torch.tensor([1.0]), 8, 9, 1.0, 1000), "min_rank"),
        (lambda: tlora._native.orthogonal_init(8, 4, 2, "sideways", 0), "sideways"),
        (lambda: tlora._native.gaussian(2, 2, float("inf"), 0), "non-finite"),
        (lambda: tlora.rank_schedule(10, 8, 4, 1.0, 2**70), "64-bit"),
        (lambda: tlora.rank_schedule("ten", 8, 4), "number"),
        (lambda: tlora.rank_schedule(10, 8.0, 4), "rank must be an integer"),
    ],
)
def test_native_refusals_are_tlora_errors(call, fragment):
    """What the Rust core refuses reaches Python as tlora's own error type (a ValueError), not a
    bare ValueError, TypeError or OverflowError."""
    with pytest.raises(tlora.ConfigError, match=fragment):
        call()


def test_native_writer_missing_folder_is_missing_file_error(tmp_path):
    target = tmp_path / "no such folder" / "x.bin"
    with pytest.raises(tlora.errors.MissingFileError, match="does not exist") as info:
        tlora._native.write_atomic(str(target), b"x")
    assert isinstance(info.value, FileNotFoundError)
