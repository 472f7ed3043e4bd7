"""`tlora demo`'s own folder (a rerun after an interruption) and its thread choice."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

import tlora.generate
from tlora.demo.concepts import EVAL_PROMPTS, concept
from tlora.demo.evaluate import finetune


@pytest.fixture
def no_sampling(monkeypatch):
    """The fine-tune is real (the folder logic lives in train); its sampling is skipped."""

    def blank(pipe, texts, n, *a, **kw):
        return [[Image.new("RGB", (32, 32), "white")] * n for _ in texts]

    monkeypatch.setattr(tlora.generate, "sample_images", blank)


def _log_steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "loss.jsonl").read_text().splitlines()]


def test_rerun_after_an_interrupted_finetune_proceeds(tmp_path, no_sampling, capsys):
    c = concept("split_cross")
    run_dir = tmp_path / "lora"
    # A fine-tune killed before its first checkpoint leaves its config and some loss lines
    # (before: the rerun stopped with "holds another run ... pass --resume ... or --overwrite").
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"train": {}, "adapter": {}}))
    (run_dir / "loss.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    r = finetune(c, "LoRA", tmp_path, rank=2, steps=4, n=1, sample_steps=1)
    assert r.method == "LoRA" and len(r.rows) == len(EVAL_PROMPTS)
    assert (run_dir / "adapter.safetensors").exists() and _log_steps(run_dir) == [1, 2, 3, 4]
    # A finished run is started over too.
    finetune(c, "LoRA", tmp_path, rank=2, steps=4, n=1, sample_steps=1)
    assert "resuming" not in capsys.readouterr().out
    # Killed after checkpoint 2 of 4: the rerun resumes there (only steps 2 and 3 are trained again).
    (run_dir / "adapter.safetensors").unlink()
    shutil.rmtree(run_dir / "checkpoint-4")
    assert (run_dir / "checkpoint-2").is_dir()
    lines = (run_dir / "loss.jsonl").read_text().splitlines()
    marked = ['{"step": 1, "loss": 123.0}', *lines[1:]]  # kept by a resumed run, rewritten by a new one
    (run_dir / "loss.jsonl").write_text("\n".join(marked) + "\n")
    finetune(c, "LoRA", tmp_path, rank=2, steps=4, n=1, sample_steps=1)
    assert "LoRA: resuming the interrupted fine-tune" in capsys.readouterr().out
    assert (run_dir / "adapter.safetensors").exists() and _log_steps(run_dir) == [1, 2, 3, 4]
    assert (run_dir / "loss.jsonl").read_text().splitlines()[0] == marked[0]
    # The same interrupted folder with other settings (rank 4) cannot resume: it is replaced.
    (run_dir / "adapter.safetensors").unlink()
    finetune(c, "LoRA", tmp_path, rank=4, steps=4, n=1, sample_steps=1)
    out = capsys.readouterr().out
    assert "cannot resume" in out and "starting over" in out
    assert json.loads((run_dir / "config.json").read_text())["adapter"]["rank"] == 4


@pytest.fixture
def keep_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_demo_chooses_and_reports_its_thread_count(monkeypatch, capsys, keep_threads):
    import torch

    from tlora.demo.run import choose_threads
    from tlora.errors import ConfigError

    torch.set_num_threads(2)  # torch's default on this machine (before: the demo kept it)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert choose_threads(None) == 1 and torch.get_num_threads() == 1
    assert capsys.readouterr().out.startswith("threads: 1 (the toy model's steps are per-op overhead")
    assert choose_threads(2) == 2 and torch.get_num_threads() == 2
    assert capsys.readouterr().out.startswith("threads: 2 (--threads;")
    # The user's OMP_NUM_THREADS (read by torch at import) is kept.
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert choose_threads(None) == 2 and torch.get_num_threads() == 2
    assert capsys.readouterr().out.startswith("threads: 2 (OMP_NUM_THREADS;")
    with pytest.raises(ConfigError, match="--threads must be 1 or more, got 0"):
        choose_threads(0)


def test_demo_prints_estimates_before_the_long_phases(tmp_path, monkeypatch, capsys, keep_threads):
    import argparse

    import tlora.demo.evaluate as toy
    from tlora.demo.run import SAMPLE_STEPS, SECONDS_PER_SAMPLE_STEP, run

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    rows = [[Image.new("RGB", (32, 32), "white")] * 4 for _ in EVAL_PROMPTS]
    scores = dict(fidelity=0.0, alignment=0.0, background_accuracy=0.0, position_accuracy=0.0, diversity=0.0)
    image_steps = len(EVAL_PROMPTS) * SAMPLE_STEPS
    # Measured: 0.2 s a denoising step of a prompt's 4 samples (sampling 12 x 25 x 0.2 = 60 s), then
    # LoRA's 0.3 s a training step.
    seconds = {"base model": image_steps * 0.2, "LoRA": 60.0 + 1000 * 0.3, "T-LoRA": 0.0}
    monkeypatch.setattr(
        toy, "sample_base", lambda c, n, seed: toy.Run("base model", scores, rows, seconds["base model"])
    )
    monkeypatch.setattr(toy, "finetune", lambda c, m, out, **kw: toy.Run(m, scores, rows, seconds[m]))
    monkeypatch.setattr(toy, "autoencoder_ceiling", lambda c: 0.9)
    run(argparse.Namespace(concept="split_cross", out=str(tmp_path), steps=1000, rank=16, n=4, seed=0, threads=None))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("threads: 1 ")
    base = next(i for i, line in enumerate(lines) if line.startswith("sampling the base model"))
    stated = image_steps * SECONDS_PER_SAMPLE_STEP
    assert lines[base] == f"sampling the base model: {len(EVAL_PROMPTS)} prompts x 4, about {stated:.0f} s here"
    # LoRA: the stated 0.1 s a step and the measured sampling: 100 + 60 s; T-LoRA: LoRA's measured 0.3 s a step.
    assert "fine-tuning LoRA: 1000 steps, then sampling: about 3 min here" in lines
    assert "fine-tuning T-LoRA: 1000 steps, then sampling: about 6 min here" in lines
