"""tlora's accelerate hooks under two gloo CPU processes (`accelerate launch --multi_gpu`): the
DreamBooth-style script of tests/dreambooth_like.py trains one adapter on both, the main process
alone writes tlora's files, every process loads them back in place, and a run resumed from its
step-2 checkpoint ends bit-identical to the uninterrupted run on both processes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_runs import subprocess_env

pytestmark = pytest.mark.usefixtures("one_thread")

TESTS = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import sys
    from accelerate import PartialState
    from safetensors.torch import save_file
    from dreambooth_like import Args, main

    model, out, kind, resume, ranks = sys.argv[1:6]
    latest = "latest" if resume == "1" else None
    outcome = main(Args(model, out, kind, validation_epochs=100, resume_from_checkpoint=latest))
    save_file(outcome.adapter, f"{ranks}/rank{PartialState().process_index}.safetensors")
""")


def _launch(tmp_path: Path, model: Path, out: Path, ranks: Path, resume: bool) -> None:
    script = tmp_path / "ddp_dreambooth.py"
    script.write_text(SCRIPT)
    ranks.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    cmd += [str(model), str(out), "sdxl", "1" if resume else "0", str(ranks)]
    env = dict(subprocess_env(), ACCELERATE_USE_CPU="true", PYTHONPATH=str(TESTS))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def test_two_processes_save_once_load_in_place_and_resume_bit_exactly(models, tmp_path):
    whole, whole_ranks = tmp_path / "whole", tmp_path / "whole-ranks"
    _launch(tmp_path, models["sdxl"], whole, whole_ranks, resume=False)
    checkpoint = whole / "checkpoint-2"
    # tlora's files written once, by the main process; accelerate's random state per process
    assert sorted(p.name for p in checkpoint.iterdir() if "tlora" in p.name or "lora" in p.name) == [
        "pytorch_lora_weights.safetensors",
        "tlora_adapter.safetensors",
    ]
    assert {p.name for p in checkpoint.glob("random_states_*")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert not list(checkpoint.glob("model*.safetensors"))  # the UNet's whole weights are left out
    assert not [p for p in whole.rglob("*") if ".tmp-" in p.name]

    resumed, resumed_ranks = tmp_path / "resumed", tmp_path / "resumed-ranks"
    resumed.mkdir()
    shutil.copytree(checkpoint, resumed / "checkpoint-2")
    _launch(tmp_path, models["sdxl"], resumed, resumed_ranks, resume=True)

    final = [load_file(whole_ranks / f"rank{i}.safetensors") for i in (0, 1)]
    again = [load_file(resumed_ranks / f"rank{i}.safetensors") for i in (0, 1)]
    start = load_file(checkpoint / "tlora_adapter.safetensors")
    assert final[0].keys() == final[1].keys() == again[0].keys() == again[1].keys()
    for k in final[0]:
        assert torch.equal(final[0][k], final[1][k]), k  # one adapter on both processes
        assert torch.equal(again[0][k], final[0][k]) and torch.equal(again[1][k], final[0][k]), k
    # and the resumed steps trained: the end is not the checkpoint
    assert any(not torch.equal(final[0][k], start[k].to(final[0][k].dtype)) for k in final[0] if k in start)
