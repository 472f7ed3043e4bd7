"""T-LoRA inside real (tiny, offline) diffusers models and pipelines: SD, SD-XL and FLUX.

The ranks the kernels use are read off the rank mask that `tlora._native.lowrank_forward`
receives (with the folding fast path of inference switched off), and the
expected ranks are computed here, independently of the package, from the scheduler's timesteps:
r(t) = floor(((T - t) / T) * (r - r_min)) + r_min with T = 1000.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference
import torch
import torch.nn.functional as F
from tiny_calls import denoiser_inputs, perturb

import tlora
import tlora.layer
from tlora.testing.tiny import (
    IMAGE_SIZE,
    KINDS,
    TOKENS,
    denoiser,
    sample_kwargs,
    save_tiny_pipeline,
    tiny_denoiser,
    tiny_pipeline,
)

R, R_MIN, T = 8, 3, 1000
VARIANTS = ("tlora", "vanilla", "lora")
# Denoising steps per pipeline; with R - R_MIN = 5 each step of these schedules gets its own rank.
STEPS = {"sd": 5, "sdxl": 4, "flux": 4}


def expected_rank(t: float) -> int:
    """r(t) from the timestep's exact value (a float product can fall on either side of the floor)."""
    return reference.rank_at(t, R, R_MIN, T)


def inject(model, variant: str = "tlora", **kw):
    if variant == "lora":
        return tlora.inject(model, rank=R, variant="lora", **kw)
    return tlora.inject(model, rank=R, min_rank=R_MIN, variant=variant, **kw)


# ---- calling a bare denoiser ------------------------------------------------------------------


def model_input(inputs: dict) -> torch.Tensor:
    return inputs["sample"] if "sample" in inputs else inputs["hidden_states"]


def call(kind: str, model, inputs: dict, timesteps) -> torch.Tensor:
    """Run the denoiser at timesteps on the 0..T scale (one per sample, or one for all): FLUX
    takes t / 1000, as its pipeline passes it."""
    t = torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1)
    if kind == "flux":
        t = t / 1000
    return model(**inputs, timestep=t, return_dict=False)[0]


def noised_example(kind: str, t: int, seed: int = 3):
    """One fixed "image latent", noise and timestep: (inputs, target) for the standard denoising loss.
    SD/SD-XL: DDPM noising with the scaled-linear betas, epsilon target. FLUX: rectified flow
    x_s = (1 - s) x0 + s eps, s = t / T, target eps - x0."""
    inputs = denoiser_inputs(kind, 1, seed)
    g = torch.Generator().manual_seed(seed + 100)
    x0 = torch.randn(model_input(inputs).shape, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    key = "hidden_states" if kind == "flux" else "sample"
    if kind == "flux":
        s = t / T
        inputs[key], target = (1 - s) * x0 + s * eps, eps - x0
    else:
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
        abar = torch.cumprod(1 - betas, 0)[t].item()
        inputs[key], target = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps, eps
    return inputs, target


# ---- observing the kernel's ranks -------------------------------------------------------------


class RankRecorder:
    """Wraps the native forward kernel and records the `ranks` argument of every call, grouped by
    the denoiser forward it belongs to (when `watch(model)` was called)."""

    def __init__(self, monkeypatch):
        self.calls: list[list[int] | None] = []
        self.forwards: list[list] = []
        self.batches: list[int] = []
        # Every forward must reach the factored kernels: no folded weights (inference fast path).
        monkeypatch.setattr(
            tlora.layer.RankState, "fast_path", property(lambda self: False, lambda self, v: None), raising=False
        )

        forward = tlora._native.lowrank_forward

        def recording(x, d, u, mask=None, acc=None):
            # The ranks a call applies: per mask row, the set entries of the first block (the
            # mask is all ones, None, at full rank).
            ranks = [R] if mask is None else [int((row[:R] != 0).sum()) for row in mask]
            self.calls.append(ranks)
            if self.forwards:
                self.forwards[-1].append(ranks)
            return forward(x, d, u, mask, acc)

        monkeypatch.setattr(tlora._native, "lowrank_forward", recording)

    def watch(self, model) -> None:
        def start(module, args, kwargs):
            x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            self.batches.append(x.shape[0])
            self.forwards.append([])

        model.register_forward_pre_hook(start, with_kwargs=True)


@pytest.fixture
def recorder(monkeypatch):
    return RankRecorder(monkeypatch)


def test_expected_rank_formula_matches_rank_schedule():
    # The test's own r(t) against the package's schedule, on integer and fractional timesteps
    # (fractional ones reach the model from Euler and flow-matching schedulers).
    assert expected_rank(0) == R and expected_rank(T) == R_MIN
    for ts in (torch.arange(0, T + 1), torch.linspace(0, T, 4 * T + 1, dtype=torch.float64)):
        assert tlora.rank_schedule(ts, R, R_MIN).tolist() == [expected_rank(t) for t in ts.tolist()]
    for r, r_min in ((64, 32), (16, 1), (7, 3)):
        want = [(T - t) * (r - r_min) // T + r_min for t in range(T + 1)]
        assert tlora.rank_schedule(torch.arange(0, T + 1), r, r_min).tolist() == want


# ---- sampling with the stock pipelines --------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_stock_pipeline_uses_scheduled_ranks(kind, recorder):
    pipe = tiny_pipeline(kind)
    model = denoiser(pipe)
    adapter = inject(model)
    perturb(adapter)
    recorder.watch(model)
    kw = sample_kwargs(kind, steps=STEPS[kind])
    cfg = kind != "flux"
    if cfg:
        kw["guidance_scale"] = 5.0  # classifier-free guidance: the UNet sees a batch of 2
    out = pipe(**kw, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.isfinite(out.images).all()

    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    assert len(timesteps) == STEPS[kind]
    assert len(recorder.forwards) == len(timesteps), "one denoiser forward per step"
    assert recorder.batches == [2 if cfg else 1] * len(timesteps)
    for calls in recorder.forwards:
        assert len(calls) == len(adapter.layers), "every adapted layer runs once per forward"
        assert all(c == calls[0] for c in calls), f"layers of one forward used different ranks: {calls}"
    used = [calls[0] for calls in recorder.forwards]
    expected = [[expected_rank(t)] for t in timesteps]
    assert used == expected, f"timesteps {timesteps}"
    # These schedules reach a different rank at every step, so the comparison is not vacuous.
    assert len({e[0] for e in expected}) == len(expected)


@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_timesteps_in_training(kind, recorder):
    model = tiny_denoiser(kind)
    adapter = inject(model)
    perturb(adapter)
    recorder.watch(model)
    inputs = denoiser_inputs(kind, 2)
    with torch.no_grad():
        if kind == "flux":
            both = call(kind, model, inputs, [10, 900])
        else:  # as a training loop calls the UNet: positional, integer timesteps
            both = model(
                inputs["sample"],
                torch.tensor([10, 900]),
                inputs["encoder_hidden_states"],
                added_cond_kwargs=inputs.get("added_cond_kwargs"),
                return_dict=False,
            )[0]
    assert recorder.forwards[-1] == [[expected_rank(10), expected_rank(900)]] * len(adapter.layers)
    assert expected_rank(10) != expected_rank(900)

    # Each sample of the mixed batch is computed at its own rank: it equals that sample alone.
    with torch.no_grad():
        for i, t in enumerate((10, 900)):
            single = {
                k: (v[i : i + 1] if isinstance(v, torch.Tensor) and k not in ("txt_ids", "img_ids") else v)
                for k, v in inputs.items()
            }
            if "added_cond_kwargs" in inputs:
                single["added_cond_kwargs"] = {k: v[i : i + 1] for k, v in inputs["added_cond_kwargs"].items()}
            alone = call(kind, model, single, [t])
            assert recorder.forwards[-1][0] == [expected_rank(t)]
            torch.testing.assert_close(both[i : i + 1], alone, rtol=1e-4, atol=1e-5)
        # and not at the other sample's rank
        with adapter.timestep(900 if kind != "flux" else 0.9):
            swapped = call(kind, model, {**inputs}, [10, 900])
        assert not torch.allclose(both[0], swapped[0], rtol=1e-4, atol=1e-5)


# ---- training ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,variant", [(k, "tlora") for k in KINDS] + [("sd", "vanilla"), ("sd", "lora")])
def test_adamw_steps_lower_the_denoising_loss(kind, variant):
    model = tiny_denoiser(kind)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = inject(model, variant)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
    inputs, target = noised_example(kind, t=500)
    losses = []
    for _ in range(6):
        loss = F.mse_loss(call(kind, model, inputs, [500]), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = F.mse_loss(call(kind, model, inputs, [500]), target).item()
    assert final < losses[0], losses + [final]
    # Only the adapter trained: the base model's weights are untouched and frozen.
    adapter.remove()
    after = model.state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)


# ---- save / load ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_reproduces_outputs(kind, variant, tmp_path):
    model = tiny_denoiser(kind)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = inject(model, variant)
    perturb(adapter)
    inputs = denoiser_inputs(kind, 2)
    checks = [[999, 999], [600, 600], [250, 250], [0, 0], [10, 900]]
    with torch.no_grad():
        want = [call(kind, model, inputs, t) for t in checks]
    path = tlora.save(model, tmp_path / "adapter.safetensors")

    fresh = tiny_denoiser(kind)  # same seed: the same base weights
    assert all(torch.equal(v, base_state[k]) for k, v in fresh.state_dict().items())
    with torch.no_grad():
        base = [call(kind, fresh, inputs, t) for t in checks]
        loaded = tlora.load(fresh, path)
        assert loaded.config.to_dict() == adapter.config.to_dict()
        assert list(loaded.layers) == list(adapter.layers)
        sd_a, sd_b = adapter.state_dict(), loaded.state_dict()
        assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
        for t, w, b in zip(checks, want, base):
            got = call(kind, fresh, inputs, t)
            assert torch.equal(got, w), f"t={t}"
            assert not torch.equal(got, b), f"the adapter does not change the output at t={t}"


def test_save_load_keeps_trained_factors_not_init(tmp_path):
    """The file holds the trained values: loading it into a model whose own adapter would start
    from the same seed gives the trained outputs, not the initial ones."""
    model = tiny_denoiser("sd")
    adapter = inject(model)
    perturb(adapter)
    path = tlora.save(model, tmp_path / "a.safetensors")
    inputs = denoiser_inputs("sd", 1)
    other = tiny_denoiser("sd")
    inject(other)  # initial factors: a zero update
    with torch.no_grad():
        init_out = call("sd", other, inputs, [100])
        tlora.adapter_of(other).remove()
        tlora.load(other, path)
        assert torch.equal(call("sd", other, inputs, [100]), call("sd", model, inputs, [100]))
        assert not torch.equal(call("sd", other, inputs, [100]), init_out)


# ---- remove -----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", KINDS)
def test_remove_restores_every_bit(kind, variant):
    model = tiny_denoiser(kind)
    # A user's mixed requires_grad pattern, which inject overrides and remove must restore.
    names = [n for n, _ in model.named_parameters()]
    for i, (_n, p) in enumerate(model.named_parameters()):
        p.requires_grad_(i % 3 != 0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = (dict(model._forward_pre_hooks), dict(model._forward_hooks))
    inputs, target = noised_example(kind, t=300)
    with torch.no_grad():
        before = call(kind, model, inputs, [300])

    adapter = inject(model, variant)
    assert {n: type(m) for n, m in model.named_modules()} != types
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in flags)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    for t in (300, 800, 50):
        F.mse_loss(call(kind, model, inputs, [t]), target).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        assert not torch.equal(call(kind, model, inputs, [300]), before), "training changed nothing"

    assert adapter.remove() is model
    assert tlora.adapter_of(model) is None
    after = model.state_dict()
    assert list(after) == list(state)
    for k, v in state.items():
        assert torch.equal(after[k], v), k
        assert after[k].dtype == v.dtype
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert [n for n, _ in model.named_parameters()] == names
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert (dict(model._forward_pre_hooks), dict(model._forward_hooks)) == hooks
    with torch.no_grad():
        assert torch.equal(call(kind, model, inputs, [300]), before)
    inject(model, variant).remove()  # and the model can be adapted again


# ---- gradient checkpointing -------------------------------------------------------------------


def _two_timestep_grads(kind, checkpointing: str | None, recorder):
    model = tiny_denoiser(kind)
    if checkpointing == "before":
        model.enable_gradient_checkpointing()
    adapter = inject(model)
    if checkpointing == "after":
        model.enable_gradient_checkpointing()
    perturb(adapter)
    in1, target1 = noised_example(kind, t=900, seed=5)
    in2, target2 = noised_example(kind, t=50, seed=6)
    loss = F.mse_loss(call(kind, model, in1, [900]), target1) + F.mse_loss(call(kind, model, in2, [50]), target2)
    start = len(recorder.calls)
    loss.backward()
    replayed = recorder.calls[start:]
    grads = {n: p.grad.clone() for n, p in adapter.named_parameters()}
    ckpt_funcs = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    adapter.remove()
    if checkpointing:
        # remove() gives the blocks back diffusers' own checkpoint function
        assert ckpt_funcs and not any(
            getattr(m._gradient_checkpointing_func, "_tlora_wrapped", False) for m in ckpt_funcs
        )
    return grads, replayed


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_gives_the_same_gradients(kind, order, recorder):
    ref, replayed_ref = _two_timestep_grads(kind, None, recorder)
    got, replayed = _two_timestep_grads(kind, order, recorder)
    assert replayed_ref == []
    # The backward pass recomputed the checkpointed layers, each forward at its own ranks.
    assert replayed, "gradient checkpointing did not recompute any adapted layer"
    assert {tuple(r) for r in replayed} == {(expected_rank(900),), (expected_rank(50),)}
    assert ref.keys() == got.keys() and len(ref) > 0
    for name in ref:
        assert ref[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-5, msg=name)


# ---- attention processors ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_inject_keeps_the_attention_processors(kind, recorder):
    model = tiny_denoiser(kind)
    procs = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    default = {"sd": "AttnProcessor2_0", "sdxl": "AttnProcessor2_0", "flux": "FluxAttnProcessor"}[kind]
    assert procs and {type(p).__name__ for p in procs.values()} == {default}

    # The attention projections (FLUX's default targets also hold its feed-forwards since issue 24,
    # which no attention processor calls: they are not what this test is about).
    adapter = inject(model, target_modules=list(tlora.config.DEFAULT_TARGETS))
    now = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    assert {n: type(p) for n, p in now.items()} == {n: type(p) for n, p in procs.items()}
    assert all(now[n] is procs[n] for n in procs)
    # Every adapted layer is a projection of one of these attention modules, and the stock
    # processors call it: one kernel call per adapted layer.
    for name in adapter.layers:
        parent = name.rsplit(".", 1)[0]
        assert parent in procs or parent.rsplit(".", 1)[0] in procs, name
    with torch.no_grad():
        call(kind, model, denoiser_inputs(kind, 1), [500])
    assert len(recorder.calls) == len(adapter.layers)

    adapter.remove()
    after = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    assert {n: type(p) for n, p in after.items()} == {n: type(p) for n, p in procs.items()}


# ---- the tiny pipeline builders themselves ----------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_builders_are_seeded(kind):
    a, b, c = tiny_denoiser(kind, 0), tiny_denoiser(kind, 0), tiny_denoiser(kind, 1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    pipe_sd = denoiser(tiny_pipeline(kind, 0)).state_dict()
    assert all(torch.equal(sa[k], pipe_sd[k]) for k in sa)


@pytest.mark.parametrize("kind", KINDS)
def test_saved_tiny_pipeline_loads_back(kind, tmp_path):
    from diffusers import DiffusionPipeline

    from tlora.pipelines import load_pipeline
    from tlora.train.families import family_of

    folder = save_tiny_pipeline(kind, tmp_path / kind)
    assert (folder / "model_index.json").is_file()
    original = tiny_pipeline(kind)
    loaded = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert type(loaded) is type(original)
    loaded.set_progress_bar_config(disable=True)
    for name, comp in original.components.items():
        other = loaded.components[name]
        if comp is None:
            assert other is None, name
        elif isinstance(comp, torch.nn.Module):
            assert type(other) is type(comp), name
            sa, sb = comp.state_dict(), other.state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
        elif hasattr(comp, "config"):  # scheduler
            assert type(other) is type(comp)
            assert {k: v for k, v in other.config.items() if not k.startswith("_")} == {
                k: v for k, v in comp.config.items() if not k.startswith("_")
            }
        else:  # tokenizer
            text = "a photo of sks dog"
            assert other.model_max_length == comp.model_max_length, name
            assert (
                other(text, padding="max_length", max_length=TOKENS).input_ids
                == comp(text, padding="max_length", max_length=TOKENS).input_ids
            ), name

    def sample(pipe):
        return pipe(
            **sample_kwargs(kind, steps=2), output_type="latent", generator=torch.Generator().manual_seed(0)
        ).images

    # Weights read from disk can sit at other memory alignments, which changes float rounding
    # in a few kernels: equal up to a few ulps, not necessarily bit for bit.
    torch.testing.assert_close(sample(loaded), sample(original), rtol=1e-5, atol=1e-4)

    # and tlora's own loader accepts the folder
    via_tlora = load_pipeline(str(folder))
    assert family_of(via_tlora).name == kind


def test_hub_id_offline_not_in_cache_is_one_clear_line(tmp_path):
    """A made-up hub id with HF_HUB_OFFLINE=1 (read by huggingface_hub at import, hence the
    subprocess; an empty HF_HOME so no cache can hold it): an InputError naming the model, the
    cache and the offline machine, not diffusers' "root cause in the stacktrace above"."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "from tlora.pipelines import load_pipeline, load_denoiser\n"
        "from tlora.errors import InputError\n"
        "for load in (load_pipeline, load_denoiser):\n"
        "    try:\n"
        "        load('madeup-org/no-such-model')\n"
        "    except InputError as e:\n"
        "        print('MSG', e)\n"
    )
    python_dir = Path(tlora.__file__).resolve().parent.parent
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path), PYTHONPATH=str(python_dir))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MSG")]
    assert len(lines) == 2, proc.stdout + proc.stderr
    for line in lines:
        assert "madeup-org/no-such-model" in line and "not in the local Hugging Face cache" in line, line
        assert "offline" in line and "stacktrace" not in line, line
