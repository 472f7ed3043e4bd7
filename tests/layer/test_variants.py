"""The schedule shapes ("power", "cosine", "step") and the rank scaling ("none", "rank") against
plain references: r(t) from the timestep's exact value (benches/reference.py), on the host (the
native schedule) and on the device path (`ranks_of_levels`), at every integer step; the update
scale * (r / r(t)) * x dW_t^T from the paper's equations in float64, through the autograd Function,
gradcheck, the injected layer's three paths (factored, folded, device ranks) and a static export.
"""

from __future__ import annotations

import zlib

import pytest
import reference
import torch
from test_kernels import ORDER, TRAINABLE, Tiny, perturb, random_factors, ref_delta_w, ref_mask

import tlora
from tlora.errors import ConfigError
from tlora.layer import lowrank_update
from tlora.layer.ranks import ranks_of_levels

SETTINGS = [(8, 4, 1000), (64, 32, 1000), (128, 28, 1000), (100, 10, 1000), (33, 1, 999), (10, 2, 3), (9, 2, 30)]


def ref_rank(shape: str, t: float, r: int, r_min: int, big_t: int, boundary: float = 0.875) -> int:
    if shape == "cosine":
        return reference.cosine_rank_at(t, r, r_min, big_t)
    return reference.step_rank_at(t, r, r_min, big_t, boundary)


def timesteps(big_t: int, seed: int) -> list[torch.Tensor]:
    """Every integer step (as int64, float32 and float64 tensors) and random float ones."""
    ints = torch.arange(0, big_t + 1)
    floats = torch.rand(300, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * big_t
    return [ints, ints.float(), ints.double(), floats, floats.float()]


@pytest.mark.parametrize("r,r_min,big_t", SETTINGS)
def test_cosine_host_and_device_are_exact_at_every_step(r, r_min, big_t):
    for t in timesteps(big_t, r):
        want = [ref_rank("cosine", v, r, r_min, big_t) for v in t.double().tolist()]
        host = tlora.rank_schedule(t, r, r_min, 1.0, big_t, "cosine")
        device = ranks_of_levels(t, r, r_min, 1.0, big_t, "cosine")
        assert host.tolist() == want, f"host, {t.dtype}"
        assert device.dtype == torch.int64 and device.tolist() == want, f"device, {t.dtype}"
    full = tlora.rank_schedule(torch.arange(0, big_t + 1), r, r_min, 1.0, big_t, "cosine")
    assert full[0] == r and full[-1] == r_min and bool((full[1:] <= full[:-1]).all())


@pytest.mark.parametrize("boundary", [0.875, 0.5, 0.25, 1.0])
@pytest.mark.parametrize("r,r_min,big_t", SETTINGS[:2] + SETTINGS[4:])
def test_step_host_and_device_are_exact_at_every_step(r, r_min, big_t, boundary):
    for t in timesteps(big_t, r):
        want = [ref_rank("step", v, r, r_min, big_t, boundary) for v in t.double().tolist()]
        assert tlora.rank_schedule(t, r, r_min, 1.0, big_t, "step", boundary).tolist() == want, f"host {t.dtype}"
        assert ranks_of_levels(t, r, r_min, 1.0, big_t, "step", boundary).tolist() == want, f"device {t.dtype}"


def test_shapes_hand_values():
    # cosine, r 8 / 2: floor(6 cos(pi t / 2000)) + 2; cos(pi/4) 6 = 4.24, cos(0.45 pi) 6 = 0.94.
    t = torch.tensor([0.0, 1.0, 500.0, 900.0, 1000.0])
    assert tlora.rank_schedule(t, 8, 2, 1.0, 1000, "cosine").tolist() == [8, 7, 6, 2, 2]
    # T = 3, d = 8: cos(pi/3) 8 = 4 exactly at the integer step t = 2 (the snap keeps it on 4).
    assert tlora.rank_schedule(torch.arange(4), 10, 2, 1.0, 3, "cosine").tolist() == [10, 8, 6, 2]
    # step at 875 of 1000 (the default boundary), and scaled with T: 7 of 8.
    t = torch.tensor([0.0, 874.0, 874.999, 875.0, 1000.0])
    assert tlora.rank_schedule(t, 8, 2, 1.0, 1000, "step").tolist() == [8, 8, 8, 2, 2]
    assert tlora.rank_schedule(torch.arange(9), 8, 2, 1.0, 8, "step").tolist() == [8] * 7 + [2, 2]
    # The exponent applies to the power shape only.
    assert tlora.rank_schedule(t, 8, 2, 2.0, 1000, "step").tolist() == [8, 8, 8, 2, 2]


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(shape="linear"), "unknown rank_schedule"),
        (dict(shape="step", rank_boundary=0.0), "rank_boundary"),
        (dict(shape="step", rank_boundary=1.5), "rank_boundary"),
        (dict(shape="step", rank_boundary=float("nan")), "rank_boundary"),
        (dict(shape=3), "shape"),
        (dict(rank_boundary=True), "rank_boundary"),
    ],
)
def test_schedule_errors(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        tlora.rank_schedule(torch.tensor([10.0]), 8, 4, 1.0, 1000, **kwargs)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(rank_schedule="linear"), "unknown rank_schedule 'linear': choose one of power, cosine, step"),
        (dict(rank_scaling="alpha"), "unknown rank_scaling 'alpha': choose one of none, rank"),
        (dict(rank_boundary=0.0), "rank_boundary"),
        (dict(rank_boundary="0.5"), "rank_boundary"),
        (dict(variant="lora", rank_scaling="rank"), "variant 'lora' has no timestep mask"),
        (dict(variant="lora", rank_schedule="cosine"), "variant 'lora' has no timestep mask"),
    ],
)
def test_inject_refuses_unknown_options(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        tlora.inject(Tiny(8, 8), rank=4, target_modules=["to_q"], **kwargs)


def test_adapter_uses_its_schedule_on_both_paths():
    """`Adapter.ranks_for` (host) and `device_ranks` (device path) follow the adapter's shape."""
    for shape in ("cosine", "step"):
        adapter = tlora.inject(Tiny(16, 16), rank=16, min_rank=3, rank_schedule=shape, target_modules=["to_q"])
        t = torch.arange(0, 1001)
        want = [ref_rank(shape, float(v), 16, 3, 1000) for v in t]
        assert adapter.device_ranks(t).tolist() == want
        assert [adapter.ranks_for(int(v))[0] for v in t[::37]] == want[::37]
        adapter.remove()


# ---- rank scaling ------------------------------------------------------------------------------


def ref_scaled_update(variant, x, f, ranks, r, scale):
    """scale * (r / k_b) * x_b dW_{k_b}^T for each sample b (one shared k when ranks has one entry)."""
    if len(ranks) == 1:
        return scale * r / ranks[0] * x @ ref_delta_w(variant, f, ref_mask(ranks[0], r, x.dtype)).T
    return torch.stack(
        [scale * r / k * x[b] @ ref_delta_w(variant, f, ref_mask(k, r, x.dtype)).T for b, k in enumerate(ranks)]
    )


SCALED_CASES = [
    # variant, in, out, rank, ranks, scale, x shape prefix
    ("tlora", 7, 5, 4, [4, 1, 3], 1.0, (3, 2)),
    ("tlora", 6, 9, 5, [2], 0.75, (4, 3)),
    ("tlora", 6, 9, 5, [5], 2.0, (2,)),
    ("vanilla", 7, 5, 4, [1, 4, 2, 2], 0.5, (4, 3)),
    ("vanilla", 5, 8, 3, [3, 3], 1.0, (2, 2)),
]


@pytest.mark.parametrize("case", SCALED_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(SCALED_CASES)])
def test_rank_scaling_float64_matches_equations(case):
    variant, in_f, out_f, r, ranks, scale, prefix = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    f = random_factors(variant, out_f, in_f, r, gen)
    trainable = TRAINABLE[variant]
    for k in trainable:
        f[k].requires_grad_(True)
    x = torch.randn(*prefix, in_f, generator=gen, dtype=torch.float64, requires_grad=True)
    out = lowrank_update(x, [f[k] for k in ORDER[variant]], ranks, scale, rank_scaling="rank")
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((out * g).sum(), [x, *(f[k] for k in trainable)])

    xr = x.detach().clone().requires_grad_(True)
    fr = {k: v.detach().clone().requires_grad_(k in trainable) for k, v in f.items()}
    ref = ref_scaled_update(variant, xr, fr, ranks, r, scale)
    ref_grads = torch.autograd.grad((ref * g).sum(), [xr, *(fr[k] for k in trainable)])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for name, got, want in zip(("x", *trainable), grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)
    # "none" is the unscaled update: the two differ by r / k exactly where k < r.
    plain = lowrank_update(x.detach(), [f[k].detach() for k in ORDER[variant]], ranks, scale)
    ratio = torch.tensor([r / k for k in ranks], dtype=torch.float64).reshape(-1, *([1] * (out.dim() - 1)))
    torch.testing.assert_close(out.detach(), plain * ratio, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", SCALED_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(SCALED_CASES)])
def test_rank_scaling_gradcheck(case):
    variant, in_f, out_f, r, ranks, scale, prefix = case
    gen = torch.Generator().manual_seed(11)
    f = random_factors(variant, out_f, in_f, r, gen)
    trainable = TRAINABLE[variant]
    frozen = [k for k in ORDER[variant] if k not in trainable]
    x = torch.randn(*prefix, in_f, generator=gen, dtype=torch.float64, requires_grad=True)
    inputs = (x, *(f[k].requires_grad_(True) for k in trainable))

    def fn(x, *train):
        return lowrank_update(x, [*train, *(f[k] for k in frozen)], ranks, scale, rank_scaling="rank")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_lowrank_update_refuses_unknown_scaling():
    with pytest.raises(ConfigError, match="unknown rank_scaling"):
        lowrank_update(torch.randn(2, 6), [torch.randn(4, 6), torch.randn(5, 4)], [2], 1.0, rank_scaling="alpha")


@pytest.mark.parametrize("variant,alpha", [("tlora", None), ("tlora", 6.0), ("vanilla", 2.0)])
def test_rank_scaling_in_the_injected_layer(variant, alpha):
    """Training (factored, host ranks), inference (folded weights) and device ranks all give
    base(x) + alpha / r * r / r(t) * x dW_t^T, per sample."""
    r, r_min, in_f, out_f = 8, 2, 16, 16
    gen = torch.Generator().manual_seed(5)
    model = Tiny(in_f, out_f)
    adapter = tlora.inject(
        model,
        rank=r,
        min_rank=r_min,
        variant=variant,
        lora_alpha=alpha,
        rank_scaling="rank",
        target_modules=["to_q"],
        seed=2,
    )
    layer = model.to_q
    perturb(layer, gen)
    scale = 1.0 if alpha is None else alpha / r
    t = torch.tensor([0, 400, 900, 1000])
    ranks = [reference.rank_at(float(v), r, r_min) for v in t]
    assert len(set(ranks)) > 2
    w, b = layer.base_layer.weight.detach().double(), layer.base_layer.bias.detach().double()
    fr = {k: v.detach().double() for k, v in zip(layer.factor_names(), layer.factors())}

    def want(x):
        return x.double() @ w.T + b + ref_scaled_update(variant, x.double(), fr, ranks, r, scale)

    x = torch.randn(4, 3, in_f, generator=gen, requires_grad=True)
    torch.testing.assert_close(model(x, t).double(), want(x.detach()), rtol=1e-5, atol=1e-5)

    folds = []
    fold = layer._fold
    layer._fold = lambda *a: folds.append(a[2]) or fold(*a)
    x = torch.randn(4, 64, in_f, generator=gen)  # enough tokens that folding pays
    with torch.no_grad():
        torch.testing.assert_close(model(x, t).double(), want(x), rtol=1e-5, atol=1e-5)
        assert sorted(folds) == sorted(set(ranks)), "the folded path should have run"
        adapter.host_ranks = False
        torch.testing.assert_close(model(x, t).double(), want(x), rtol=1e-5, atol=1e-5)
    adapter.remove()


def test_rank_scaling_export_bakes_the_same_scale(tmp_path):
    """A static export at timestep t holds B A = scale * r / r(t) * dW_{r(t)}: the adapter's own
    update at t (its forward minus the base layer's)."""
    from safetensors.torch import load_file

    model = Tiny(12, 10)
    adapter = tlora.inject(model, rank=6, min_rank=2, rank_scaling="rank", lora_alpha=3.0, target_modules=["to_q"])
    perturb(model.to_q, torch.Generator().manual_seed(9))
    for timestep in (0.0, 600.0, 1000.0):
        result = tlora.export(adapter, tmp_path / "static.safetensors", timestep=timestep)
        k = reference.rank_at(timestep, 6, 2)
        assert result.rank == k
        baked = load_file(str(result.path))
        a = next(v for n, v in baked.items() if n.endswith("lora_A.weight")).double()
        bb = next(v for n, v in baked.items() if n.endswith("lora_B.weight")).double()
        x = torch.eye(12)
        with torch.no_grad():
            update = (model(x, torch.tensor([timestep])) - model.to_q.base_layer(x)).double().T
        torch.testing.assert_close(bb @ a, update, rtol=1e-5, atol=1e-5)
        fr = {n: v.detach().double() for n, v in zip(model.to_q.factor_names(), model.to_q.factors())}
        torch.testing.assert_close(bb @ a, 0.5 * 6 / k * ref_delta_w("tlora", fr, ref_mask(k, 6)), rtol=1e-5, atol=1e-6)
