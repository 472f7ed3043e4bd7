"""Fixtures shared by the test files: the tiny diffusers pipelines saved as folders, the photo the
training tests train on, a finished training run to copy, and one intra-op thread.

The training tests run with one intra-op thread, in this process and (through train_runs'
subprocess_env) in the subprocesses they start: results are then bitwise reproducible across
processes (the resume tests compare a killed subprocess's checkpoint with in-process runs), and the
tiny models step in milliseconds even when other work shares the CPUs.

The helpers the tests share with the benchmarks import as top-level modules: the ones in tests/
(pytest puts this folder on the path) and, from benches/, reference.py (the float64 update and
r(t)) and ops.py (the op counter), put on the path here, once for every test file.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

from tlora.testing.train_inputs import train_args, write_photo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))


@contextlib.contextmanager
def intra_op_threads(n: int):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    with intra_op_threads(1):
        yield


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """The three tiny diffusers folders (sd, sdxl, flux), built once: a test that changes one copies it first."""
    from tlora.testing.tiny import KINDS, save_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: save_tiny_pipeline(kind, root / kind) for kind in KINDS}


@pytest.fixture(scope="session")
def image(tmp_path_factory) -> Path:
    """A 16x16 RGB photo: a yellow disc on a colour gradient."""
    return write_photo(tmp_path_factory.mktemp("images") / "dog.png")


@pytest.fixture(scope="session")
def trained(models, image, tmp_path_factory) -> Path:
    """A finished 2-step run on the tiny SD pipeline (checkpoints 1 and 2) to copy, trained on one
    thread as the runs that resume it."""
    from tlora import cli

    out = tmp_path_factory.mktemp("trained") / "run"
    with intra_op_threads(1):
        assert cli.main(train_args(models["sd"], image, out, 2, 1)) == 0
    return out
