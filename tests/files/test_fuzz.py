"""Fuzz: over 300 corrupted adapter files made from one valid file (tests/fuzz_corpus.py:
truncations, header and data byte flips, every malformed-description class, other dtypes and
shapes, non-finite and huge values, broken reference-code and LyCORIS layouts), each through every
reader: tlora.load, tlora.read, `tlora info`, export and import.

Each reader either loads the file exactly (the valid file's tensors and settings, or for a float16
/ bfloat16 / float64 tensor the file's own values as float32, with a warning) or raises one of
tlora's own errors (tlora.TloraError) naming the file, within a timeout, leaving the model bitwise
as it was.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import update_f64  # benches/reference.py: the paper's update in float64

import tlora
from tlora.adapter.inject import adapter_of
from tlora.testing.fuzz_corpus import (
    READERS,
    FuzzModel,
    build,
    checksum,
    file_tensors,
    run_cli,
    run_in_thread,
    run_reader,
    valid_file,
)

TIMEOUT_S = 20.0


def call_with_timeout(fn, *args):
    """(result, exception) of fn(*args) run in a daemon thread; fails the test on a hang."""
    box = run_in_thread(fn, *args, timeout=TIMEOUT_S)
    assert not box.get("hang"), f"{fn.__name__} did not return within {TIMEOUT_S} s"
    return box


def snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [(n, type(m)) for n, m in model.named_modules()],
        len(model._forward_pre_hooks),
    )


def assert_untouched(model, before, label):
    tensors, types, hooks = snapshot(model)
    assert adapter_of(model) is None, label
    assert types == before[1] and hooks == before[2], label
    assert tensors.keys() == before[0].keys(), label
    for k, v in before[0].items():
        assert torch.equal(tensors[k], v), f"{label}: {k} changed"


def update64(tensors: dict[str, torch.Tensor], name: str, scale: float) -> torch.Tensor:
    """The paper's update s (P diag(lam) Q - P0 diag(lam0) Q0) in float64, from a file's tensors."""
    return scale * update_f64({k: tensors[f"{name}.{k}"] for k in ("p", "lam", "q", "p0", "lam0", "q0")})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    valid = valid_file(root / "valid.safetensors")
    reference = file_tensors(valid)
    cases = build(valid.read_bytes())
    paths = []
    for i, case in enumerate(cases):
        path = root / f"case{i:03d}.safetensors"
        path.write_bytes(case.data)
        paths.append(path)
    return root, reference, cases, paths


def test_corpus_is_large_and_deterministic(corpus, tmp_path):
    root, _, cases, _ = corpus
    assert len(cases) >= 300
    again = build((root / "valid.safetensors").read_bytes())
    # The bytes are equal up to the order of safetensors' metadata map (a hash map in its writer).
    assert [(c.name, len(c.data), c.must_fail) for c in again] == [(c.name, len(c.data), c.must_fail) for c in cases]
    kinds = {c.name.split(" ")[0] for c in cases}
    assert {"truncated", "header", "data", "metadata", "config.rank", "reference", "lycoris"} <= kinds


def test_every_reader_loads_exactly_or_refuses_clearly(corpus, tmp_path):
    root, reference, cases, paths = corpus
    model = FuzzModel()
    before = snapshot(model)
    valid_config = tlora.read(root / "valid.safetensors")[1]["config"]
    failures = []
    for case, path in zip(cases, paths):
        for reader in READERS:
            label = f"{case.name} [{reader}]"
            box = call_with_timeout(run_reader, reader, path, model, tmp_path)
            error = box.get("error")
            if reader == "info" and error is None:
                rc, err = box["result"]
                if rc != 0:
                    error = err  # the CLI's message; it must name the file
                    if path.name not in err or "Traceback" in err or not err.startswith("tlora info: error:"):
                        failures.append(f"{label}: unclear CLI message {err!r}")
            foreign_to_tlora_reader = case.kind == "foreign" and reader in ("read", "info", "export")
            must_fail = True if foreign_to_tlora_reader else case.must_fail
            if error is not None:
                if isinstance(error, BaseException) and not (
                    isinstance(error, tlora.TloraError) and path.name in str(error)
                ):
                    failures.append(f"{label}: {type(error).__name__}: {error}"[:300])
                elif must_fail is False:
                    failures.append(f"{label}: refused a file that must load: {error}"[:300])
            else:
                if must_fail:
                    failures.append(f"{label}: accepted a file that must be refused")
                else:
                    _check_exact(case, reader, box, path, reference, valid_config, failures, label)
            adapter = adapter_of(model)
            if adapter is not None:
                adapter.remove()
            assert_untouched(model, before, label)
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:40])


def _check_exact(case, reader, box, path, reference, valid_config, failures, label):
    """A successful read gives exactly the valid file's content (or, for a converted dtype, the
    file's own values as float32, with a warning)."""
    expected = file_tensors(path) if case.must_fail is False and case.kind == "tlora" else reference
    converted = any(w.endswith("converted to float32") for w in box.get("warnings", []))
    if case.must_fail is False and case.kind == "tlora" and not converted:
        failures.append(f"{label}: a converted dtype loaded without a warning")
    result = box["result"]
    if reader in ("load", "import"):
        got = {k: v.detach() for k, v in result.state_dict().items()}
        if case.kind == "tlora" and result.config.to_dict() != valid_config:
            failures.append(f"{label}: loaded settings differ from the valid file's")
    elif reader == "read":
        got, meta = result
        if meta["config"] != valid_config:
            failures.append(f"{label}: read settings differ from the valid file's")
    elif reader == "export":
        from safetensors.torch import load_file

        lora = load_file(str(result.path))
        for name in {k.rsplit(".", 1)[0] for k in expected}:
            ba = lora[f"transformer.{name}.lora_B.weight"].double() @ lora[f"transformer.{name}.lora_A.weight"].double()
            want = update64(expected, name, 0.5)
            if not torch.allclose(ba, want, rtol=1e-5, atol=1e-6):
                failures.append(f"{label}: exported update differs from the file's")
        return
    else:  # info: rc 0 is all it reports
        return
    if got.keys() != expected.keys() or not all(torch.equal(got[k].cpu().float(), expected[k]) for k in got):
        failures.append(f"{label}: loaded tensors differ from the file's")


# ---- resume state: corrupted training checkpoints ---------------------------------------------
# tests/fuzz_corpus.py `resume_cases`: each edits a copy of a finished 2-step run in one place;
# `tlora train --resume` must refuse it (exit 2, one line naming the edited file, no "last good
# checkpoint" for it) and leave the run folder and the model folder exactly as they were.


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from tlora.testing.fuzz_corpus import train_finished_run

    return train_finished_run(tmp_path_factory.mktemp("resume-fuzz"))


def test_resume_corpus_is_large_and_deterministic(finished_run):
    from tlora.testing.fuzz_corpus import resume_cases

    run = finished_run[2]
    cases = resume_cases(run)
    assert len(cases) >= 150
    assert [c.name for c in resume_cases(run)] == [c.name for c in cases]
    assert {c.file for c in cases} == {
        "checkpoint-2/state.safetensors",
        "checkpoint-2/state.json",
        "checkpoint-2/adapter.safetensors",
        "config.json",
        "loss.jsonl",
    }


def test_every_corrupted_checkpoint_is_refused_clearly(finished_run, tmp_path):
    """Each case's outcome is judged by fuzz_corpus.resume_outcome (as benches/badinput.py counts
    them): a case that must resume trains on ("ok"), every other one is a "clear" refusal."""
    import shutil

    from tlora.testing.fuzz_corpus import (
        folder_bytes,
        prepare_resume,
        resume_args,
        resume_cases,
        resume_outcome,
        run_cli,
    )

    model, image, run = finished_run
    model_before = folder_bytes(model)
    failures = []
    for i, case in enumerate(resume_cases(run)):
        out = tmp_path / f"run{i:03d}"
        before = prepare_resume(case, run, out)
        box = call_with_timeout(run_cli, resume_args(model, image, out))
        outcome, problem = resume_outcome(case, out, box, before)
        if outcome != ("clear" if case.must_fail else "ok"):
            failures.append(f"{case.name} ({case.file}): {outcome}: {problem}"[:300])
        shutil.rmtree(out)
    assert folder_bytes(model) == model_before
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:40])


def test_cli_resume_from_a_corrupted_checkpoint_exits_2_in_a_subprocess(finished_run, tmp_path):
    from tlora.testing.fuzz_corpus import folder_bytes, prepare_resume, resume_args, resume_cases

    model, image, run = finished_run
    case = next(c for c in resume_cases(run) if c.name == "state.0.exp_avg_sq holds nan")
    out = tmp_path / "run"
    before = prepare_resume(case, run, out)
    proc = subprocess.run(
        [sys.executable, "-m", "tlora.cli", *resume_args(model, image, out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"),
    )
    message = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    state = out / "checkpoint-2" / "state.safetensors"
    assert message.startswith(f"tlora train: error: {state}: state.0.exp_avg_sq: holds 1 non-finite value"), message
    assert f"{out / 'checkpoint-1'} validates" in message and "--overwrite" in message, message
    assert folder_bytes(out) == before


def test_non_regular_files_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    model = FuzzModel()
    before = snapshot(model)
    for path, fragment in ((fifo, "named pipe"), (Path("/dev/zero"), "character device"), (folder, "is a folder")):
        for reader in READERS:
            box = call_with_timeout(run_reader, reader, path, model, tmp_path)
            error = box.get("error")
            if reader == "info":
                assert error is None and box["result"][0] == 2 and fragment in box["result"][1], box
            else:
                assert (
                    isinstance(error, tlora.AdapterFileError) and fragment in str(error) and str(path) in str(error)
                ), error
            assert_untouched(model, before, f"{path} [{reader}]")


def test_cli_info_on_a_fifo_exits_2_in_a_subprocess(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    proc = subprocess.run(
        [sys.executable, "-m", "tlora.cli", "info", str(fifo)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 2 and "named pipe (FIFO)" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# ---- files that validate but cannot run ----------------------------------------------------------


def resigned(path: Path, out: Path, change) -> Path:
    """`path`'s tensors with its description edited by `change(meta)` and the checksum recomputed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["tlora"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(meta)
    meta["checksum"] = checksum(tensors, meta)
    save_file(tensors, str(out), metadata={"tlora": json.dumps(meta)})
    return out


def refused_by_every_reader(path: Path, model, tmp_path: Path, field: str, fragment: str) -> None:
    for reader in READERS:
        box = call_with_timeout(run_reader, reader, path, model, tmp_path)
        if reader == "info":
            rc, err = box["result"]
            assert rc == 2 and str(path) in err and fragment in err and "Traceback" not in err, err
            continue
        e = box.get("error")
        assert isinstance(e, tlora.AdapterFileError) and e.path == str(path) and e.field == field, (reader, e)
        assert fragment in str(e), (reader, e)
        assert adapter_of(model) is None


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("num_train_timesteps", 1, "num_train_timesteps must be an integer >= 2"),
        ("target_modules", "(", "target_modules '(' is not a valid regular expression"),
    ],
)
def test_a_signed_file_with_settings_that_cannot_run_is_refused(key, value, fragment, tmp_path):
    """One rule for inject and for every reader (tlora.config), behind a valid checksum."""
    valid = valid_file(tmp_path / "valid.safetensors")
    bad = resigned(valid, tmp_path / "bad.safetensors", lambda m: m["config"].update({key: value}))
    assert tlora.read(valid)  # the same file as written is fine
    refused_by_every_reader(bad, FuzzModel(), tmp_path, "config", fragment)
    with pytest.raises(tlora.ConfigError, match=re.escape(fragment)):
        tlora.inject(FuzzModel(), rank=4, **{key: value})
    # T = 2 is the least that leaves r(t) something to vary over: it loads and runs.
    model = FuzzModel()
    adapter = tlora.inject(model, rank=4, min_rank=1, num_train_timesteps=2, target_modules=["to_q"])
    assert adapter.ranks_for(0) == [4] and adapter.ranks_for(1) == [2]


@pytest.mark.parametrize("kind,label", [("sd", "FluxTransformer2DModel"), ("flux", "UNet2DConditionModel")])
def test_a_base_model_whose_modules_these_are_not_is_refused(kind, label, tmp_path):
    """A file labelled FLUX on UNet modules (or the reverse) would export `transformer.down_blocks...`
    keys that no pipeline finds; the reader checks the label against the class's submodules."""
    from tlora.testing.tiny import tiny_denoiser

    model = tiny_denoiser(kind)
    tlora.inject(model, rank=2, target_modules=["to_q"])
    good = tlora.save(model, tmp_path / "good.safetensors")
    tlora.remove(model)
    assert tlora.read(good)[1]["base_model"] != label
    tlora.load(model, good).remove()  # no false refusal of the real class
    bad = resigned(good, tmp_path / "relabelled.safetensors", lambda m: m.update(base_model=label))
    refused_by_every_reader(bad, model, tmp_path, "base_model", f"{label!r} has no submodule")


def test_modules_only_some_configs_have_are_not_refused(tmp_path):
    """SD-XL's add_embedding (a UNet2DConditionModel with addition_embed_type="text_time", absent
    from the class's default config) and PEFT-wrapped names pass the base_model check."""
    from tlora.testing.tiny import tiny_denoiser

    model = tiny_denoiser("sdxl")
    tlora.inject(model, rank=2, target_modules=r"(add_embedding\.linear_1|.*attn1\.to_q)")
    path = tlora.save(model, tmp_path / "sdxl.safetensors")
    tlora.remove(model)
    assert any(n.startswith("add_embedding") for n in tlora.read(path)[1]["modules"])
    tlora.load(model, path)
    assert run_cli(["info", str(path)])[0] == 0


def test_integers_too_long_for_python_name_the_file_and_field(tmp_path):
    """Python refuses int() of over 4300 digits with a ValueError that names nothing."""
    valid = valid_file(tmp_path / "valid.safetensors")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(valid), "pt") as f:
        meta, tensors = json.loads(f.metadata()["tlora"]), {k: f.get_tensor(k) for k in f.keys()}
    meta["config"]["seed"] = "HUGE"
    bad = tmp_path / "huge.safetensors"
    save_file(tensors, str(bad), metadata={"tlora": json.dumps(meta).replace('"HUGE"', "7" * 5000)})
    refused_by_every_reader(bad, FuzzModel(), tmp_path, "config.seed", "an integer of 5000 digits")


# ---- where the factors go ------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cuda:7", "nonsense", "meta", "mps"])
def test_load_refuses_a_device_before_reading_the_file(device, tmp_path, monkeypatch):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    valid = valid_file(tmp_path / "valid.safetensors")
    read = []
    monkeypatch.setattr(tlora.files.io, "read_raw", lambda *a: read.append(a))
    model = FuzzModel()
    before = snapshot(model)
    with pytest.raises(tlora.InputError, match=rf"cannot load {re.escape(str(valid))} onto device '{device}'"):
        tlora.load(model, valid, device=device)
    assert read == []  # refused before the file was opened
    assert_untouched(model, before, device)
