"""tlora on a CUDA device: the kernels against the paper's equations in float64, the tiny SD / SD-XL /
FLUX pipelines, a training step with no host synchronisation and a sampling loop with at most one
per forward (the fold cache's check of the factors), torch.compile.

Marked `cuda`; every test skips without a CUDA device. TLORA_TEST_DEVICE=cpu runs the device-
agnostic ones on the CPU instead (a dry run of the test logic where there is no GPU; the sync and
compile checks stay CUDA-only). Only public API is used: tlora.inject, adapter.parameters(),
adapter.timestep(), tlora.save / tlora.load (the file format is documented in the README) and
tlora.testing.tiny, so the tests hold whatever the kernels look like inside.

Reference (the paper, per sample b with rank r_b = r(t_b)):
    y_b = x_b W^T + bias + scale * x_b dW_b^T
    dW_b = P diag(lam * m_b) Q - P0 diag(lam0 * m_b) Q0      (tlora)
    dW_b = up diag(m_b) down                                 (vanilla)
    m_b = (1, ..., 1, 0, ..., 0) with r_b ones,  r(t) = floor(((T - t) / T)^a (r - r_min)) + r_min
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn

import tlora
from tlora.testing import tiny

pytestmark = pytest.mark.cuda

T = 1000
DEVICE = os.environ.get("TLORA_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
needs_device = pytest.mark.skipif(DEVICE is None, reason="no CUDA device (TLORA_TEST_DEVICE=cpu for a CPU dry run)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Largest error allowed, relative to the largest reference value: the output is rounded to the
# dtype once (bf16 keeps 8 bits, fp16 11) after float32 accumulation, plus the update's own rounding.
# Measured on the CPU (TLORA_TEST_DEVICE=cpu): fp32 5e-7, bf16 6.4e-3, fp16 8e-4 at most.
TOLERANCE = {"fp32": 1e-4, "bf16": 1.5e-2, "fp16": 3e-3}


@pytest.fixture(autouse=True)
def _exact_float32():
    """Plain float32 matmuls and convolutions (no TF32) so that float32 comparisons are tight."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---- the reference ---------------------------------------------------------------------------


def ref_rank(t: float, r: int, r_min: int, a: float) -> int:
    return math.floor(((T - t) / T) ** a * (r - r_min)) + r_min


def read_adapter(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Factors (float64) and metadata from an adapter file, as its documented format says."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["tlora"])
        tensors = {k: f.get_tensor(k).double() for k in f.keys()}
    return tensors, meta


def ref_delta_w(variant: str, f: dict[str, torch.Tensor], rank: int, r: int) -> torch.Tensor:
    m = torch.zeros(r, dtype=torch.float64)
    m[:rank] = 1.0
    if variant == "tlora":
        return f["p"] @ torch.diag(f["lam"] * m) @ f["q"] - f["p0"] @ torch.diag(f["lam0"] * m) @ f["q0"]
    return f["up"] @ torch.diag(m) @ f["down"]


class OneLayer(nn.Module):
    """A stand-in denoiser: one attention projection called with (x, timestep)."""

    def __init__(self, in_f: int, out_f: int):
        super().__init__()
        self.to_q = nn.Linear(in_f, out_f)

    def forward(self, x, timestep=None):
        return self.to_q(x)


def normalized_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-30))


# ---- kernels against the equations -------------------------------------------------------------


@needs_device
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("variant", ["tlora", "vanilla"])
def test_layer_matches_float64_equations_with_per_sample_ranks(variant, dtype, tmp_path):
    in_f, out_f, r, r_min, a, batch, tokens = 96, 80, 16, 4, 1.0, 4, 33
    gen = torch.Generator().manual_seed(7)
    model = OneLayer(in_f, out_f)
    with torch.no_grad():  # weights of a realistic size relative to the update
        model.to_q.weight.normal_(0, in_f**-0.5, generator=gen)
        model.to_q.bias.normal_(0, 0.1, generator=gen)
    model = model.to(DEVICE, DTYPES[dtype])
    adapter = tlora.inject(
        model, rank=r, min_rank=r_min, rank_exponent=a, variant=variant, target_modules=["to_q"], lora_alpha=8.0, seed=3
    )
    params = adapter.parameters()
    assert all(p.device.type == torch.device(DEVICE).type for p in params)
    with torch.no_grad():  # move away from the initialisation, where the tlora update is zero
        for p in params:
            p.add_(0.3 * torch.randn(p.shape, generator=gen).to(p.device, p.dtype))

    timesteps = torch.tensor([0, 999, 400, 750])  # per-sample ranks 16, 4, 11, 7
    ranks = [ref_rank(float(t), r, r_min, a) for t in timesteps]
    assert len(set(ranks)) == batch
    x = torch.randn(batch, tokens, in_f, generator=gen).to(DEVICE, DTYPES[dtype]).requires_grad_(True)
    upstream = torch.randn(batch, tokens, out_f, generator=gen)
    out = model(x, timesteps.to(DEVICE))
    assert out.dtype == DTYPES[dtype] and out.device.type == torch.device(DEVICE).type
    (out.float() * upstream.to(DEVICE)).sum().backward()

    path = tmp_path / "a.safetensors"
    tlora.save(model, path)
    saved, meta = read_adapter(path)
    scale = meta["scale"]
    f = {
        k.rsplit(".", 1)[1]: v.requires_grad_(k.rsplit(".", 1)[1] in ("p", "lam", "q", "up", "down"))
        for k, v in saved.items()
    }
    w = model.to_q.weight.detach().double().cpu()
    bias = model.to_q.bias.detach().double().cpu()
    xr = x.detach().double().cpu().requires_grad_(True)
    want = torch.stack([xr[b] @ (w + scale * ref_delta_w(variant, f, ranks[b], r)).T + bias for b in range(batch)])
    (want * upstream.double()).sum().backward()

    tol = TOLERANCE[dtype]
    assert normalized_error(out.detach(), want.detach()) < tol
    assert normalized_error(x.grad, xr.grad) < tol
    # Parameter gradients, matched to the file's factors by value (the file holds the same tensors).
    trainable = [k for k, v in f.items() if v.grad is not None]
    for p in params:
        match = [k for k in trainable if f[k].shape == p.shape and torch.equal(f[k].float(), p.detach().float().cpu())]
        assert len(match) == 1, (p.shape, match)
        assert p.grad is not None and normalized_error(p.grad, f[match[0]].grad) < tol, match[0]


# ---- the tiny pipelines ----------------------------------------------------------------------


@needs_device
@pytest.mark.parametrize("kind", tiny.KINDS)
def test_tiny_pipeline_on_device_matches_cpu(kind, tmp_path):
    """The same adapted pipeline samples the same images on the device as on the CPU (float32)."""
    images = {}
    for device in ("cpu", DEVICE):
        pipe = tiny.tiny_pipeline(kind)
        adapter = tlora.inject(tiny.denoiser(pipe), rank=4, min_rank=2)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in adapter.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
        pipe = pipe.to(device)
        out = pipe(**tiny.sample_kwargs(kind), generator=torch.Generator().manual_seed(0), output_type="pt")
        images[device] = out.images.float().cpu()
        assert torch.isfinite(images[device]).all()
        if device != "cpu":  # save on the device, load into a fresh CPU model: same factors
            tlora.save(tiny.denoiser(pipe), tmp_path / "a.safetensors")
            other = tiny.tiny_denoiser(kind)
            tlora.load(other, tmp_path / "a.safetensors")
            got = dict(tlora.adapter_of(other).state_dict())
            for name, t in tlora.adapter_of(tiny.denoiser(pipe)).state_dict().items():
                assert torch.equal(got[name], t.cpu()), name
    assert (images[DEVICE] - images["cpu"]).abs().max() < 2e-3


# ---- no host synchronisation ----------------------------------------------------------------


def sd_inputs(batch: int, device):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch, 4, tiny.LATENT_SIZE, tiny.LATENT_SIZE, generator=g).to(device),
        torch.randn(batch, tiny.TOKENS, tiny.SD_CROSS_DIM, generator=g).to(device),
    )


def run_without_sync(model, adapter, forward, steps_host, steps_dev, host_t, train_input, target):
    """One training step (creates AdamW's state), then under sync debug mode "error": two training
    steps (forward, backward, fused AdamW); then a sampling loop (the fast path folds), ranks
    pinned from host timesteps with `adapter.timestep`, under mode "warn": the fold cache's check
    of the factors (tlora.layer.folds: any write, `.data` included, makes folds stale) may read
    back once per forward that reuses folds, nothing else may. Returns the final sample."""
    import warnings

    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-3, fused=True)

    def train_step():
        with adapter.timestep(host_t):
            loss = torch.nn.functional.mse_loss(forward(train_input, steps_dev[0].expand(len(host_t))), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_step()
    torch.cuda.synchronize()
    before = [p.detach().clone() for p in adapter.parameters()]
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_step()
        train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    x = train_input
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.no_grad():
                for t_host, t_dev in zip(steps_host, steps_dev):
                    with adapter.timestep(t_host):
                        x = x - 0.25 * forward(x, t_dev)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= len(steps_host) - 1, [str(w.message) for w in syncs]
    torch.cuda.synchronize()
    assert any(not torch.equal(a, p) for a, p in zip(before, adapter.parameters()))
    return x


STEPS = (999, 749, 499, 249)


def device_timesteps():
    return [torch.tensor(t).pin_memory().to("cuda", non_blocking=True) for t in STEPS]


@needs_cuda
def test_adapted_layer_trains_and_samples_without_synchronizing():
    """tlora's own kernels alone (no diffusers code around them): any op that waited for the GPU
    (an .item(), a device-to-host copy, a nonzero) raises under set_sync_debug_mode("error")."""
    model = OneLayer(64, 64).cuda()
    adapter = tlora.inject(model, rank=8, min_rank=2, target_modules=["to_q"])
    x = torch.randn(2, 40, 64, device="cuda")
    out = run_without_sync(
        model,
        adapter,
        model,
        STEPS,
        device_timesteps(),
        torch.tensor([15, 870]),
        x,
        torch.randn(2, 40, 64, device="cuda"),
    )
    assert torch.isfinite(out).all()


@needs_cuda
def test_unet_trains_and_samples_without_synchronizing():
    """The same through the tiny SD UNet, if the bare diffusers UNet itself runs sync-free."""
    sample, cond = sd_inputs(2, "cuda")
    steps_dev = device_timesteps()

    def forward_of(unet):
        return lambda x, t: unet(x, t, cond, return_dict=False)[0]

    bare = tiny.tiny_sd_unet().cuda()
    bare(sample, steps_dev[0].expand(2), cond)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        bare(sample, steps_dev[0].expand(2), cond)
    except RuntimeError as err:
        pytest.skip(f"the bare diffusers UNet synchronizes by itself, so this cannot isolate tlora: {err}")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    unet = tiny.tiny_sd_unet().cuda()
    adapter = tlora.inject(unet, rank=8, min_rank=2)
    out = run_without_sync(
        unet, adapter, forward_of(unet), STEPS, steps_dev, torch.tensor([15, 870]), sample, torch.randn_like(sample)
    )
    assert torch.isfinite(out).all()


# ---- torch.compile ---------------------------------------------------------------------------


@needs_cuda
def test_compiled_unet_matches_eager():
    unet = tiny.tiny_sd_unet().cuda()
    adapter = tlora.inject(unet, rank=8, min_rank=2)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen).cuda())
    sample, cond = sd_inputs(2, "cuda")
    compiled = torch.compile(unet)
    for t in (torch.tensor([10, 900]), torch.tensor([500, 500])):
        t = t.cuda()
        want = unet(sample, t, cond, return_dict=False)[0]
        eager_grads = torch.autograd.grad(want.square().mean(), adapter.parameters())
        got = compiled(sample, t, cond, return_dict=False)[0]
        compiled_grads = torch.autograd.grad(got.square().mean(), adapter.parameters())
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
        for g_c, g_e in zip(compiled_grads, eager_grads):
            assert (g_c - g_e).abs().max() <= 1e-3 * g_e.abs().max().clamp_min(1e-12)
