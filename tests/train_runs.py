"""What the training tests read back from a `tlora train` run: its loss log, its tensors compared
bit for bit, the files it wrote, the CLI's exit status with its last error line, and the
environment of the subprocesses that run it (one intra-op thread, offline).

Used by tests/train/test_train.py, test_train_resume.py, test_train_ddp.py and test_train_inputs.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from tlora import cli


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    for key in [k for k in env if k.startswith("ACCELERATE_")]:
        del env[key]
    return env


def log_entries(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs between {a} and {b}"


def written_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file()] if out.exists() else []


def cli_outcome(args: list[str], capsys) -> tuple[int, str]:
    """`tlora ARGS` in this process: its exit status and the last line of its stderr (no traceback)."""
    rc = cli.main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err.strip().splitlines()[-1] if err.strip() else ""
