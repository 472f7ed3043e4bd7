"""T-LoRA on quantized frozen bases: the tiny SD-XL UNet with its Linear layers quantized by
optimum-quanto (int8, int4), torchao (int8 weight-only) and bitsandbytes (nf4, LLM.int8).

quanto and torchao quantize through diffusers' own configs (`QuantoConfig`, `TorchAoConfig`,
`from_pretrained` of a saved tiny folder). diffusers' `BitsAndBytesConfig` asks for a GPU, so on
the CPU the attention projections are swapped for bitsandbytes' own Linear4bit / Linear8bitLt
(its CPU backend runs them); the diffusers path is tested where CUDA is available.

Checked per backend: each adapted layer's output equals the dequantised base layer (float64)
plus the paper's update P diag(lam m) Q - P0 diag(lam0 m) Q0 (float64), within the backend's own
error; the update is added exactly onto the quantized layer's own output; the base stays
quantized, frozen and untouched while AdamW steps lower the loss; no float weight is kept
(nothing folded at inference); save -> load reproduces the outputs; remove() puts the very same
quantized modules back.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_calls import denoiser_inputs

import tlora
from tlora.adapter.quantized import dequantized_weight, quantized_kind
from tlora.testing.tiny import LATENT_SIZE, TOKENS, tiny_sdxl_unet
from tlora.testing.train_inputs import train_args

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RANK, MIN_RANK = 4, 2


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _bnb_cpu_reason() -> str | None:
    if not _installed("bitsandbytes"):
        return "bitsandbytes is not installed"
    try:
        import bitsandbytes as bnb

        lin = bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False).to("cpu")
        lin(torch.randn(2, 16))
    except Exception as e:  # its CPU backend missing or broken here
        return f"bitsandbytes does not run on this CPU: {type(e).__name__}: {e}"
    return None


# backend -> (quantized_kind of its layers, why it is skipped here or None)
BACKENDS = {
    "quanto-int8": ("quanto", None if _installed("optimum.quanto") else "optimum-quanto is not installed"),
    "quanto-int4": ("quanto", None if _installed("optimum.quanto") else "optimum-quanto is not installed"),
    "torchao-int8": ("torchao", None if _installed("torchao") else "torchao is not installed"),
    "bnb-nf4": ("bnb4", _bnb_cpu_reason()),
    "bnb-int8": ("bnb8", _bnb_cpu_reason()),
}
# How far the quantized layer's own output may be from F.linear with its dequantised weight
# (relative to the output's largest value): weight-only backends differ by float rounding;
# LLM.int8 also quantizes the activations to int8, rows by absmax.
BASE_TOL = {"quanto": 1e-5, "torchao": 1e-5, "bnb4": 1e-5, "bnb8": 3e-2}


@pytest.fixture(scope="module")
def saved_unet(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_sdxl_unet")
    tiny_sdxl_unet().save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _ninja_on_path(monkeypatch):
    """quanto's int4 CPU path builds a C++ extension with ninja, which pip puts next to the
    interpreter (not on PATH when a virtualenv runs unactivated)."""
    here = Path(sys.executable).parent
    if shutil.which("ninja") is None and (here / "ninja").exists():
        monkeypatch.setenv("PATH", f"{here}{os.pathsep}{os.environ.get('PATH', '')}")


def _swap_bnb(unet, kind: str):
    """Replace the attention projections by bitsandbytes layers holding the same weights
    (quantized when moved to the CPU)."""
    import bitsandbytes as bnb

    for name, module in list(unet.named_modules()):
        if type(module) is not torch.nn.Linear or not any(name.endswith("." + t) for t in TARGETS):
            continue
        if kind == "bnb4":
            q = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                compute_dtype=torch.float32,
                quant_type="nf4",
            )
        else:
            q = bnb.nn.Linear8bitLt(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                has_fp16_weights=False,
                threshold=0.0,
            )
        q.load_state_dict(module.state_dict())
        if kind == "bnb4":
            # bitsandbytes' packed CPU inference path (AVX512-BF16 machines) needs in_features to be a
            # multiple of its 64-wide quantization block; the tiny UNet's are 16 and 32.
            q.support_avx512bf16_for_cpu = False
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent), child, q.to("cpu"))
    return unet


def quantized_unet(backend: str, folder: Path):
    kind, skip = BACKENDS[backend]
    if skip:
        pytest.skip(skip)
    from diffusers import UNet2DConditionModel

    if kind == "quanto":
        from diffusers import QuantoConfig

        config = QuantoConfig(weights_dtype=backend.split("-")[1])
        unet = UNet2DConditionModel.from_pretrained(folder, quantization_config=config)
    elif kind == "torchao":
        from diffusers import TorchAoConfig
        from torchao.quantization import Int8WeightOnlyConfig

        unet = UNet2DConditionModel.from_pretrained(
            folder, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), torch_dtype=torch.float32
        )
    else:
        unet = _swap_bnb(UNet2DConditionModel.from_pretrained(folder), kind)
    unet.eval()
    unet.requires_grad_(False)
    got = {quantized_kind(unet.get_submodule(n)) for n, _ in unet.named_modules() if n.endswith(".to_q")}
    assert got == {kind}, f"{backend}: the attention projections are {got}"
    return unet


def inputs(batch: int = 2, seed: int = 0) -> dict:
    """The tiny SD-XL UNet's inputs, everything but the timestep."""
    return denoiser_inputs("sdxl", batch, seed)


def perturb(adapter, seed: int = 1, std: float = 0.2) -> None:
    """Move the trained factors off their frozen copies, so that the update is not zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.mul_(1 + std * torch.randn(p.shape, generator=g))


def dense_update_f64(layer, k: int) -> torch.Tensor:
    """P diag(lam m) Q - P0 diag(lam0 m) Q0 in float64, m the first k ranks (the paper's eq.)."""
    f = {n: getattr(layer, n).detach().double() for n in layer.factor_names()}
    m = (torch.arange(RANK) < k).double()
    return f["p"] @ torch.diag(f["lam"] * m) @ f["q"] - f["p0"] @ torch.diag(f["lam0"] * m) @ f["q0"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def quantized_state(module) -> dict[str, torch.Tensor]:
    """A quantized layer's stored tensors as plain tensors (their raw data), for comparisons."""
    out = {}
    for key, t in module.state_dict().items():
        if isinstance(t, torch.Tensor):
            out[key] = dequantized_weight(module).clone() if key == "weight" else t.detach().clone()
    return out


BACKEND_IDS = list(BACKENDS)


@pytest.mark.parametrize("backend", BACKEND_IDS)
def test_outputs_are_dequantised_base_plus_update(backend, saved_unet):
    unet = quantized_unet(backend, saved_unet)
    kind = BACKENDS[backend][0]
    adapter = tlora.inject(unet, rank=RANK, min_rank=MIN_RANK, target_modules=TARGETS)
    perturb(adapter)
    seen: dict[str, tuple] = {}
    hooks = [
        layer.register_forward_hook(lambda m, a, y, n=n: seen.__setitem__(n, (a[0].detach(), y.detach())))
        for n, layer in adapter.layers.items()
    ]
    k = 3
    for grad in (False, True):  # inference (where plain layers fold) and the training path
        seen.clear()
        with torch.set_grad_enabled(grad), adapter.rank(k):
            unet(**inputs(), timestep=torch.tensor(500))
        assert len(seen) == len(adapter.layers) > 0
        for name, (x, y) in seen.items():
            layer = adapter.layers[name]
            base = layer.base_layer
            assert quantized_kind(base) == kind
            b = None if base.bias is None else base.bias.detach().double()
            x64 = x.double()
            reference = F.linear(x64, dequantized_weight(base).double(), b) + x64 @ dense_update_f64(layer, k).T
            with torch.no_grad():
                own = base(x)  # the quantized layer's own output
            update = x64 @ dense_update_f64(layer, k).T
            assert rel(y - own, update) < 1e-5, f"{backend} {name}: the update is not added onto the base output"
            assert rel(y, reference) < BASE_TOL[kind], f"{backend} {name}: {rel(y, reference):.2e}"
            assert adapter.state.fold_cache.folds_of(layer) == {}, (
                "a quantized base must not be folded into a float weight"
            )
    for h in hooks:
        h.remove()
    # The adapter is float32; nothing in the adapted layers holds a float copy of a base weight.
    assert all(p.dtype == torch.float32 for p in adapter.parameters())
    for layer in adapter.layers.values():
        sizes = {tuple(t.shape) for t in (*layer.parameters(recurse=False), *layer.buffers(recurse=False))}
        assert (layer.out_features, layer.in_features) not in sizes


@pytest.mark.parametrize("backend", BACKEND_IDS)
def test_training_steps_lower_loss_and_leave_the_base_alone(backend, saved_unet):
    unet = quantized_unet(backend, saved_unet)
    before = {n: quantized_state(adapted) for n, adapted in unet.named_modules() if n.endswith(".to_q")}
    adapter = tlora.inject(unet, rank=RANK, min_rank=MIN_RANK, target_modules=TARGETS)
    assert all(not p.requires_grad for n, p in unet.named_parameters() if ".base_layer." in n)
    unet.train()
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    batch = inputs(seed=3)
    target = torch.randn(batch["sample"].shape, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([100, 700])
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = F.mse_loss(unet(**batch, timestep=t).sample, target)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in adapter.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    for n, state in before.items():
        base = unet.get_submodule(n).base_layer
        for key, value in quantized_state(base).items():
            assert torch.equal(value, state[key]), f"{backend}: {n}.{key} changed in training"


@pytest.mark.parametrize("backend", BACKEND_IDS)
def test_save_load_and_remove(backend, saved_unet, tmp_path):
    unet = quantized_unet(backend, saved_unet)
    originals = {n: m for n, m in unet.named_modules() if any(n.endswith("." + t) for t in TARGETS)}
    states = {n: quantized_state(m) for n, m in originals.items()}
    adapter = tlora.inject(unet, rank=RANK, min_rank=MIN_RANK, target_modules=TARGETS, init_from="weight")
    perturb(adapter)
    with torch.no_grad():
        want = unet(**inputs(), timestep=torch.tensor([50, 900])).sample
    path = tlora.save(adapter, tmp_path / "adapter.safetensors")
    adapter.remove()
    for n, m in originals.items():
        assert unet.get_submodule(n) is m, f"{backend}: remove() did not put {n} back"
        assert quantized_kind(m) == BACKENDS[backend][0]
        for key, value in quantized_state(m).items():
            assert torch.equal(value, states[n][key]), f"{backend}: {n}.{key} differs after remove()"
    with torch.no_grad():
        bare = unet(**inputs(), timestep=torch.tensor([50, 900])).sample
    assert not torch.allclose(bare, want), "the update must have changed the outputs"

    fresh = quantized_unet(backend, saved_unet)
    loaded = tlora.load(fresh, path)
    with torch.no_grad():
        got = fresh(**inputs(), timestep=torch.tensor([50, 900])).sample
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), f"{backend}: {(got - want).abs().max():.2e}"
    for name, layer in loaded.layers.items():
        for f in layer.factor_names():
            assert torch.equal(getattr(layer, f), getattr(adapter.layers[name], f))


@pytest.mark.parametrize("backend", BACKEND_IDS)
def test_init_from_weight_uses_the_dequantised_weight(backend, saved_unet):
    """SVD initialisation of a quantized base equals that of a plain layer holding its
    dequantised weight."""
    unet = quantized_unet(backend, saved_unet)
    adapter = tlora.inject(
        unet, rank=RANK, min_rank=MIN_RANK, target_modules=TARGETS, init_from="weight", init="principal"
    )
    for name, layer in list(adapter.layers.items())[:3]:
        base = layer.base_layer
        plain = torch.nn.Linear(base.in_features, base.out_features)
        with torch.no_grad():
            plain.weight.copy_(dequantized_weight(base))
        holder = torch.nn.Module()
        holder.to_q = plain
        ref = tlora.inject(
            holder,
            rank=RANK,
            min_rank=MIN_RANK,
            target_modules=["to_q"],
            init_from="weight",
            init="principal",
            timestep_convention="timesteps",
        )
        # (singular vectors are defined up to sign: compare the rank-r products)
        assert torch.allclose(
            layer.p0 @ torch.diag(layer.lam0) @ layer.q0,
            ref.layers["to_q"].p0 @ torch.diag(ref.layers["to_q"].lam0) @ ref.layers["to_q"].q0,
            atol=1e-5,
        ), f"{backend} {name}"


def test_diffusers_bitsandbytes_config_needs_a_gpu_here(saved_unet):
    """diffusers' own BitsAndBytesConfig path (nf4 and int8), where CUDA is available."""
    if not torch.cuda.is_available():
        pytest.skip(
            "diffusers' BitsAndBytesConfig refuses to quantize without a GPU (bitsandbytes' own "
            "layers on the CPU are tested above)"
        )
    from diffusers import BitsAndBytesConfig, UNet2DConditionModel

    for config, kind in (
        (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
            "bnb4",
        ),
        (BitsAndBytesConfig(load_in_8bit=True), "bnb8"),
    ):
        unet = UNet2DConditionModel.from_pretrained(saved_unet, quantization_config=config, torch_dtype=torch.float32)
        adapter = tlora.inject(unet, rank=RANK, min_rank=MIN_RANK, target_modules=TARGETS)
        assert all(quantized_kind(layer.base_layer) == kind for layer in adapter.layers.values())
        perturb(adapter)
        x = {k: (v.cuda() if torch.is_tensor(v) else {a: b.cuda() for a, b in v.items()}) for k, v in inputs().items()}
        out = unet(**x, timestep=torch.tensor([10, 900], device="cuda")).sample
        out.float().pow(2).mean().backward()
        assert all(p.grad is not None for p in adapter.parameters())


# ---- tlora train --quantize ---------------------------------------------------------------------


@pytest.fixture
def tiny_sd(models, image) -> tuple[Path, Path]:
    """The tiny SD pipeline folder and the 16x16 photo (conftest.py's)."""
    return models["sd"], image


@pytest.mark.parametrize("choice", ["int8", "int4"])
def test_train_quantize_flag(choice, tiny_sd, tmp_path):
    if not _installed("optimum.quanto"):
        pytest.skip("optimum-quanto is not installed")
    from tlora.train.loop import train

    folder, image = tiny_sd
    out = tmp_path / "run"
    result = train(
        model=str(folder),
        image=str(image),
        token="sks",
        class_name="dog",
        out=str(out),
        resolution=16,
        rank=4,
        lr=3e-2,
        steps=8,
        checkpoint_every=4,
        seed=0,
        quantize=choice,
    )
    layers = result.adapter.layers
    assert layers and all(quantized_kind(layer.base_layer) == "quanto" for layer in layers.values())
    qtype = {type(layer.base_layer.weight).__name__ for layer in layers.values()}
    assert qtype == {"WeightQBytesTensor" if choice == "int8" else "WeightQBitsTensor"}, qtype
    losses = [json.loads(line)["loss"] for line in (out / "loss.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and all(np.isfinite(losses))
    # The written adapter loads into the quantized base and reproduces the trained outputs.
    unet = result.pipe.unet
    x = torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(2, TOKENS, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = unet(x, torch.tensor([10, 900]), ctx).sample
        result.adapter.remove()
        tlora.load(unet, result.adapter_path)
        got = unet(x, torch.tensor([10, 900]), ctx).sample
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_train_quantize_nf4_without_gpu_is_refused(tiny_sd, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: nf4 runs (test_diffusers_bitsandbytes_config_needs_a_gpu_here)")
    from tlora import cli

    folder, image = tiny_sd
    out = tmp_path / "run"
    rc = cli.main(train_args(folder, image, out, 2, 1, "--quantize", "nf4"))
    assert rc != 0
    err = capsys.readouterr().err
    assert "--quantize nf4" in err and "CUDA GPU" in err and "int8" in err, err
    assert not any(p.is_file() for p in out.rglob("*")) if out.exists() else True


# ---- quanto's C++ extension build: said, and never blocked by a killed build's lock ---------------


def _quanto_extension(root: Path):
    """A quanto Extension built in `root/build` (as quanto's own under site-packages), never built here."""
    from optimum.quanto.library.extensions.extension import Extension

    from tlora.adapter.quantized import guard_quanto_builds

    guard_quanto_builds()
    (root / "never_built.cpp").write_text("#error this test must not build\n")
    return Extension("tlora_test_ext", root_dir=str(root), sources=["never_built.cpp"])


@pytest.mark.skipif(not _installed("optimum.quanto"), reason="optimum-quanto is not installed")
def test_quanto_build_behind_a_killed_builds_lock_is_refused(tmp_path):
    """A build killed while holding torch's lock file left every later int4 run waiting forever."""
    import signal
    import subprocess

    build = tmp_path / "build"
    build.mkdir()
    lock = build / "lock"
    holder = subprocess.Popen(  # takes the lock as torch's FileBaton does, then is killed
        [
            sys.executable,
            "-c",
            f"import os, time; fd = os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL); print(flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    holder.stdout.readline()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock.exists()
    ext = _quanto_extension(tmp_path)
    with pytest.raises(tlora.InputError, match=rf"stale build lock {lock}.*remove the lock \(rm {lock}\)"):
        _ = ext.lib  # quanto's `lib` builds on first access
    assert sorted(p.name for p in build.iterdir()) == ["lock"]  # nothing was built


@pytest.mark.skipif(not _installed("optimum.quanto"), reason="optimum-quanto is not installed")
def test_quanto_build_lock_held_by_a_live_build_is_waited_for(tmp_path, capsys):
    import threading

    from tlora.adapter.quantized import wait_for_build_lock

    lock = tmp_path / "lock"
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # this process builds (another thread)
    try:
        held = rf"waited 1 s for the build lock {lock}.*held by process {os.getpid()}"
        with pytest.raises(tlora.InputError, match=held):
            wait_for_build_lock(lock, "quanto_cpp", timeout_s=1.0, poll_s=0.05)
        assert "waiting for another process's build of quanto_cpp" in capsys.readouterr().err

        def release():
            os.close(fd)
            lock.unlink()

        threading.Timer(0.3, release).start()
        wait_for_build_lock(lock, "quanto_cpp", timeout_s=30, poll_s=0.05)  # returns once it is gone
        assert not lock.exists()
    finally:
        if lock.exists():
            os.close(fd)
            lock.unlink()


@pytest.mark.skipif(not _installed("optimum.quanto"), reason="optimum-quanto is not installed")
def test_quanto_says_once_that_it_builds_its_extension(tmp_path, capsys):
    from optimum.quanto.library.extensions import extension

    from tlora.adapter.quantized import _guarded_load, quantization_config

    quantization_config("int8")  # what `tlora train --quantize` runs first
    assert getattr(extension.load, "_tlora_guarded", False)
    built = []
    load = _guarded_load(lambda **kw: built.append(kw["name"]))
    build = tmp_path / "build"
    build.mkdir()
    load(name="quanto_cpp", sources=[], build_directory=str(build))
    assert capsys.readouterr().err.count("building its C++ extension quanto_cpp") == 1
    (build / "pytorch_version.txt").write_text(torch.__version__)  # quanto's mark of a finished build
    load(name="quanto_cpp", sources=[], build_directory=str(build))
    assert capsys.readouterr().err == "" and built == ["quanto_cpp", "quanto_cpp"]
