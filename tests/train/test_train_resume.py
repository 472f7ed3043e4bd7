"""Checkpoints and `tlora train --resume` on the tiny SD pipeline: resuming (after a SIGKILL, after
a full disk) equals an uninterrupted run bit for bit; a run whose loss turns non-finite or whose
optimizer state goes bad stops with its last good checkpoint named and kept; --resume refuses what
it cannot continue (another run in the folder, other settings or model, a concurrent run, state
missing or beyond --steps) and writes nothing.

Everything runs with one intra-op thread, in this process and in the subprocesses: the tests
compare a killed subprocess's checkpoint with in-process runs bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from train_runs import assert_same_tensors, log_entries, subprocess_env, written_files
from train_runs import cli_outcome as _cli

import tlora.train.loop
from tlora import cli
from tlora.files.io import read
from tlora.testing.train_inputs import drop_checkpoint_state, nan_on_call, optimizer_lrs, set_flag, train_args

pytestmark = pytest.mark.usefixtures("one_thread")
# Settings of the resume tests' shared uninterrupted reference run.
RESUME_STEPS, RESUME_EVERY = 12, 4


# ---- resuming equals an uninterrupted run ----------------------------------------------------------


@pytest.fixture(scope="module")
def reference_run(models, image, tmp_path_factory) -> Path:
    """An uninterrupted 12-step run (checkpoints at 4, 8, 12) that the resumed runs must equal."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert cli.main(train_args(models["sd"], image, out, RESUME_STEPS, RESUME_EVERY)) == 0
    return out


def assert_equals_reference(out: Path, reference: Path) -> None:
    assert_same_tensors(out / "adapter.safetensors", reference / "adapter.safetensors")
    for n in range(RESUME_EVERY, RESUME_STEPS + 1, RESUME_EVERY):
        assert_same_tensors(
            out / f"checkpoint-{n}" / "adapter.safetensors", reference / f"checkpoint-{n}" / "adapter.safetensors"
        )
        assert_same_tensors(
            out / f"checkpoint-{n}" / "state.safetensors", reference / f"checkpoint-{n}" / "state.safetensors"
        )
    ours, theirs = log_entries(out), log_entries(reference)
    assert [e["step"] for e in ours] == list(range(1, RESUME_STEPS + 1))  # no step twice
    assert [e["loss"] for e in ours] == [e["loss"] for e in theirs]


KILLABLE = textwrap.dedent("""
    # `python -m tlora.cli`, except that the training loop blocks (writing MARKER first) before
    # step BLOCK_AT, so the test can SIGKILL it at a known point instead of racing it.
    import os, sys, time
    import tlora.train.loop
    from tlora.cli import main

    BLOCK_AT, MARKER = int(os.environ["TLORA_TEST_BLOCK_AT"]), os.environ["TLORA_TEST_MARKER"]
    _tqdm = tlora.train.loop.tqdm

    class BlockingBar:
        def __init__(self, *args, **kwargs):
            self.bar = _tqdm(*args, **kwargs)

        def __iter__(self):
            for step in self.bar:
                if step + 1 == BLOCK_AT:
                    open(MARKER, "w").close()
                    time.sleep(600)
                yield step

        def __getattr__(self, name):
            return getattr(self.bar, name)

    tlora.train.loop.tqdm = BlockingBar
    sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_then_resume_equals_uninterrupted_run(models, image, reference_run, tmp_path, capsys):
    out = tmp_path / "run"
    script, marker = tmp_path / "killable.py", tmp_path / "blocked"
    script.write_text(KILLABLE)
    env = dict(subprocess_env(), TLORA_TEST_BLOCK_AT="11", TLORA_TEST_MARKER=str(marker))
    log = tmp_path / "killed.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, str(script), *train_args(models["sd"], image, out, RESUME_STEPS, RESUME_EVERY)],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"the run never reached step 11 (exit {proc.poll()}):\n{log.read_text()[-5000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # Killed after step 10: checkpoints 4 and 8, a log two steps ahead of them, no final adapter.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert [e["step"] for e in log_entries(out)] == list(range(1, 11))
    assert not (out / "adapter.safetensors").exists()

    assert cli.main(train_args(models["sd"], image, out, RESUME_STEPS, RESUME_EVERY, "--resume")) == 0
    assert f"resuming from {out / 'checkpoint-8'} (step 8)" in capsys.readouterr().out
    assert_equals_reference(out, reference_run)


def test_disk_full_during_checkpoint_keeps_the_previous_one(
    models, image, reference_run, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    real_save = tlora._native.save_file
    attempts = []

    def save_file(path, *args, **kwargs):
        # The second checkpoint's optimizer state, after its adapter file went into the temp folder.
        if Path(path).parent.name.startswith(".checkpoint-8") and Path(path).name == "state.safetensors":
            attempts.append(path)
            raise OSError(28, "No space left on device")
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(tlora._native, "save_file", save_file)
    rc = cli.main(train_args(models["sd"], image, out, RESUME_STEPS, RESUME_EVERY))
    err = capsys.readouterr().err
    assert attempts, "the failing write was never attempted"
    assert rc == 2 and "No space left on device" in err, err
    monkeypatch.undo()

    # checkpoint-4 survives intact; no temp folder, no checkpoint-8, no final adapter.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4", "config.json", "loss.jsonl"]
    assert json.loads((out / "checkpoint-4" / "state.json").read_text())["step"] == 4
    for name in ("adapter.safetensors", "state.safetensors"):
        assert_same_tensors(out / "checkpoint-4" / name, reference_run / "checkpoint-4" / name)

    # With room on the disk again, resuming from it finishes the same run as the uninterrupted one.
    assert cli.main(train_args(models["sd"], image, out, RESUME_STEPS, RESUME_EVERY, "--resume")) == 0
    assert f"resuming from {out / 'checkpoint-4'} (step 4)" in capsys.readouterr().out
    assert not [p for p in out.iterdir() if p.name.startswith(".checkpoint-")]
    assert_equals_reference(out, reference_run)


# ---- a run that goes wrong keeps its last good checkpoint ------------------------------------------


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(models, image, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(tlora.train.loop.F, "mse_loss", nan_on_call(F.mse_loss, 3))
    rc, message = _cli(train_args(models["sd"], image, out, 4, 2), capsys)
    monkeypatch.undo()
    assert rc == 2 and "the loss is nan at step 3" in message, message
    assert f"The last good checkpoint is {out / 'checkpoint-2'}" in message
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "adapter.safetensors").exists()
    read(out / "checkpoint-2" / "adapter.safetensors")  # intact and finite


def test_optimizer_state_gone_bad_is_not_checkpointed(models, image, tmp_path, monkeypatch, capsys):
    """Finite factors but a negative second moment (a state AdamW cannot continue from): the run
    stops before writing that checkpoint and names the last one it wrote."""
    step = torch.optim.AdamW.step
    calls = []

    def poisoned(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            self.state[self.param_groups[0]["params"][0]]["exp_avg_sq"].fill_(-1.0)
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    out = tmp_path / "run"
    rc, message = _cli(train_args(models["sd"], image, out, 3, 1), capsys)
    monkeypatch.undo()
    assert rc == 2 and "the optimizer's state 0 exp_avg_sq holds negative values" in message, message
    assert "at step 2" in message and f"The last good checkpoint is {out / 'checkpoint-1'}" in message, message
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]


# ---- what --resume refuses or warns about ----------------------------------------------------------


def _copy_run(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def test_out_holding_another_run_needs_resume_or_overwrite(models, image, trained, tmp_path, capsys):
    out = _copy_run(trained, tmp_path)
    before = {p: p.read_bytes() for p in written_files(out)}
    rc, message = _cli(train_args(models["sd"], image, out, 3, 1), capsys)
    assert rc == 2 and f"{out} holds another run" in message and "--resume" in message and "--overwrite" in message
    assert {p: p.read_bytes() for p in written_files(out)} == before
    assert cli.main(train_args(models["sd"], image, out, 1, 1, "--overwrite")) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert [e["step"] for e in log_entries(out)] == [1]


@pytest.mark.parametrize(
    "flag,value,fragment",
    [
        ("--rank", "2", "--rank was 4, now 2"),
        ("--min-rank", "1", "--min-rank was 2, now 1"),
        ("--variant", "vanilla", "--variant was 'tlora', now 'vanilla'"),
        ("--seed", "5", "--seed was 0, now 5"),
        # the sampling settings: how noise levels are drawn, and the validation samples
        ("--timestep-sampling", "mode", "--timestep-sampling was unset (the default), now 'mode'"),
        ("--shift", "3", "--shift was unset (the default), now 3.0"),
        ("--validation-prompt", "a {} on a beach", "--validation-prompt was [], now ['a {} on a beach']"),
        ("--validation-steps", "4", "--validation-steps was unset (the default), now 4"),
        # every other setting that shapes the training: the optimizer's (its betas would come back
        # from the checkpoint), the data's, the loss's, the EMA's
        ("--adam-beta2", "0.99", "--adam-beta2 was 0.999, now 0.99"),
        ("--adam-weight-decay", "0.5", "--adam-weight-decay was 0.0001, now 0.5"),
        ("--noise-offset", "0.1", "--noise-offset was 0.0, now 0.1"),
        ("--train-batch-size", "2", "--train-batch-size was 1, now 2"),
        ("--instance-prompt", "a {token} toy", "--instance-prompt was 'a photo of {token} {class}', now"),
        ("--ema-decay", "0.9", "--ema-decay was unset (the default), now 0.9"),
        ("--lr-scheduler", "cosine", "--lr-scheduler was 'constant', now 'cosine'"),
        ("--rank-schedule", "cosine", "--rank-schedule was 'power', now 'cosine'"),
        ("--rank-scaling", "rank", "--rank-scaling was 'none', now 'rank'"),
    ],
)
def test_resume_refuses_settings_it_cannot_honour(flag, value, fragment, models, image, trained, tmp_path, capsys):
    out = _copy_run(trained, tmp_path)
    args = set_flag(train_args(models["sd"], image, out, 3, 1, "--resume"), flag, value)
    rc, message = _cli(args, capsys)
    assert rc == 2 and "--resume cannot continue the run" in message and fragment in message, message
    assert not (out / "checkpoint-3").exists()


def test_resume_keeps_the_recorded_sampling_settings(models, image, trained, tmp_path, capsys):
    """A run that recorded sampling settings resumes with the same ones and is refused without
    them (a changed value names its flag); a run recorded before such a setting existed took its
    default, and resumes with it."""
    out = tmp_path / "run"
    sampling = ["--timestep-sampling", "mode", "--validation-prompt", "a {} in snow", "--validation-steps", "2"]
    assert cli.main(train_args(models["sd"], image, out, 1, 1, *sampling)) == 0
    rc, message = _cli(train_args(models["sd"], image, out, 2, 1, "--resume"), capsys)
    assert rc == 2 and "--timestep-sampling was 'mode', now unset (the default)" in message, message
    assert "--validation-prompt was ['a {} in snow'], now []" in message and "--validation-steps was 2" in message
    assert cli.main(train_args(models["sd"], image, out, 2, 1, "--resume", *sampling)) == 0
    assert "timesteps mode" in capsys.readouterr().out

    old = _copy_run(trained, tmp_path / "old")
    config = json.loads((old / "config.json").read_text())
    for key in ("timestep_sampling", "shift", "validation_prompts", "validation_steps"):
        del config["train"][key]
    (old / "config.json").write_text(json.dumps(config))
    rc, message = _cli(train_args(models["sd"], image, old, 3, 1, "--resume", "--timestep-sampling", "mode"), capsys)
    assert rc == 2 and "--timestep-sampling was unset (the default), now 'mode'" in message, message
    assert cli.main(train_args(models["sd"], image, old, 3, 1, "--resume")) == 0
    assert (old / "checkpoint-3").is_dir()


def test_resume_may_change_how_long_how_often_and_where(models, image, trained, tmp_path, capsys):
    """What resume may change (run_folder.RESUME_CHANGEABLE) it takes; a setting recorded before it
    existed (deleted from config.json here) took its default, so the default resumes."""
    out = _copy_run(trained, tmp_path)
    config = json.loads((out / "config.json").read_text())
    del config["train"]["noise_offset"]
    (out / "config.json").write_text(json.dumps(config))
    extra = ["--resume", "--gradient-checkpointing", "--checkpoints-total-limit", "2", "--validation-every", "5"]
    assert cli.main(train_args(models["sd"], image, out, 4, 2, *extra)) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_resume_with_another_model_is_refused(models, image, trained, tmp_path, capsys):
    out = _copy_run(trained, tmp_path)
    args = train_args(models["sdxl"], image, out, 3, 1, "--resume")
    rc, message = _cli(args, capsys)
    assert rc == 2 and "--model was" in message, message


def test_resume_applies_a_new_lr_and_says_so(models, image, trained, tmp_path, capsys):
    out = _copy_run(trained, tmp_path)
    args = train_args(models["sd"], image, out, 3, 1, "--resume")
    args[args.index("--lr") + 1] = "1e-3"
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "--lr 0.001 differs from the checkpoint's 0.03: the optimizer continues with 0.001" in printed
    assert optimizer_lrs(out / "checkpoint-3" / "state.safetensors") == [1e-3]


def test_second_concurrent_run_is_refused(models, image, trained, tmp_path, capsys):
    import fcntl

    out = _copy_run(trained, tmp_path)
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a running `tlora train` holds
        rc, message = _cli(train_args(models["sd"], image, out, 3, 1, "--resume"), capsys)
    finally:
        os.close(fd)
    assert rc == 2 and f"another tlora run is writing to {out}" in message, message
    assert not (out / "checkpoint-3").exists()
    assert cli.main(train_args(models["sd"], image, out, 3, 1, "--resume")) == 0  # the lock is gone


@pytest.mark.parametrize("drop,fragment", [("rng", "has no RNG state"), ("optimizer", "has no optimizer state")])
def test_resume_from_a_checkpoint_missing_state(drop, fragment, models, image, trained, tmp_path, capsys):
    out = _copy_run(trained, tmp_path)
    state = out / "checkpoint-2" / "state.safetensors"
    drop_checkpoint_state(state, drop)
    rc, message = _cli(train_args(models["sd"], image, out, 3, 1, "--resume"), capsys)
    assert rc == 2 and fragment in message and str(state) in message, message


def test_resume_beyond_the_runs_steps_is_refused(models, image, trained, tmp_path, capsys):
    out = _copy_run(trained, tmp_path)
    before = {p: p.read_bytes() for p in written_files(out)}
    rc, message = _cli(train_args(models["sd"], image, out, 1, 1, "--resume"), capsys)
    state = out / "checkpoint-2" / "state.json"
    assert rc == 2 and f"{state}: step 2 is beyond this run's --steps 1: give --steps above 2" in message, message
    assert {p: p.read_bytes() for p in written_files(out)} == before


def test_checkpoint_without_checksum_resumes_with_a_warning(models, image, trained, tmp_path, capsys):
    """A state file from before checksums: every other check still runs, and it resumes exactly."""
    reference = _copy_run(trained, tmp_path / "a")
    assert cli.main(train_args(models["sd"], image, reference, 3, 1, "--resume")) == 0
    out = _copy_run(trained, tmp_path / "b")
    drop_checkpoint_state(out / "checkpoint-2" / "state.safetensors", "checksum")
    capsys.readouterr()
    with pytest.warns(UserWarning, match="state.safetensors has no checksum"):
        assert cli.main(train_args(models["sd"], image, out, 3, 1, "--resume")) == 0
    assert_same_tensors(
        out / "checkpoint-3" / "adapter.safetensors", reference / "checkpoint-3" / "adapter.safetensors"
    )
    assert_same_tensors(out / "checkpoint-3" / "state.safetensors", reference / "checkpoint-3" / "state.safetensors")


def test_divergence_after_resume_names_the_validated_checkpoint(models, image, trained, tmp_path, monkeypatch, capsys):
    out = _copy_run(trained, tmp_path)
    monkeypatch.setattr(tlora.train.loop.F, "mse_loss", nan_on_call(F.mse_loss, 1))  # the first step after resuming
    rc, message = _cli(train_args(models["sd"], image, out, 4, 1, "--resume"), capsys)
    monkeypatch.undo()
    assert rc == 2 and "the loss is nan at step 3" in message, message
    assert f"The last good checkpoint is {out / 'checkpoint-2'}" in message
