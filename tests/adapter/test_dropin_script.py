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
