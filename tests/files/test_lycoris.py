"""Third-party check: tlora's T-LoRA layer against LyCORIS's independent implementation.

LyCORIS (lycoris-lora 4.1.3, lycoris/modules/tlora.py) computes, for a Linear base layer,
    y = base(x) + scale * x (P diag(lam * m) Q - P0 diag(lam0 * m) Q0)^T,   scale = alpha / lora_dim,
with P = p_layer.weight (out x r), Q = q_layer.weight (r x in), lam = lambda_layer (1 x r), the
frozen copies in the buffers base_p, base_q, base_lambda, and m the (1, r) or (B, r) 0/1 mask set
globally with set_timestep_mask (compute_timestep_mask(t, T, r, r_min, a) builds it from the same
schedule as the paper). With the same factors, the same timestep and lora_alpha = alpha, both must
give the same output.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tlora

lycoris_tlora = pytest.importorskip("lycoris.modules.tlora")
TLoraModule = lycoris_tlora.TLoraModule
compute_timestep_mask = lycoris_tlora.compute_timestep_mask
set_timestep_mask = lycoris_tlora.set_timestep_mask
clear_timestep_mask = lycoris_tlora.clear_timestep_mask

T = 1000
TIMESTEPS = [0, 1, 90, 250, 333, 500, 640, 800, 999, 1000]


class Tiny(nn.Module):
    def __init__(self, in_f: int, out_f: int):
        super().__init__()
        self.to_q = nn.Linear(in_f, out_f)

    def forward(self, x, timestep=None):
        return self.to_q(x)


@pytest.fixture(autouse=True)
def _no_leftover_mask():
    clear_timestep_mask()
    yield
    clear_timestep_mask()


def _perturb(params, seed: int, amount: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(amount * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _lycoris_on(base: nn.Linear, rank: int, alpha: float, **kw) -> TLoraModule:
    module = TLoraModule("lora_unet_to_q", base, lora_dim=rank, alpha=alpha, **kw)
    module.apply_to()  # base.forward now runs the T-LoRA forward
    return module


def _copy_tlora_into_lycoris(layer, module: TLoraModule) -> None:
    with torch.no_grad():
        module.p_layer.weight.copy_(layer.p)
        module.q_layer.weight.copy_(layer.q)
        module.lambda_layer.copy_(layer.lam.unsqueeze(0))
        module.base_p.copy_(layer.p0)
        module.base_q.copy_(layer.q0)
        module.base_lambda.copy_(layer.lam0.unsqueeze(0))


def _copy_lycoris_into_tlora(module: TLoraModule, layer) -> None:
    with torch.no_grad():
        layer.p.copy_(module.p_layer.weight)
        layer.q.copy_(module.q_layer.weight)
        layer.lam.copy_(module.lambda_layer[0])
        layer.p0.copy_(module.base_p)
        layer.q0.copy_(module.base_q)
        layer.lam0.copy_(module.base_lambda[0])


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_lycoris_semantics_as_documented():
    """The facts this file relies on: mask shape and rank, scale = alpha / dim, update zero at init."""
    mask = compute_timestep_mask(500, T, 8, 4)
    assert mask.shape == (1, 8) and mask.sum() == 6
    base = nn.Linear(12, 10)
    module = TLoraModule("m", base, lora_dim=8, alpha=4.0, sig_type="last", use_data_init=False)
    assert module.scale == 0.5
    assert module.lambda_layer.shape == (1, 8) and module.base_lambda.shape == (1, 8)
    assert module.p_layer.weight.shape == (10, 8) and module.q_layer.weight.shape == (8, 12)


@pytest.mark.parametrize(
    "in_f,out_f,rank,min_rank,exponent,alpha",
    [
        (24, 16, 8, 4, 1.0, 8.0),
        (16, 32, 8, 2, 2.0, 4.0),
        (20, 20, 6, 1, 0.5, 12.0),
    ],
)
@pytest.mark.parametrize("mode", ["float64", "bypass"])
def test_tlora_factors_in_lycoris_give_the_same_output(in_f, out_f, rank, min_rank, exponent, alpha, mode):
    torch.manual_seed(0)
    model = Tiny(in_f, out_f)
    base = copy.deepcopy(model.to_q)
    tlora.inject(
        model, rank=rank, min_rank=min_rank, rank_exponent=exponent, lora_alpha=alpha, target_modules=["to_q"], seed=11
    )
    layer = model.to_q
    _perturb([layer.p, layer.lam, layer.q], seed=1)

    if mode == "float64":
        # LyCORIS's default forward adds (W + dW) - W: run it in float64 so that its own rounding
        # stays far below the tolerance; tlora runs in float32.
        base = base.double()
        module = _lycoris_on(base, rank, alpha, sig_type="last", use_data_init=False).double()
    else:
        module = _lycoris_on(base, rank, alpha, sig_type="last", use_data_init=False, bypass_mode=True)
    _copy_tlora_into_lycoris(layer, module)

    x = torch.randn(3, 5, in_f)
    outputs = {}
    with torch.no_grad():
        plain = layer.base_layer(x)
        for t in TIMESTEPS:
            mask = compute_timestep_mask(t, T, rank, min_rank, exponent)
            set_timestep_mask(mask)
            want = base(x.to(base.weight.dtype))
            got = model(x, torch.tensor([t, t, t]))
            _assert_same(got, want)
            outputs[int(mask.sum())] = got
    # The comparison covered several ranks, and each rank gives a different (non-zero) update.
    assert len(outputs) >= 3
    assert min((o - plain).abs().max() for o in outputs.values()) > 1e-3
    assert len({round(float(o.sum()), 4) for o in outputs.values()}) == len(outputs)


@pytest.mark.parametrize("sig_type", ["principal", "middle", "last"])
def test_lycoris_factors_in_tlora_give_the_same_output(sig_type):
    rank, min_rank, alpha = 8, 3, 16.0
    torch.manual_seed(1)
    model = Tiny(20, 28)
    base = copy.deepcopy(model.to_q)
    module = _lycoris_on(base, rank, alpha, sig_type=sig_type, use_data_init=True, bypass_mode=True)
    _perturb([module.p_layer.weight, module.q_layer.weight, module.lambda_layer], seed=2)

    tlora.inject(model, rank=rank, min_rank=min_rank, lora_alpha=alpha, target_modules=["to_q"])
    _copy_lycoris_into_tlora(module, model.to_q)

    x = torch.randn(2, 7, 20)
    with torch.no_grad():
        for t in TIMESTEPS:
            set_timestep_mask(compute_timestep_mask(t, T, rank, min_rank))
            _assert_same(model(x, t), base(x))


def test_per_sample_timesteps_match_lycoris_batch_mask():
    """A (B, r) mask in LyCORIS's bypass path (2-D input) against per-sample timesteps in tlora."""
    rank, min_rank, alpha = 8, 2, 8.0
    torch.manual_seed(2)
    model = Tiny(16, 12)
    base = copy.deepcopy(model.to_q)
    tlora.inject(model, rank=rank, min_rank=min_rank, lora_alpha=alpha, target_modules=["to_q"])
    _perturb([model.to_q.p, model.to_q.lam, model.to_q.q], seed=3)
    module = _lycoris_on(base, rank, alpha, sig_type="last", use_data_init=False, bypass_mode=True)
    _copy_tlora_into_lycoris(model.to_q, module)

    t = torch.tensor([0, 300, 700, 1000, 999, 150])
    mask = torch.cat([compute_timestep_mask(int(v), T, rank, min_rank) for v in t])
    assert len(set(mask.sum(1).tolist())) >= 4
    x = torch.randn(len(t), 16)
    with torch.no_grad():
        set_timestep_mask(mask)
        want = base(x)
        got = model(x, t)
    _assert_same(got, want)


def test_gradients_match_lycoris():
    rank, min_rank, alpha = 8, 4, 8.0
    torch.manual_seed(3)
    model = Tiny(16, 16)
    base = copy.deepcopy(model.to_q)
    tlora.inject(model, rank=rank, min_rank=min_rank, lora_alpha=alpha, target_modules=["to_q"])
    layer = model.to_q
    _perturb([layer.p, layer.lam, layer.q], seed=4)
    module = _lycoris_on(base, rank, alpha, sig_type="last", use_data_init=False, bypass_mode=True)
    _copy_tlora_into_lycoris(layer, module)

    x = torch.randn(4, 3, 16)
    g = torch.randn(4, 3, 16)
    t = 600
    set_timestep_mask(compute_timestep_mask(t, T, rank, min_rank))
    (base(x) * g).sum().backward()
    (model(x, t) * g).sum().backward()
    _assert_same(layer.p.grad, module.p_layer.weight.grad)
    _assert_same(layer.q.grad, module.q_layer.weight.grad)
    _assert_same(layer.lam.grad, module.lambda_layer.grad[0])
    assert layer.lam.grad[6:].abs().max() == 0  # rank 5 at t = 600: floor(0.4 * 4) + 4 = 5


@pytest.mark.parametrize("sig_type", ["principal", "middle", "last"])
def test_weight_init_matches_lycoris_data_init(sig_type):
    torch.manual_seed(4)
    model = Tiny(24, 18)
    module = TLoraModule("m", copy.deepcopy(model.to_q), lora_dim=6, alpha=6, sig_type=sig_type, use_data_init=True)
    tlora.inject(model, rank=6, init=sig_type, init_from="weight", target_modules=["to_q"])
    layer = model.to_q
    torch.testing.assert_close(layer.lam, module.lambda_layer[0].detach(), rtol=1e-5, atol=1e-6)
    # Singular vectors are defined up to sign; P diag(lam) Q is not.
    ours = layer.p @ torch.diag(layer.lam) @ layer.q
    theirs = module.p_layer.weight @ torch.diag(module.lambda_layer[0]) @ module.q_layer.weight
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "rank,min_rank,exponent", [(8, 4, 1.0), (64, 32, 1.0), (16, 1, 2.0), (10, 3, 0.7), (6, 6, 1.0)]
)
def test_rank_schedule_matches_lycoris_mask(rank, min_rank, exponent):
    t = torch.arange(0, T + 1)
    ours = tlora.rank_schedule(t, rank, min_rank, exponent, T).tolist()
    theirs = [int(compute_timestep_mask(v, T, rank, min_rank, exponent).sum()) for v in t.tolist()]
    assert ours == theirs
