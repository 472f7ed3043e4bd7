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
