"""Bad input, counted: run a corpus of bad inputs against the tlora on PYTHONPATH and classify
each outcome. Run it against two checkouts to compare them:

    PYTHONPATH=/path/to/checkout/python python benches/badinput.py [--quick]

Outcome classes:
  clear    refused with an error the CLI reports (a ValueError / OSError, exit 2) whose message
           names the file, option or field at fault
  unclear  refused with such an error, but the message does not name it (or a valid input refused)
  crash    an internal exception escaped (a traceback), or a Rust panic
  hang     no answer within the time limit (run in a subprocess with a memory cap)
  silent   accepted: a corrupted file loaded with altered values, a bad value used or ignored
  loss     two runs' work mixed or lost (also: a refused resume that changed the run folder)
  ok       a legitimate input handled correctly (corpus files that may load, and did, exactly)

Corpus: the adapter files of tests/fuzz_corpus.py through load, read, info, export and import;
non-regular files; API arguments; the corrupted training checkpoints of tests/fuzz_corpus.py
(`resume_cases`) through `tlora train --resume`, judged as tests/files/test_fuzz.py judges them; CLI
arguments, images, model folders and training faults on the tiny offline SD pipeline
(tests/train_inputs.py). --only runs one section (e.g. `--only resume` against an older checkout).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import torch  # noqa: E402

import tlora  # noqa: E402
from tlora.adapter.inject import adapter_of  # noqa: E402
from tlora.testing.fuzz_corpus import (  # noqa: E402
    READERS,
    FuzzModel,
    build,
    file_tensors,
    folder_bytes,
    prepare_resume,
    resume_args,
    resume_cases,
    resume_outcome,
    run_cli,
    run_in_thread,
    run_reader,
    train_finished_run,
    valid_file,
)
from tlora.testing.train_inputs import (  # noqa: E402
    break_model_index,
    drop_checkpoint_state,
    nan_on_call,
    optimizer_lrs,
    set_flag,
    train_args,
    write_bomb,
    write_photo,
)

CAUGHT = (ValueError, OSError)  # what the CLI reports as "error: ..." with exit 2


def refused(error: BaseException | str, names: list[str]) -> str:
    if isinstance(error, str):  # a CLI message
        return "clear" if any(n in error for n in names) else "unclear"
    if not isinstance(error, CAUGHT):
        return "crash"
    return "clear" if any(n in str(error) for n in names) else "unclear"


def cli_quiet(args: list[str]) -> tuple[int, str]:
    rc, err, out = run_cli(args)
    return rc, err + out


# ---- adapter files ----------------------------------------------------------------------------


def file_outcomes(root: Path) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    valid = valid_file(root / "valid.safetensors")
    reference = file_tensors(valid)
    cases = build(valid.read_bytes())
    model = FuzzModel()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for i, case in enumerate(cases):
        path = root / f"case{i:03d}.safetensors"
        path.write_bytes(case.data)
        for reader in READERS:
            must_fail = True if case.kind == "foreign" and reader in ("read", "info", "export") else case.must_fail
            counts[classify_file(reader, path, case, must_fail, model, reference, root)] += 1
            adapter = adapter_of(model)
            if adapter is not None:
                adapter.remove()
            if any(not torch.equal(v, base[k]) for k, v in model.state_dict().items()):
                counts["model changed"] += 1
                model.load_state_dict(base)
    return counts


def classify_file(reader, path, case, must_fail, model, reference, root) -> str:
    box = run_in_thread(run_reader, reader, path, model, root, timeout=30.0)
    if box.get("hang"):
        return "hang"
    if "error" in box:
        outcome = refused(box["error"], [path.name])
        return "unclear" if outcome == "clear" and must_fail is False else outcome
    result = box["result"]
    if reader == "info":
        rc, text = result
        if rc != 0:
            if "Traceback" in text:
                return "crash"
            return "unclear" if must_fail is False else refused(text, [path.name])
    if must_fail:
        return "silent"
    if reader == "info" or reader == "export":
        return "ok"
    expected = file_tensors(path) if case.must_fail is False and case.kind == "tlora" else reference
    got = result[0] if reader == "read" else {k: v.detach() for k, v in result.state_dict().items()}
    exact = got.keys() == expected.keys() and all(torch.equal(got[k].float(), expected[k]) for k in got)
    warned = any("converted" in w for w in box.get("warnings", []))
    if case.must_fail is False and case.kind == "tlora" and not warned:
        return "silent"  # another dtype converted without a word
    return "ok" if exact else "silent"


def special_file_outcomes(root: Path) -> collections.Counter:
    """FIFO, /dev/zero, a folder: in a subprocess (with a memory cap) because they can hang."""
    counts: collections.Counter = collections.Counter()
    fifo = root / "pipe.safetensors"
    if not fifo.exists():
        os.mkfifo(fifo)
    folder = root / "folder.safetensors"
    folder.mkdir(exist_ok=True)
    for path in (fifo, Path("/dev/zero"), folder):
        counts[cli_subprocess(["info", str(path)], [path.name, "pipe", "device", "folder"])] += 1
    return counts


def cli_subprocess(args: list[str], names: list[str], timeout: float = 150.0) -> str:
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30)); "
        "from tlora.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"),
        )
    except subprocess.TimeoutExpired:
        return "hang"
    if "Traceback" in proc.stderr or proc.returncode not in (0, 2):
        return "crash"
    if proc.returncode == 0:
        return "silent"
    return refused(proc.stderr.strip().splitlines()[-1], names)


# ---- API arguments ----------------------------------------------------------------------------


def api_outcomes(root: Path) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for kwargs, names in (
        (dict(rank=True), ["rank"]),
        (dict(lora_alpha=float("inf")), ["lora_alpha"]),
        (dict(rank_exponent=float("inf")), ["rank_exponent"]),
        (dict(timestep_scale=float("inf")), ["timestep_scale"]),
        (dict(seed="x"), ["seed"]),
        (dict(rank=4, min_rank=True), ["min_rank"]),
        (dict(num_train_timesteps=True), ["num_train"]),
    ):
        model = FuzzModel()
        try:
            tlora.inject(model, **{"rank": 4, **kwargs})
            counts["silent"] += 1
        except BaseException as e:  # noqa: BLE001
            counts[refused(e, names)] += 1
    # Loading into a model that has an adapter: the message must say so.
    path = valid_file(root / "api.safetensors")
    model = FuzzModel()
    tlora.inject(model, rank=4, target_modules=["to_q", "to_k"])
    try:
        tlora.load(model, path)
        counts["silent"] += 1
    except BaseException as e:  # noqa: BLE001
        counts[refused(e, ["already has a tlora adapter"])] += 1
    # Injecting twice: the advice must name a function that exists.
    try:
        tlora.inject(model, rank=2)
        counts["silent"] += 1
    except BaseException as e:  # noqa: BLE001
        good = "tlora.remove(model)" not in str(e) or hasattr(tlora, "remove")
        counts["clear" if isinstance(e, CAUGHT) and good else "unclear"] += 1
    # Saving NaN factors.
    adapter = adapter_of(model)
    with torch.no_grad():
        next(iter(adapter.parameters())).fill_(float("nan"))
    try:
        tlora.save(model, root / "nan.safetensors")
        counts["silent"] += 1
    except BaseException as e:  # noqa: BLE001
        counts[refused(e, ["non-finite", "nan", "NaN"])] += 1
    return counts


# ---- resume state ------------------------------------------------------------------------------


def resume_outcomes(root: Path, quick: bool, problems: list[str]) -> collections.Counter:
    """Each corrupted checkpoint through `tlora train --resume` of a finished 2-step run, classified
    by fuzz_corpus.resume_outcome (what tests/files/test_fuzz.py asserts); --quick: every 6th case of each
    edited file and those that must resume. What is wrong with each case that is not clear / ok goes to `problems`."""
    counts: collections.Counter = collections.Counter()
    torch.set_num_threads(1)
    model, image, run = train_finished_run(root)
    model_before = folder_bytes(model)
    cases = resume_cases(run)
    if quick:  # every 6th case of each edited file, and the ones that must resume
        by_file = [[c for c in cases if c.file == f] for f in dict.fromkeys(c.file for c in cases)]
        cases = [c for group in by_file for j, c in enumerate(group) if j % 6 == 0 or not c.must_fail]
    for i, case in enumerate(cases):
        out = root / f"resume{i:03d}"
        before = prepare_resume(case, run, out)
        box = run_in_thread(run_cli, resume_args(model, image, out), timeout=120)
        outcome, problem = resume_outcome(case, out, box, before)
        counts[outcome] += 1
        if problem:
            problems.append(f"{case.name} ({case.file}): {outcome}: {problem}"[:300])
        if not box.get("hang"):
            shutil.rmtree(out)
    if folder_bytes(model) != model_before:
        counts["model changed"] += 1
    return counts


# ---- CLI --------------------------------------------------------------------------------------


def cli_outcomes(root: Path) -> collections.Counter:
    from tlora.testing.tiny import save_tiny_pipeline

    counts: collections.Counter = collections.Counter()
    torch.set_num_threads(1)
    model = save_tiny_pipeline("sd", root / "sd")
    image = write_photo(root / "dog.png")

    def args_for(out, *extra, img=image, mdl=model, steps=2):
        return train_args(mdl, img, out, steps, 1, *extra)

    def expect_refusal(args, names):
        box = run_in_thread(cli_quiet, args, timeout=120)
        if box.get("hang"):
            return "hang"
        if "error" in box:
            e = box["error"]
            return "crash" if not isinstance(e, SystemExit) else ("clear" if e.code == 2 else "crash")
        rc, text = box["result"]
        if "Traceback" in text:
            return "crash"
        if rc == 0:
            return "silent"
        return refused(text.strip().splitlines()[-1] if text.strip() else "", names)

    n = iter(range(10_000))

    def out():
        return root / f"run{next(n)}"

    gen = ["generate", "--model", str(model), "--prompt", "a {}", "--out", str(root / "gen")]
    trained = out()
    assert cli_quiet(args_for(trained))[0] == 0
    adapter = str(trained / "adapter.safetensors")
    for extra, names in (
        (["-n", "0"], ["-n"]),
        (["-n", "-1"], ["-n"]),
        (["--steps", "0"], ["--steps"]),
        (["--guidance", "nan"], ["--guidance"]),
        (["--height", "0"], ["--height"]),
    ):
        counts[expect_refusal([*gen, "--adapter", adapter, "--height", "16", "--width", "16", *extra], names)] += 1
    # The ones that can hang or exhaust memory: in a subprocess.
    counts[cli_subprocess([*gen, "--adapter", adapter, "--height", "100000", "--steps", "1"], ["--height"])] += 1
    fifo = root / "a-pipe.safetensors"
    os.mkfifo(fifo)
    counts[cli_subprocess([*gen, "--adapter", str(fifo)], [fifo.name])] += 1
    for flag, value in (
        ("--lr", "inf"),
        ("--lr", "nan"),
        ("--resolution", "0"),
        ("--steps", "0"),
        ("--steps", "-3"),
        ("--mixed-precision", "fp16"),
    ):
        counts[expect_refusal(set_flag(args_for(out()), flag, value), [flag])] += 1
    # Images.
    bomb = write_bomb(root / "bomb.png", 14000)
    counts[expect_refusal(args_for(out(), img=bomb), ["bomb.png"])] += 1
    prior = root / "prior"
    prior.mkdir()
    shutil.copy(bomb, prior / "a.png")
    counts[expect_refusal(args_for(out(), "--prior-dir", str(prior)), ["a.png"])] += 1
    counts[expect_refusal(args_for(out(), img=prior), ["folder"])] += 1
    # Model folders.
    for case in ("index is a list", "class name is a list", "sd labelled sdxl"):
        bad = root / f"model-{case.replace(' ', '-')}"
        shutil.copytree(model, bad)
        break_model_index(bad, case)
        counts[expect_refusal(args_for(out(), mdl=bad), ["model_index.json", "_class_name"])] += 1
    # Resume faults.
    for drop in ("rng", "optimizer"):
        run = out()
        shutil.copytree(trained, run)
        drop_checkpoint_state(run / "checkpoint-2" / "state.safetensors", drop)
        counts[expect_refusal(args_for(run, "--resume", steps=3), ["state.safetensors"])] += 1
    for flag, value in (("--rank", "2"), ("--min-rank", "1")):
        run = out()
        shutil.copytree(trained, run)
        counts[expect_refusal(set_flag(args_for(run, "--resume", steps=3), flag, value), [flag])] += 1
    # A new lr on resume must be applied (or refused): check the optimizer state it saved.
    run = out()
    shutil.copytree(trained, run)
    args = args_for(run, "--resume", steps=3)
    args[args.index("--lr") + 1] = "1e-3"
    rc, _ = cli_quiet(args)
    lrs = optimizer_lrs(run / "checkpoint-3" / "state.safetensors")
    counts["clear" if rc == 0 and lrs == [1e-3] else "silent"] += 1
    # Another run in --out without --resume: refused, or its checkpoints mixed in (loss).
    run = out()
    shutil.copytree(trained, run)
    rc, _ = cli_quiet(args_for(run, steps=1))
    counts["loss" if rc == 0 and (run / "checkpoint-2").exists() else "clear" if rc == 2 else "silent"] += 1
    # A non-finite loss (the third loss computed is NaN): stop with an error, or write NaN (silent).
    import torch.nn.functional as F

    real = F.mse_loss
    F.mse_loss = nan_on_call(real, 3)
    try:
        counts[expect_refusal(args_for(out(), steps=4), ["loss", "nan"])] += 1
    finally:
        F.mse_loss = real
    # Two concurrent runs into one --out: a slow one in a subprocess, a second one meanwhile.
    run = out()
    slow = subprocess.Popen(
        [sys.executable, "-m", "tlora.cli", *args_for(run, steps=400)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    try:
        for _ in range(1200):
            if (run / "loss.jsonl").exists():
                break
            threading.Event().wait(0.1)
        rc, _ = cli_quiet(args_for(run, "--resume", steps=400))
    finally:
        slow_rc = slow.wait(timeout=600)
    counts["loss" if rc == 0 and slow_rc == 0 else "clear" if rc == 2 else "silent"] += 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a sixth of the resume cases, no CLI section")
    sections = {
        "files": "adapter files x 5 readers",
        "special": "non-regular files (info)",
        "api": "API arguments",
        "resume": "corrupted checkpoints (train --resume)",
        "cli": "CLI (args, images, folders, resume, faults)",
    }
    ap.add_argument("--only", choices=sections, help="run this section only")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    problems: list[str] = []
    run = {
        "files": file_outcomes,
        "special": special_file_outcomes,
        "api": api_outcomes,
        "resume": lambda root: resume_outcomes(root, args.quick, problems),
        "cli": cli_outcomes,
    }
    with tempfile.TemporaryDirectory() as tmp:
        groups = {}
        for key, name in sections.items():
            if (args.only or key) != key or (args.quick and key == "cli"):
                continue
            (Path(tmp) / key).mkdir()
            groups[name] = run[key](Path(tmp) / key)
    classes = ["clear", "unclear", "crash", "hang", "silent", "loss", "ok"]
    print(f"tlora from {Path(tlora.__file__).parent}")
    print("| group | " + " | ".join(classes) + " | total |")
    print("|---" * (len(classes) + 2) + "|")
    total: collections.Counter = collections.Counter()
    for name, c in groups.items():
        total.update(c)
        print(f"| {name} | " + " | ".join(str(c.get(k, 0)) for k in classes) + f" | {sum(c[k] for k in classes)} |")
    print("| all | " + " | ".join(str(total.get(k, 0)) for k in classes) + f" | {sum(total[k] for k in classes)} |")
    if total.get("model changed"):
        print(f"model changed by a failed load (or the model folder by a resume): {total['model changed']}")
    if problems:
        print(f"\nresume cases not clear / ok ({len(problems)}):")
        print("\n".join(problems))


if __name__ == "__main__":
    main()
