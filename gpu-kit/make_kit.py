"""Assemble the GPU kit: one folder (at most 60 MiB) that runs tlora's CUDA tests and GPU benchmarks
on a machine with Python 3.12 and torch 2.11 but no diffusers, no Rust and no network.

    python gpu-kit/make_kit.py --wheel-dir dist/torch-2.11.0 --out dist/gpu-kit

(`make gpu-kit` builds the wheel first.) The kit holds:
    gpu-check                 the script to run there (see its header)
    README.md                 how to run it
    wheels/                   tlora (abi3, torch 2.11.0) and what the image lacks: diffusers,
                              importlib_metadata, lazy-importer (+ zipp; the image has one already)
    tests/cuda/test_cuda.py   the CUDA tests (pytest marker `cuda`), pytest.ini
    benches/gpu.py            the GPU benchmarks (benches/full_size.py: the models' configs)
    MANIFEST.txt              every file with its size and sha256
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 60 * 2**20
TORCH = "2.11.0"
# What the GPU image (Python 3.12.3, torch 2.11.0+cu130, transformers 5.17, accelerate 1.15, peft,
# safetensors 0.8, tokenizers 0.23, huggingface_hub 1.33, regex, pillow, requests, filelock, zipp)
# lacks for tlora: diffusers 0.42.1, its importlib_metadata and that one's lazy-importer. zipp
# travels in case theirs is older than importlib_metadata needs (>= 3.20).
EXTRA_WHEELS = ["diffusers==0.42.1", "importlib_metadata==10.2.0", "lazy-importer==0.1.0", "zipp==4.1.2"]
PLATFORM_ARGS = [
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    "--only-binary=:all:",
    "--platform",
    "manylinux_2_28_x86_64",
    "--platform",
    "manylinux_2_17_x86_64",
    "--platform",
    "manylinux2014_x86_64",
]
# The GPU image's Python packages (device notes, KINDS.md, read 2026-11-17), normalised names.
IMAGE = set(
    """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()
)


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check_closed(wheels: Path) -> None:
    """Every requirement of the kit's wheels is in the image or in the kit (torch's pin is checked
    by pip there)."""
    have = set(IMAGE)
    metas = {}
    for whl in wheels.glob("*.whl"):
        with zipfile.ZipFile(whl) as z:
            meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        metas[whl.name] = meta
        have.add(normalise(re.search(r"^Name: (.+)$", meta, re.M).group(1).strip()))
    from packaging.requirements import Requirement

    for name, meta in metas.items():
        for line in re.findall(r"^Requires-Dist: (.+)$", meta, re.M):
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": "", "python_version": "3.12"}):
                continue
            if normalise(req.name) not in have:
                raise SystemExit(
                    f"{name} needs {req}, which neither the GPU image nor the kit has: add it to EXTRA_WHEELS"
                )


COPY = {
    "gpu-kit/gpu-check": "gpu-check",
    "gpu-kit/README.md": "README.md",
    "tests/cuda/test_cuda.py": "tests/cuda/test_cuda.py",
    "benches/gpu.py": "benches/gpu.py",
    "benches/full_size.py": "benches/full_size.py",
}
PYTEST_INI = """[pytest]
addopts = -ra
markers =
    cuda: needs a CUDA device (skipped without one)
"""


def tlora_wheel(wheel_dir: Path) -> Path:
    found = sorted(wheel_dir.glob("tlora-*-cp311-abi3-*.whl"))
    if len(found) != 1:
        raise SystemExit(
            f"expected one tlora abi3 wheel in {wheel_dir}, found {[p.name for p in found]}: "
            "run `make gpu-kit` (it builds the torch 2.11 wheel first)"
        )
    with zipfile.ZipFile(found[0]) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    if f"Requires-Dist: torch=={TORCH}" not in meta.splitlines():
        raise SystemExit(
            f"{found[0]} is not built for torch {TORCH} (its metadata: "
            f"{[line for line in meta.splitlines() if line.startswith('Requires-Dist: torch')]})"
        )
    return found[0]


def download(dest: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--disable-pip-version-check",
        *PLATFORM_ARGS,
        "-d",
        str(dest),
        *EXTRA_WHEELS,
    ]
    subprocess.run(cmd, check=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="assemble the GPU kit folder")
    ap.add_argument("--wheel-dir", type=Path, required=True, help="where `make wheel` put the torch 2.11 wheel")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    wheel = tlora_wheel(args.wheel_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".gpu-kit-", dir=args.out.parent))
    try:
        (stage / "wheels").mkdir()
        shutil.copy2(wheel, stage / "wheels" / wheel.name)
        download(stage / "wheels")
        check_closed(stage / "wheels")
        for src, dst in COPY.items():
            (stage / dst).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / src, stage / dst)
        (stage / "pytest.ini").write_text(PYTEST_INI)
        files = sorted(p for p in stage.rglob("*") if p.is_file())
        total = sum(p.stat().st_size for p in files)
        manifest = [f"{p.stat().st_size:>10}  {sha256(p)}  {p.relative_to(stage)}" for p in files]
        manifest.append(f"{total:>10}  total ({total / 2**20:.1f} MiB)")
        (stage / "MANIFEST.txt").write_text("\n".join(manifest) + "\n")
        if total > LIMIT:
            raise SystemExit(f"the kit is {total / 2**20:.1f} MiB, over its {LIMIT / 2**20:.0f} MiB limit")
        names = [p.name for p in (stage / "wheels").iterdir()]
        for req in EXTRA_WHEELS:
            name = re.split(r"==", req)[0].replace("-", "_").lower()
            if not any(n.lower().startswith(name + "-") for n in names):
                raise SystemExit(f"{req} was not downloaded into the kit")
        # Replace the previous kit only once the new one is complete.
        if args.out.exists():
            old = args.out.with_name(args.out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(args.out, old)
            shutil.rmtree(old)
        os.replace(stage, args.out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print((args.out / "MANIFEST.txt").read_text(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
