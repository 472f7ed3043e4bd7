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
