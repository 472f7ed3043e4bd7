"""The random orthogonal init draws (P, lambda, Q) from the law of a Gaussian matrix's singular
triplets without forming the matrix (src/init.rs). These tests compare that law, over many seeds,
with full float64 SVDs of Gaussian matrices drawn by torch (the reference), and check the factors'
shapes, orthonormality and device."""

import math

import pytest
import torch
from torch import nn

import tlora
from tlora import _native
from tlora.layer.ops import KERNEL_DEVICES

OUT, IN, R = 24, 16, 4
SEEDS = 400
START = {"principal": 0, "middle": (min(OUT, IN) - R) // 2, "last": min(OUT, IN) - R}


def ks_pvalue(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov test, asymptotic p-value (Stephens' small-sample correction)."""
    a, b = a.double().sort().values, b.double().sort().values
    both = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, both, right=True) / len(a)
    cdf_b = torch.searchsorted(b, both, right=True) / len(b)
    return _kolmogorov(float((cdf_a - cdf_b).abs().max()), len(a) * len(b) / (len(a) + len(b)))


def ks_pvalue_cdf(a: torch.Tensor, cdf) -> float:
    """One-sample Kolmogorov-Smirnov test against an exact CDF."""
    a = a.double().sort().values
    n = len(a)
    f = cdf(a)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = max(float((i / n - f).max()), float((f - (i - 1) / n).max()))
    return _kolmogorov(d, n)


def _kolmogorov(d: float, n_eff: float) -> float:
    en = math.sqrt(n_eff)
    lam = (en + 0.12 + 0.11 / en) * d
    return min(1.0, max(0.0, 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))))


def beta_cdf_integer(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """The Beta(a, b) CDF for integer a, b: P(Binomial(a + b - 1, x) >= a)."""
    n = a + b - 1
    return sum(math.comb(n, j) * x**j * (1 - x) ** (n - j) for j in range(a, n + 1))


def reference(init: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, lambda, Q) kept from full SVDs of SEEDS Gaussian N(0, 1/r^2) matrices (torch's RNG)."""
    g = torch.randn(SEEDS, OUT, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(1234)) / R
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    k = START[init]
    return u[:, :, k : k + R], s[:, k : k + R], vh[:, k : k + R, :]


def drawn(init: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, lambda, Q) from tlora's init for seeds 0..SEEDS-1."""
    factors = [_native.orthogonal_init(OUT, IN, R, init, seed) for seed in range(SEEDS)]
    return tuple(torch.stack([f[i] for f in factors]).double() for i in range(3))


@pytest.fixture(scope="module", params=["principal", "middle", "last"])
def both(request):
    return request.param, drawn(request.param), reference(request.param)


def test_singular_values_have_the_full_svd_law(both):
    init, (_, lam, _), (_, ref_lam, _) = both
    assert bool((lam[:, 1:] <= lam[:, :-1]).all()), "descending, as the SVD gives them"
    for j in range(R):
        a, b = lam[:, j], ref_lam[:, j]
        se = math.sqrt(float(a.var()) / SEEDS + float(b.var()) / SEEDS)
        assert abs(float(a.mean() - b.mean())) < 4 * se, (init, j, float(a.mean()), float(b.mean()))
        # The std's standard error, for near-normal samples, is about std / sqrt(2 n).
        se_std = math.sqrt((float(a.var()) + float(b.var())) / (2 * SEEDS))
        assert abs(float(a.std() - b.std())) < 4 * se_std, (init, j, float(a.std()), float(b.std()))
        assert ks_pvalue(a, b) > 1e-3, (init, j)


def test_the_comparison_can_tell_a_wrong_law_apart():
    """The same statistics reject the singular values of a slightly different matrix (25 x 16), so
    passing above is evidence, not the absence of a test."""
    ref_lam = reference("last")[1]
    g = torch.randn(SEEDS, OUT + 1, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(99)) / R
    wrong = torch.linalg.svdvals(g)[:, START["last"] : START["last"] + R]
    assert min(ks_pvalue(wrong[:, j], ref_lam[:, j]) for j in range(R)) < 1e-3


@pytest.mark.parametrize("side", ["p", "q"])
def test_subspaces_are_isotropic_with_the_full_svd_law(both, side):
    init, ours, ref = both
    first = {}
    for name, (p, _, q) in (("tlora", ours), ("svd", ref)):
        frame = p if side == "p" else q.transpose(1, 2)  # dim x r columns
        dim = frame.shape[1]
        eye = torch.eye(R, dtype=torch.float64)
        assert float((frame.transpose(1, 2) @ frame - eye).abs().max()) < 1e-5
        # E[P P^T] = (r / dim) I: each entry's mean within 5 standard errors of it.
        proj = frame @ frame.transpose(1, 2)
        se = proj.std(0) / math.sqrt(SEEDS)
        dev = (proj.mean(0) - (R / dim) * torch.eye(dim, dtype=torch.float64)).abs()
        assert bool((dev < 5 * se).all()), (init, name, side, float((dev / se).max()))
        # ||P^T e_1||^2 is Beta(r/2, (dim - r)/2) for a Haar frame.
        first[name] = (frame[:, 0, :] ** 2).sum(1)
        exact = ks_pvalue_cdf(first[name], lambda x: beta_cdf_integer(x, R // 2, (dim - R) // 2))
        assert exact > 1e-3, (init, name, side, exact)
    assert ks_pvalue(first["tlora"], first["svd"]) > 1e-3, (init, side)


def test_kept_update_has_the_full_svd_law(both):
    """P diag(lambda) Q is what the model sees (each pair's joint sign cancels in it): its entries
    have the law of U_k S_k V_k^T from the full SVD. This is where a missing sign fix of the QR
    shows (it biases the sign of the first entries of P and Q, hence of the update's (0, 0) entry)."""
    init, ours, ref = both
    update, ref_update = ((p * lam[:, None, :]) @ q for p, lam, q in (ours, ref))
    for i, j in ((0, 0), (0, 1), (OUT - 1, IN - 1), (7, 3)):
        assert ks_pvalue(update[:, i, j], ref_update[:, i, j]) > 1e-3, (init, i, j)
        se = float(ref_update[:, i, j].std()) / math.sqrt(SEEDS)
        assert abs(float(update[:, i, j].mean())) < 4 * se, (init, i, j)


def test_frames_and_values_are_independent(both):
    """U, V and S of a Gaussian matrix are independent: no correlation between P's first row
    weight, Q's first column weight and lambda_0 (within 4 standard errors of zero)."""
    init, (p, lam, q), _ = both
    stats = torch.stack([(p[:, 0, :] ** 2).sum(1), (q[:, :, 0] ** 2).sum(1), lam[:, 0]])
    corr = torch.corrcoef(stats)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert abs(float(corr[i, j])) < 4 / math.sqrt(SEEDS), (init, i, j, float(corr[i, j]))


def test_inject_on_small_layers_uses_the_law():
    """Through tlora.inject: factors orthonormal, float32, on the layer's device, scaled by 1/r,
    different per module, the same for the same seed; wider layers give wider frames."""
    model = nn.Sequential(nn.Linear(IN, OUT), nn.Linear(OUT, IN), nn.Linear(OUT, OUT))
    adapter = tlora.inject(model, rank=R, target_modules=r"\d", seed=3)
    layers = list(adapter.layers.values())
    assert len(layers) == 3
    for layer, (o, i) in zip(layers, [(OUT, IN), (IN, OUT), (OUT, OUT)]):
        assert layer.p.shape == (o, R) and layer.q.shape == (R, i) and layer.lam.shape == (R,)
        assert layer.p.dtype == layer.lam.dtype == layer.q.dtype == torch.float32
        eye = torch.eye(R)
        torch.testing.assert_close(layer.p.T @ layer.p, eye, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.q @ layer.q.T, eye, rtol=0, atol=1e-6)
        # Last singular values of an N(0, 1/r^2) matrix: (sqrt(m) - sqrt(n)) / r is their edge.
        lam = layer.lam.detach()
        assert 0 < float(lam.min()) < float(lam.max()) < 2 * (math.sqrt(o) + math.sqrt(i)) / R
    assert not torch.equal(layers[0].lam, layers[1].lam)
    again = nn.Sequential(nn.Linear(IN, OUT), nn.Linear(OUT, IN), nn.Linear(OUT, OUT))
    other = tlora.inject(again, rank=R, target_modules=r"\d", seed=3)
    for a, b in zip(layers, other.layers.values()):
        assert torch.equal(a.p, b.p) and torch.equal(a.lam, b.lam) and torch.equal(a.q, b.q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_factors_come_out_on_the_cuda_layer():
    cpu = _native.orthogonal_init(OUT, IN, R, "last", 5)
    gpu = _native.orthogonal_init(OUT, IN, R, "last", 5, None, "cuda:0")
    for c, g in zip(cpu, gpu):
        assert g.device.type == "cuda" and g.dtype == torch.float32
        # Same ChaCha draws; only the QR's rounding differs between devices.
        torch.testing.assert_close(g.cpu(), c, rtol=0, atol=1e-5)
    model = nn.Sequential(nn.Linear(IN, OUT)).cuda()
    layer = next(iter(tlora.inject(model, rank=R, target_modules=r"0").layers.values()))
    assert layer.p.device.type == layer.lam.device.type == layer.q.device.type == "cuda"


@pytest.mark.parametrize("name", ["tpu", "mps", "meta", "cuda:x"])
def test_bad_device_names_are_refused(name):
    with pytest.raises(tlora.ConfigError, match=rf'unsupported device "{name}": tlora\'s kernels run on "cpu", "cuda"'):
        _native.orthogonal_init(OUT, IN, R, "last", 0, None, name)


def test_one_device_policy(monkeypatch):
    """The kernels run on the CPU and CUDA devices, nowhere else (src/kernel `is_kernel_device`),
    and every part follows that one rule: the device names the init takes (CUDA: see
    test_factors_come_out_on_the_cuda_layer), the devices inject asks it for (others get CPU
    factors, moved), and the tensors the kernels take."""
    assert KERNEL_DEVICES == ("cpu", "cuda")
    assert _native.orthogonal_init(OUT, IN, R, "last", 0, None, "cpu")[0].device.type == "cpu"
    for name in ("mps", "meta", "xpu"):
        assert torch.device(name).type not in KERNEL_DEVICES
        with pytest.raises(tlora.ConfigError, match=f'unsupported device "{name}"'):
            _native.orthogonal_init(OUT, IN, R, "last", 0, None, name)
    # inject asks the init for the layer's device only where the kernels run; a model on the meta
    # device gets its factors made on the CPU and moved there, and the kernels refuse them.
    asked = []
    init = _native.orthogonal_init
    monkeypatch.setattr(_native, "orthogonal_init", lambda *a: asked.append(a[-1]) or init(*a))
    tlora.inject(nn.Sequential(nn.Linear(IN, OUT)), rank=R, target_modules=r"0")
    model = nn.Sequential(nn.Linear(IN, OUT, device="meta"))
    layer = next(iter(tlora.inject(model, rank=R, target_modules=r"0").layers.values()))
    assert asked == ["cpu", None] and layer.p.device.type == "meta"
    with pytest.raises(tlora.ConfigError, match="on the meta device .* or on a device tlora's kernels do not support"):
        _native.frozen_block(layer.p0, layer.lam0)
