"""The GPU kit's CPU half: run `gpu-check --cpu` the way the GPU machine would run it.

    python gpu-kit/cpu_check.py dist/gpu-kit        # with the Python 3.12 + torch 2.11 venv's python

Builds a stand-in for the GPU image: a fresh virtualenv that sees this interpreter's packages
(torch 2.11, transformers, accelerate, peft, ...) through a .pth line pointing at a folder of links,
minus diffusers, importlib_metadata and tlora, which the kit must bring. Copies the kit elsewhere,
runs its gpu-check with cargo and rustc off PATH, and checks what it wrote: the install went through
pip's resolver, the CUDA tests ran their device-agnostic part on the CPU and passed, and the
benchmark's dry run wrote gpu.json and gpu.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

# What the GPU image lacks (the kit brings it); everything else in this venv stands in for the image.
ABSENT = ("diffusers", "importlib_metadata", "tlora", "_tlora", "__editable__")


def image_stand_in(work: Path) -> Path:
    site = Path(sysconfig.get_paths()["purelib"])
    farm = work / "image-site"
    farm.mkdir()
    for entry in site.iterdir():
        if entry.name.lower().startswith(ABSENT) or entry.suffix == ".pth" and "tlora" in entry.name:
            continue
        (farm / entry.name).symlink_to(entry)
    venv = work / "image-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    (purelib / "image.pth").write_text(f"{farm}\n")
    return venv / "bin" / "python"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    kit_src = Path(argv[0]).resolve()
    work = Path(tempfile.mkdtemp(prefix="tlora-kit-check-"))
    try:
        python = image_stand_in(work)
        probe = subprocess.run([str(python), "-c", "import diffusers"], capture_output=True)
        assert probe.returncode != 0, "the stand-in image must not have diffusers"
        kit = work / "kit"
        shutil.copytree(kit_src, kit)
        out = work / "out"
        path = [p for p in os.environ["PATH"].split(os.pathsep)
                if p and not (Path(p) / "cargo").exists() and not (Path(p) / "rustc").exists()]
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "OUT")}
        env.update(PATH=os.pathsep.join(path), PYTHON=str(python))
        run = subprocess.run([str(kit / "gpu-check"), "--cpu", str(out)], cwd=work, env=env,
                             capture_output=True, text=True, timeout=1200)
        print(run.stdout[-6000:], run.stderr[-3000:], sep="\n")
        assert run.returncode == 0, f"gpu-check --cpu exited {run.returncode}"
        summary = (out / "summary.txt").read_text()
        assert "install: ok" in summary, summary
        files = sorted(p.name for p in out.iterdir())
        assert len(files) <= 8, files  # what the device tool brings back
        suite = ET.parse(out / "cuda-tests.xml").getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
        failed = int(suite.get("failures")) + int(suite.get("errors"))
        assert failed == 0 and tests - skipped >= 6, (tests, skipped, failed)
        bench = json.loads((out / "gpu.json").read_text())
        assert bench["dry_run"] and "train" in bench["sdxl"] and "train" in bench["flux"], bench
        print(f"cpu check ok: {tests - skipped} of {tests} CUDA tests ran on the CPU, {skipped} skipped; "
              f"dry-run bench in {bench['seconds']:.0f} s; out: {files}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
