"""DDP: `tlora.train.loop.train` under `accelerate launch` with 2 gloo CPU processes trains one adapter
(gradients averaged), the main process alone writes every file once, and a resumed DDP run equals
an uninterrupted one (each process resumes its own random stream).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_runs import assert_same_tensors, log_entries, subprocess_env

from tlora.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


DDP_SCRIPT = textwrap.dedent("""
    import sys
    from accelerate import PartialState
    from safetensors.torch import save_file
    from tlora.train.loop import train

    model, image, out, ranks, steps, resume = sys.argv[1:7]
    result = train(model=model, image=image, token="sks", class_name="dog", out=out, resolution=16, rank=4,
                   lr=3e-2, steps=int(steps), checkpoint_every=2, seed=0, resume=resume == "1")
    index = PartialState().process_index
    save_file({k: v.detach().cpu().contiguous() for k, v in result.adapter.state_dict().items()},
              f"{ranks}/rank{index}.safetensors")
""")


def launch_ddp(
    tmp_path: Path, model: Path, image: Path, out: Path, ranks: Path, steps: int, resume: bool = False
) -> None:
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    ranks.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
        str(model),
        str(image),
        str(out),
        str(ranks),
        str(steps),
        "1" if resume else "0",
    ]
    env = dict(subprocess_env(), ACCELERATE_USE_CPU="true")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def ddp_run(models, image, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ddp")
    launch_ddp(root, models["sd"], image, root / "run", root / "ranks", 4)
    return root / "run", root / "ranks"


def test_ddp_two_processes_train_one_adapter(ddp_run, models, image, tmp_path):
    out, ranks = ddp_run
    r0, r1 = ranks / "rank0.safetensors", ranks / "rank1.safetensors"
    assert r0.is_file() and r1.is_file()
    assert_same_tensors(r0, r1)  # gradients were averaged: both replicas hold the same adapter
    assert_same_tensors(r0, out / "adapter.safetensors")
    # The main process alone wrote the files: one adapter, one set of checkpoints, one log line per step.
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter.safetensors",
        "checkpoint-2",
        "checkpoint-4",
        "config.json",
        "loss.jsonl",
    ]
    assert [e["step"] for e in log_entries(out)] == [1, 2, 3, 4]
    for n in (2, 4):
        assert {p.name for p in (out / f"checkpoint-{n}").iterdir()} == {
            "adapter.safetensors",
            "state.safetensors",
            "state.json",
        }

    # Both processes contributed (each draws its own timesteps): the result differs from one process's run.
    single = tmp_path / "single"
    train(
        model=str(models["sd"]),
        image=str(image),
        token="sks",
        class_name="dog",
        out=str(single),
        resolution=16,
        rank=4,
        lr=3e-2,
        steps=4,
        checkpoint_every=2,
        seed=0,
    )
    a, b = load_file(str(single / "adapter.safetensors")), load_file(str(r0))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_ddp_resume_equals_uninterrupted_ddp_run(ddp_run, models, image, tmp_path):
    """Each process resumes its own random stream (the checkpoint keeps every process's RNG)."""
    reference, _ = ddp_run
    out, ranks = tmp_path / "run", tmp_path / "ranks"
    launch_ddp(tmp_path, models["sd"], image, out, ranks, 2)
    launch_ddp(tmp_path, models["sd"], image, out, ranks, 4, resume=True)
    assert_same_tensors(ranks / "rank0.safetensors", ranks / "rank1.safetensors")
    assert_same_tensors(out / "adapter.safetensors", reference / "adapter.safetensors")
    assert [e["loss"] for e in log_entries(out)] == [e["loss"] for e in log_entries(reference)]
