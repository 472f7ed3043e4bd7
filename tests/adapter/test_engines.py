"""T-LoRA under other engines and modes, on the tiny SD UNet (float32 on CPU unless said):
torch.compile, half-precision base weights with float32 adapters and GradScaler, autocast, and a
PEFT LoRA on the same UNet. Gradient checkpointing is covered in test_pipelines.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import tlora
from tlora.testing.tiny import LATENT_SIZE, SD_CROSS_DIM, TOKENS, tiny_denoiser

R, R_MIN = 4, 2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def inputs(seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE, generator=g)
    cond = torch.randn(2, TOKENS, SD_CROSS_DIM, generator=g)
    target = torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE, generator=g)
    return x.to(dtype), cond.to(dtype), target


def adapted(dtype: torch.dtype = torch.float32, seed: int = 1):
    """A tiny SD UNet (base weights in `dtype`) with a T-LoRA adapter moved off its (zero-update) init."""
    model = tiny_denoiser("sd")
    if dtype != torch.float32:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # diffusers: "modules that should be kept in float32: []"
            model = model.to(dtype)
    adapter = tlora.inject(model, rank=R, min_rank=R_MIN)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model, adapter


def grads(model, adapter, t, x, cond, target) -> list[torch.Tensor]:
    for p in adapter.parameters():
        p.grad = None
    F.mse_loss(model(x, t, cond).sample.float(), target).backward()
    return [p.grad.clone() for p in adapter.parameters()]


# ---- torch.compile ----------------------------------------------------------------------------


def test_compile_matches_eager_without_graph_breaks():
    """The adapted layers run as the custom ops tlora::update (+ its backward) and the timestep
    hook is plain tensor code, so dynamo traces the whole UNet, hook included: no graph breaks.
    The ranks are data (the mask is a graph input), so new ranks reuse the graph.

    Backend "aot_eager": it runs the fake kernels and the registered backward through
    AOTAutograd like inductor does, in seconds instead of minutes on CPU."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    model, adapter = adapted()
    x, cond, target = inputs()
    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    # A 25-step sampling run: one shared timestep per step, every step another rank.
    with torch.no_grad():
        for t in torch.linspace(999.0, 0.0, 25):
            tt = t.expand(2)
            want, got = model(x, tt, cond).sample, compiled(x, tt, cond).sample
            assert rel(got, want) < 1e-5
    sampling_graphs = counter.frame_count
    with torch.no_grad(), adapter.rank(R_MIN):
        assert rel(model(x, torch.tensor([0.0, 0.0]), cond).sample, want) > 1e-3  # the ranks matter

    # Training steps with one rank per sample (random timesteps, as a trainer draws them).
    gen = torch.Generator().manual_seed(3)
    for _ in range(12):
        t = torch.randint(0, 1000, (2,), generator=gen).float()
        want = grads(model, adapter, t, x, cond, target)
        got = grads(compiled, adapter, t, x, cond, target)
        assert len(got) == len(want) == 3 * 32
        for g_got, g_want in zip(got, want):
            assert rel(g_got, g_want) < 1e-4
    assert sum(g.abs().sum() > 0 for g in want) > 0
    assert sampling_graphs <= 3 and counter.frame_count - sampling_graphs <= 3, (sampling_graphs, counter.frame_count)
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()


def test_compiled_custom_op_matches_the_kernels():
    """torch.library's own checks of tlora::update: schema, fake kernel, autograd registration,
    against the real kernels, with a shared mask, per-sample masks and none."""
    from tlora.layer import rank_mask
    from tlora.layer.ops import update_op

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    p, lam, q = (torch.randn(*s, generator=g, requires_grad=True) for s in ((6, 4), (4,), (4, 8)))
    frozen = [torch.randn(*s, generator=g) for s in ((6, 4), (4,), (4, 8))]
    for ranks in (None, [3], [2, 4]):
        mask = rank_mask(ranks, 4, 2, 0.5, x.device, x.dtype)
        torch.library.opcheck(update_op, (x, [p, lam, q, *frozen], mask))
    down, up = torch.randn(4, 8, generator=g, requires_grad=True), torch.randn(6, 4, generator=g, requires_grad=True)
    torch.library.opcheck(update_op, (x, [down, up], rank_mask([1, 3], 4, 1, 1.0, x.device, x.dtype)))


# ---- half precision ---------------------------------------------------------------------------


def test_float16_base_with_float32_adapter_and_grad_scaler():
    ref, ref_adapter = adapted()
    model, adapter = adapted(torch.float16)
    assert {p.dtype for p in adapter.parameters()} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if "base_layer" in n} == {torch.float16}
    x, cond, target = inputs()
    t = torch.tensor([100.0, 900.0])
    out = model(x.half(), t, cond.half()).sample
    assert out.dtype == torch.float16
    with torch.no_grad():
        assert rel(out, ref(x, t, cond).sample) < 1e-2

    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    before = [p.detach().clone() for p in adapter.parameters()]
    scaler.scale(F.mse_loss(out.float(), target)).backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.dtype == torch.float32 for p in adapter.parameters())
    scaler.step(opt)  # raises "Attempting to unscale FP16 gradients" if an adapter parameter were float16
    scaler.update()
    assert scaler.get_scale() == 65536.0  # no inf/nan found: the scale was not lowered
    assert all(not torch.equal(a, b) for a, b in zip(before, adapter.parameters()))


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_autocast_is_close_to_float32(dtype, tol):
    model, adapter = adapted()
    x, cond, target = inputs()
    t = torch.tensor([100.0, 900.0])
    want = grads(model, adapter, t, x, cond, target)
    with torch.no_grad():
        ref = model(x, t, cond).sample
    for p in adapter.parameters():
        p.grad = None
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x, t, cond).sample
    assert out.dtype == dtype and rel(out, ref) < tol
    scaler.scale(F.mse_loss(out.float(), target)).backward()
    scaler.unscale_(torch.optim.SGD(adapter.parameters(), lr=0.0))
    got = [p.grad for p in adapter.parameters()]
    assert all(torch.isfinite(g).all() and g.dtype == torch.float32 for g in got)
    assert rel(torch.cat([g.flatten() for g in got]), torch.cat([g.flatten() for g in want])) < 10 * tol


# ---- a PEFT LoRA on the same UNet ---------------------------------------------------------------

PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def add_peft_lora(model, name: str = "style"):
    """A PEFT LoRA as diffusers installs it (`load_lora_weights` goes through the same layers),
    with random non-zero lora_B so that it changes the output."""
    from peft import LoraConfig

    model.add_adapter(
        LoraConfig(r=2, lora_alpha=4, target_modules=PEFT_TARGETS, init_lora_weights=False), adapter_name=name
    )


def peft_deltas(model, name: str = "style") -> dict[str, torch.Tensor]:
    """The dense update of every PEFT LoRA layer: scaling * B @ A."""
    from peft.tuners.lora import LoraLayer

    return {
        n: m.scaling[name] * m.lora_B[name].weight @ m.lora_A[name].weight
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer)
    }


def tlora_deltas(adapter, rank: int) -> dict[str, torch.Tensor]:
    return {
        n: tlora._native.dense_update(layer.factors(), rank, adapter.config.scale)
        for n, layer in adapter.layers.items()
    }


@torch.no_grad()
def with_deltas(*deltas: dict[str, torch.Tensor]):
    """A fresh tiny UNet whose weights hold the given updates, added independently."""
    model = tiny_denoiser("sd")
    modules = dict(model.named_modules())
    for d in deltas:
        for name, dw in d.items():
            modules[name].weight += dw
    return model


def test_peft_lora_then_tlora():
    """Supported order: PEFT LoRA (or `pipe.load_lora_weights`) first, then tlora, which adapts the
    nn.Linear inside each PEFT layer (`<module>.base_layer`). Both updates apply, and either can
    be removed."""
    from peft.tuners.lora import LoraLayer

    x, cond, _ = inputs()
    t = 300  # r(300) = floor(0.7 * 2) + 2 = 3
    model = tiny_denoiser("sd")
    add_peft_lora(model)
    peft = peft_deltas(model)
    adapter = tlora.inject(model, rank=R, min_rank=R_MIN)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    assert set(adapter.layers) == set(peft) and len(peft) == 32  # the plain module names
    assert all(type(m.base_layer).__name__ == "TLoraLinear" for m in model.modules() if isinstance(m, LoraLayer))
    ours = tlora_deltas(adapter, 3)

    @torch.no_grad()
    def run(m):
        return m(x, t, cond).sample

    base, peft_only, tlora_only = run(tiny_denoiser("sd")), run(with_deltas(peft)), run(with_deltas(ours))
    both = run(with_deltas(peft, ours))
    assert rel(peft_only, base) > 1e-2 and rel(tlora_only, base) > 1e-2
    assert rel(run(model), both) < 1e-5

    # The file keeps the plain module names: it loads into a UNet without PEFT.
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = tlora.save(model, Path(tmp) / "a.safetensors")
        assert all(".base_layer" not in n for n in tlora.read(path)[1]["modules"])
        plain = tiny_denoiser("sd")
        tlora.load(plain, path)
        assert rel(run(plain), tlora_only) < 1e-5

    model.disable_adapters()  # PEFT off: tlora alone
    assert rel(run(model), tlora_only) < 1e-5
    model.enable_adapters()
    adapter.remove()  # tlora off: the PEFT LoRA alone, still working
    assert rel(run(model), peft_only) < 1e-5
    assert all(type(m.base_layer) is torch.nn.Linear for m in model.modules() if isinstance(m, LoraLayer))

    again = tlora.inject(model, rank=R, min_rank=R_MIN)  # tlora can be injected again inside PEFT
    with torch.no_grad():
        for name, layer in again.layers.items():
            for p_new, p_old in zip(layer.factors(), adapter.layers[name].factors()):
                p_new.copy_(p_old)
    assert rel(run(model), both) < 1e-5
    model.delete_adapters("style")  # PEFT LoRA deleted: tlora alone
    assert rel(run(model), tlora_only) < 1e-5
    again.remove()
    assert rel(run(model), base) < 1e-6


def test_tlora_then_peft_is_refused_by_peft():
    """The other order is not supported: PEFT refuses to wrap a TLoraLinear, before changing the
    model (load PEFT LoRAs first, or remove the tlora adapter, load, and inject again)."""
    model = tiny_denoiser("sd")
    adapter = tlora.inject(model, rank=R, min_rank=R_MIN)
    x, cond, _ = inputs()
    with torch.no_grad():
        before = model(x, 300, cond).sample
    with pytest.raises(ValueError, match=r"Target module TLoraLinear\("):
        add_peft_lora(model)
    with torch.no_grad():
        assert torch.equal(model(x, 300, cond).sample, before)
    adapter.remove()
