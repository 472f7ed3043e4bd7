"""tests/dreambooth_like.py, a training script in the structure of diffusers' DreamBooth LoRA
scripts switched to tlora, end to end on the tiny SD-XL and FLUX pipelines: training with
checkpoints every 2 steps, validation through the stock pipeline, the output folder loaded by a
fresh pipeline's `load_lora_weights`, and a resume from a checkpoint that ends bit-identical to
the uninterrupted run (the reference)."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch
from dreambooth_like import Args, main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", ["sdxl", "flux"])
def test_a_dreambooth_style_script_trains_validates_resumes_and_loads(kind, models, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = main(Args(str(models[kind]), str(tmp_path / "whole"), kind))
        assert sorted(p.name for p in (tmp_path / "whole").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
        assert whole.validation_images == 2 and len(whole.losses) == 4
        image = np.asarray(whole.final_images[0])
        assert image.shape[-1] == 3 and np.isfinite(image).all()

        # a run that died after its checkpoint at step 2, resumed
        (tmp_path / "resumed").mkdir()
        shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
        torch.manual_seed(1234)  # whatever the RNG holds: the resume restores it
        resumed = main(Args(str(models[kind]), str(tmp_path / "resumed"), kind, resume_from_checkpoint="latest"))
    assert len(resumed.losses) == 2 and resumed.losses == whole.losses[2:]
    assert resumed.adapter.keys() == whole.adapter.keys()
    for k in whole.adapter:
        assert torch.equal(resumed.adapter[k], whole.adapter[k]), k


def _lora_factors(text_encoders) -> dict[str, torch.Tensor]:
    return {
        f"{i}.{name}": p.detach().clone()
        for i, m in enumerate(text_encoders)
        for name, p in m.named_parameters()
        if "lora_" in name
    }


def test_a_text_encoder_lora_beside_the_tlora_unet_trains_resumes_and_loads(models, tmp_path):
    """`--train_text_encoder`: PEFT LoRA in both SD-XL text encoders beside the tlora UNet. Both
    train, a resume from the step-2 checkpoint ends bit-identical in both, and the script's final
    save_lora_weights (tlora's static UNet LoRA plus the text encoders') loads into a fresh pipeline
    whose text encoders then compute what the trained ones do."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = dict(kind="sdxl", train_text_encoder=True)
        whole = main(Args(str(models["sdxl"]), str(tmp_path / "whole"), **args))
        (tmp_path / "resumed").mkdir()
        shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
        torch.manual_seed(99)
        resumed = main(Args(str(models["sdxl"]), str(tmp_path / "resumed"), resume_from_checkpoint="latest", **args))

    trained = _lora_factors(whole.text_encoders)
    assert len(trained) == 2 * 2 * 2 * 4  # 2 encoders x 2 layers x (A, B) x 4 projections
    # PEFT's "gaussian" init starts B at zero: trained, every B that gets a gradient has moved.
    # SD-XL conditions on the penultimate hidden states, so text_encoder's last layer gets none
    # (text_encoder_2's does, through its pooled projection).
    moved = {k for k, v in trained.items() if "lora_B" in k and v.abs().max() > 0}
    unused = {k for k in trained if "lora_B" in k and k.startswith("0.") and ".layers.1." in k}
    assert moved == {k for k in trained if "lora_B" in k} - unused and len(unused) == 4
    assert resumed.losses == whole.losses[2:]
    again = _lora_factors(resumed.text_encoders)
    assert again.keys() == trained.keys()
    for k in trained:
        assert torch.equal(again[k], trained[k]), k
    for k in whole.adapter:
        assert torch.equal(resumed.adapter[k], whole.adapter[k]), k

    ids = torch.randint(0, 100, (1, 8))
    fresh = whole.pipeline
    with torch.no_grad():
        for mine, loaded in zip(whole.text_encoders, (fresh.text_encoder, fresh.text_encoder_2)):
            mine.eval()
            torch.testing.assert_close(loaded(ids)[0], mine(ids)[0], rtol=1e-5, atol=1e-6)
