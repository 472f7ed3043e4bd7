"""The GPU kit's CPU half: run `gpu-check --cpu` the way the GPU machine would run it.

    python gpu-kit/cpu_check.py dist/gpu-kit        # with the Python 3.12 + torch 2.11 venv's python

Builds a stand-in for the GPU image: a fresh virtualenv that sees, through a .pth line pointing at
a folder of links, only those of this interpreter's distributions (torch 2.11, transformers,
accelerate, peft, ...) that the image has too (make_kit.IMAGE, the device notes' package list),
with what they need here: diffusers and whatever it needs beyond the image come from the kit. Copies the kit elsewhere,
runs its gpu-check with cargo and rustc off PATH, and checks what it wrote: the install went through
pip's resolver, the CUDA tests ran their device-agnostic part on the CPU and passed, and the
benchmark's dry run wrote gpu.json and gpu.md.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from make_kit import IMAGE, normalise
from packaging.requirements import Requirement


def image_stand_in(work: Path) -> Path:
    """A venv whose extra site folder holds links to the image's distributions only."""
    site = Path(sysconfig.get_paths()["purelib"])
    farm = work / "image-site"
    farm.mkdir()
    dists = {normalise(d.metadata["Name"]): d for d in importlib.metadata.distributions(path=[str(site)])}
    # The image's distributions as installed here, with what they need here (versions differ:
    # e.g. a newer huggingface_hub here needs httpx2), but nothing that only diffusers needs.
    keep, todo = set(), [n for n in dists if n in IMAGE]
    while todo:
        name = todo.pop()
        if name in keep or name not in dists:
            continue
        keep.add(name)
        for line in dists[name].requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(normalise(req.name))
    kept = set()
    for name in sorted(keep):
        dist = dists[name]
        tops = {Path(str(f)).parts[0] for f in dist.files or []}
        for top in tops:
            if top != ".." and (site / top).exists() and top not in kept:
                (farm / top).symlink_to(site / top)
                kept.add(top)
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
        path = [
            p
            for p in os.environ["PATH"].split(os.pathsep)
            if p and not (Path(p) / "cargo").exists() and not (Path(p) / "rustc").exists()
        ]
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "OUT")}
        env.update(PATH=os.pathsep.join(path), PYTHON=str(python))
        run = subprocess.run(
            [str(kit / "gpu-check"), "--cpu", str(out)], cwd=work, env=env, capture_output=True, text=True, timeout=1200
        )
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
        print(
            f"cpu check ok: {tests - skipped} of {tests} CUDA tests ran on the CPU, {skipped} skipped; "
            f"dry-run bench in {bench['seconds']:.0f} s; out: {files}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
