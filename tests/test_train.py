"""`tlora train` / `tlora generate` and the Python API `tlora.train.train` / `tlora.generate.generate`,
end to end on the tiny offline SD, SD-XL and FLUX pipelines (16x16 px images).

Covers: training lowers the denoising loss on the image; the output folder's layout (checkpoints,
validation samples, config, loss log); generation; resuming (after a SIGKILL, after a full disk)
equals an uninterrupted run bit for bit; bad input fails with a clear message and writes nothing;
DDP (2 gloo CPU processes) trains one adapter and writes every file once.

Everything runs with one intra-op thread, in this process and in the subprocesses: results are then
bitwise reproducible across processes (the resume tests compare a killed subprocess's checkpoint
with in-process runs), and the tiny models step in milliseconds even when other work shares the CPUs.
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

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

try:
    from tlora.tiny import save_tiny_pipeline
except ImportError:
    from tiny_models import save_tiny_pipeline

from train_inputs import (  # tests/train_inputs.py, shared with benches/badinput.py
    break_model_index,
    disc,
    drop_checkpoint_state,
    nan_on_call,
    optimizer_lrs,
    set_flag,
    train_args,
    write_array,
    write_bomb,
    write_photo,
)

import tlora.checkpoint
from tlora import cli
from tlora.config import MAX_RANK
from tlora.errors import ConfigError
from tlora.generate import generate
from tlora.images import MIN_LABELLED_TILE, load_image, load_mask
from tlora.io import read
from tlora.pipelines import family_of
from tlora.train import TrainConfig, train

KINDS = ("sd", "sdxl", "flux")
PROMPT = "a photo of sks dog"
# Settings of the resume tests' shared uninterrupted reference run.
RESUME_STEPS, RESUME_EVERY = 12, 4


# ---- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """The three tiny diffusers folders, built once."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: save_tiny_pipeline(kind, root / kind) for kind in KINDS}


@pytest.fixture(scope="session")
def image(tmp_path_factory) -> Path:
    """A 16x16 RGB photo: a yellow disc on a colour gradient."""
    return write_photo(tmp_path_factory.mktemp("images") / "dog.png")


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


@torch.no_grad()
def denoising_loss(pipe, image: Path, n: int = 64) -> float:
    """The training objective on fixed draws: n evenly spaced timesteps, seeded latents and noise."""
    fam = family_of(pipe)
    mean, std = fam.encode_image(load_image(image, 16))
    cond = fam.encode_prompt(PROMPT, 16)
    g = torch.Generator().manual_seed(1234)
    total = 0.0
    for i in range(n):
        t = torch.tensor([int((i + 0.5) * fam.num_train_timesteps / n)])
        latents = mean + std * torch.randn(mean.shape, generator=g)
        noised = fam.noise(latents, torch.randn(mean.shape, generator=g), t)
        total += F.mse_loss(fam.predict(fam.denoiser, noised, cond), noised.target).item()
    return total / n


# ---- training and generation, per model family ------------------------------------------------

# Steps at lr 3e-2 and rank 4 for a clear fall of the denoising loss (about 14%, 6% and 10%): the
# tiny SD-XL UNet has few attention layers to adapt, and FLUX's target (noise - latents) keeps the
# tiny VAE's large latent variance, so their losses fall more slowly.
STEPS = {"sd": 60, "sdxl": 120, "flux": 120}


@pytest.mark.parametrize("kind", KINDS)
def test_train_then_generate(kind, models, image, tmp_path, capsys):
    out = tmp_path / "run"
    steps = STEPS[kind]
    every = steps // 3
    result = train(
        model=str(models[kind]),
        image=str(image),
        token="sks",
        class_name="dog",
        out=str(out),
        resolution=16,
        rank=4,
        lr=3e-2,
        steps=steps,
        checkpoint_every=every,
        seed=0,
        validation_prompts=["a {} on a beach", "a {} in the snow"],
        validation_steps=2,
    )

    # The adapter learned the image: the denoising loss on fixed draws falls against the base model.
    after = denoising_loss(result.pipe, image)
    result.adapter.remove()
    before = denoising_loss(result.pipe, image)
    assert after < 0.96 * before, f"{kind}: denoising loss {before:.4f} -> {after:.4f}"

    # Output folder layout. Grids enlarge 16 px samples (NEAREST) to fit their labels.
    big = -(-MIN_LABELLED_TILE // 16) * 16
    enlarged = lambda f: np.asarray(Image.open(f).resize((big, big), Image.NEAREST))  # noqa: E731
    assert result.adapter_path == out / "adapter.safetensors" and result.adapter_path.is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["steps"] == steps and cfg["resolution"] == 16 and cfg["adapter"]["rank"] == 4
    log = log_entries(out)
    assert [e["step"] for e in log] == list(range(1, steps + 1))
    assert all(np.isfinite(e["loss"]) for e in log)
    checkpoints = [every, 2 * every, steps]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["adapter.safetensors", "config.json", "loss.jsonl", *(f"checkpoint-{n}" for n in checkpoints)]
    )
    for n in checkpoints:
        ckpt = out / f"checkpoint-{n}"
        assert {p.name for p in ckpt.iterdir()} == {"adapter.safetensors", "state.safetensors", "state.json", "samples"}
        assert json.loads((ckpt / "state.json").read_text())["step"] == n
        samples = ckpt / "samples"
        assert sorted(p.name for p in samples.iterdir()) == ["00-0.png", "01-0.png", "grid.png"]
        assert Image.open(samples / "00-0.png").size == (16, 16)
        g = np.asarray(Image.open(samples / "grid.png"))  # one row per prompt, labelled: the last sample bottom-right
        assert g.shape[0] > 2 * big and g.shape[1] > big and (g[-big:, -big:] == enlarged(samples / "01-0.png")).all()
    assert_same_tensors(out / f"checkpoint-{steps}" / "adapter.safetensors", out / "adapter.safetensors")
    tensors, meta = read(out / "adapter.safetensors")
    assert meta["config"]["extra"]["token"] == "sks" and meta["config"]["extra"]["family"] == kind
    trained = {k: v.detach() for k, v in result.adapter.state_dict().items()}
    assert tensors.keys() == trained.keys() and all(torch.equal(tensors[k], trained[k]) for k in tensors)

    # `tlora generate`: n PNGs per prompt and a grid.
    gen_out = tmp_path / "samples"
    rc = cli.main(
        [
            "generate",
            "--model",
            str(models[kind]),
            "--adapter",
            str(out / "adapter.safetensors"),
            "--prompt",
            "a {} on a beach",
            "--prompt",
            "a {} in the snow",
            "-n",
            "2",
            "--steps",
            "2",
            "--height",
            "16",
            "--width",
            "16",
            "--out",
            str(gen_out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert "grid.png" in capsys.readouterr().out
    assert sorted(p.name for p in gen_out.iterdir()) == ["00-0.png", "00-1.png", "01-0.png", "01-1.png", "grid.png"]
    assert all(Image.open(gen_out / f"0{i}-{j}.png").size == (16, 16) for i in (0, 1) for j in (0, 1))
    g = np.asarray(Image.open(gen_out / "grid.png"))  # n=2 columns, 2 prompt rows, labelled
    assert g.shape[0] > 2 * big and g.shape[1] > 2 * big and (g[-big:, -big:] == enlarged(gen_out / "01-1.png")).all()

    # The Python API, with an earlier checkpoint's adapter: it is applied, so the image differs.
    grid = generate(
        str(models[kind]),
        str(out / f"checkpoint-{every}" / "adapter.safetensors"),
        ["a {} on a beach"],
        str(tmp_path / "early"),
        n=2,
        steps=2,
        height=16,
        width=16,
    )
    assert grid == tmp_path / "early" / "grid.png" and grid.is_file()
    early = np.asarray(Image.open(tmp_path / "early" / "00-0.png"), dtype=np.int16)
    final = np.asarray(Image.open(gen_out / "00-0.png"), dtype=np.int16)
    assert np.abs(early - final).max() > 0


def test_cli_train_validation_prompts_and_resume_continues_log(models, image, tmp_path, capsys):
    out = tmp_path / "run"
    prompts = ["--validation-prompts", "a {} on a beach#a {} in the snow"]
    assert cli.main(train_args(models["sd"], image, out, 6, 3, *prompts)) == 0
    assert f"adapter written to {out / 'adapter.safetensors'}" in capsys.readouterr().out
    first = (out / "loss.jsonl").read_text()
    assert [e["step"] for e in log_entries(out)] == [1, 2, 3, 4, 5, 6]
    for n in (3, 6):
        assert sorted(p.name for p in (out / f"checkpoint-{n}" / "samples").iterdir()) == [
            "00-0.png",
            "01-0.png",
            "grid.png",
        ]

    # Resume from checkpoint-6 to 9 steps: the log goes on at step 7, the first 6 lines untouched.
    assert cli.main(train_args(models["sd"], image, out, 9, 3, *prompts, "--resume")) == 0
    assert "resuming from" in capsys.readouterr().out
    text = (out / "loss.jsonl").read_text()
    assert text.startswith(first)
    assert [e["step"] for e in log_entries(out)] == list(range(1, 10))
    assert json.loads((out / "checkpoint-9" / "state.json").read_text())["step"] == 9

    # Resuming a finished run trains nothing and leaves the log as it was.
    assert cli.main(train_args(models["sd"], image, out, 9, 3, "--resume")) == 0
    assert (out / "loss.jsonl").read_text() == text


# ---- resuming equals an uninterrupted run -----------------------------------------------------


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
    import tlora.train
    from tlora.cli import main

    BLOCK_AT, MARKER = int(os.environ["TLORA_TEST_BLOCK_AT"]), os.environ["TLORA_TEST_MARKER"]
    _tqdm = tlora.train.tqdm

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

    tlora.train.tqdm = BlockingBar
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


# ---- bad input --------------------------------------------------------------------------------


def _tiny_image(folder: Path) -> Path:
    path = folder / "tiny.png"
    Image.new("RGB", (3, 3), "red").save(path)
    return path


def _text_as_png(folder: Path) -> Path:
    path = folder / "notes.png"
    path.write_text("this is not an image\n")
    return path


@pytest.mark.parametrize(
    "case",
    [
        "missing image",
        "unreadable image",
        "tiny image",
        "missing vae",
        "prompt without {}",
        "zero steps",
        "out under a file",
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(case, models, image, tmp_path, capsys):
    out = tmp_path / "run"
    model, img, extra = models["sd"], image, []
    if case == "missing image":
        img = tmp_path / "nope.png"
        fragments = [str(img), "does not exist"]
    elif case == "unreadable image":
        img = _text_as_png(tmp_path)
        fragments = [str(img), "cannot be read as an image"]
    elif case == "tiny image":
        img = _tiny_image(tmp_path)
        fragments = ["3x3", "at least 16 px"]
    elif case == "missing vae":
        model = tmp_path / "model"
        shutil.copytree(models["sd"], model)
        shutil.rmtree(model / "vae")
        fragments = ["missing component 'vae'"]
    elif case == "prompt without {}":
        extra = ["--validation-prompts", "a {} on a beach#a dog in the snow"]
        fragments = ["'a dog in the snow' has no {}"]
    elif case == "zero steps":
        fragments = ["argument --steps: must be an integer in 1..10000000, got 0"]
    else:  # the output folder's parent is a regular file
        blocker = tmp_path / "blocker"
        blocker.write_text("keep me")
        out = blocker / "run"
        fragments = [str(out), "not writable"]
    args = train_args(model, img, out, 1, 1, *extra)
    if case == "zero steps":
        args[args.index("--steps") + 1] = "0"

    rc = cli.main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]  # the last line, after any progress bars
    assert message.startswith("tlora train: error:"), err
    for fragment in fragments:
        assert fragment in message, message
    assert written_files(out) == []
    if case == "out under a file":
        assert (tmp_path / "blocker").read_text() == "keep me"


def _write_mode(folder: Path, mode: str) -> Path:
    y, x = np.mgrid[0:16, 0:16]
    path = folder / f"photo-{mode.replace(';', '')}.png"
    if mode == "L":
        img = Image.fromarray((x * 16).astype(np.uint8), "L")
    elif mode == "RGBA":
        a = np.zeros((16, 16, 4), np.uint8)
        a[..., 0], a[..., 3] = 200, (y * 16).astype(np.uint8)  # half-transparent red
        img = Image.fromarray(a, "RGBA")
    else:
        img = Image.fromarray((x * 4000 + y * 10).astype(np.uint16))
    img.save(path)
    assert Image.open(path).mode == mode
    return path


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_greyscale_rgba_and_16bit_images_are_accepted(mode, models, tmp_path, capsys):
    path = _write_mode(tmp_path, mode)
    pixels = load_image(path, 16)
    assert pixels.shape == (1, 3, 16, 16) and pixels.min() >= -1 and pixels.max() <= 1
    if mode in ("L", "I;16"):  # the left-to-right gradient survives conversion (16 bits rescaled, not clipped)
        assert bool((pixels[0].mean(dim=(0, 1)).diff() > 0).all())
    if mode == "I;16":  # rescaled to the full 8-bit range
        assert pixels.max() - pixels.min() > 1.9
    if mode == "RGBA":  # transparent pixels on white
        assert torch.allclose(pixels[0, :, 0, 0], torch.ones(3), atol=1 / 127.5)

    out = tmp_path / "run"
    rc = cli.main(train_args(models["sd"], path, out, 1, 1))
    assert rc == 0, capsys.readouterr().err
    assert [e["step"] for e in log_entries(out)] == [1]
    assert (out / "adapter.safetensors").is_file() and (out / "checkpoint-1" / "state.json").is_file()


# ---- DDP --------------------------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent("""
    import sys
    from accelerate import PartialState
    from safetensors.torch import save_file
    from tlora.train import train

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


# ---- issue 13: the CLI refuses what it cannot honour ------------------------------------------


def _cli(args: list[str], capsys) -> tuple[int, str]:
    rc = cli.main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err.strip().splitlines()[-1] if err.strip() else ""


@pytest.mark.parametrize(
    "flag,value,fragment",
    [
        ("--lr", "inf", "argument --lr: must be a finite number > 0"),
        ("--lr", "nan", "argument --lr: must be a finite number"),
        ("--lr", "0", "argument --lr: must be a finite number > 0"),
        ("--steps", "-3", "argument --steps: must be an integer in 1..10000000, got -3"),
        ("--resolution", "0", "argument --resolution: must be an integer in 8..4096, got 0"),
        ("--resolution", "20", "argument --resolution: 20 is not a multiple of 8"),
        ("--rank", "0", f"argument --rank: must be an integer in 1..{MAX_RANK}, got 0"),
        ("--seed", "-1", "argument --seed: must be an integer in 0..4294967295"),
        ("--checkpoint-every", "0", "argument --checkpoint-every: must be an integer >= 1"),
        ("--rank-exponent", "inf", "argument --rank-exponent: must be a finite number > 0"),
        ("--prior-weight", "nan", "argument --prior-weight: must be a finite number"),
    ],
)
def test_train_numeric_arguments_are_range_checked(flag, value, fragment, models, image, tmp_path, capsys):
    args = set_flag(train_args(models["sd"], image, tmp_path / "run", 1, 1), flag, value)
    rc, message = _cli(args, capsys)
    assert rc == 2 and fragment in message, message
    assert written_files(tmp_path / "run") == []


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["-n", "0"], "argument -n: must be an integer in 1..256, got 0"),
        (["-n", "-1"], "argument -n: must be an integer in 1..256, got -1"),
        (["--height", "100000"], "argument --height: must be an integer in 8..4096, got 100000"),
        (["--height", "0"], "argument --height: must be an integer in 8..4096, got 0"),
        (["--steps", "0"], "argument --steps: must be an integer in 1..1000, got 0"),
        (["--guidance", "nan"], "argument --guidance: must be a finite number >= 0 and <= 100, got nan"),
        (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    ],
)
def test_generate_numeric_arguments_are_range_checked(extra, fragment, models, tmp_path, capsys):
    rc, message = _cli(
        [
            "generate",
            "--model",
            str(models["sd"]),
            "--adapter",
            str(tmp_path / "a.safetensors"),
            "--prompt",
            "a {}",
            "--out",
            str(tmp_path / "out"),
            *extra,
        ],
        capsys,
    )
    assert rc == 2 and fragment in message, message


@pytest.mark.parametrize(
    "settings,fields,message",
    [
        ({"steps": 0}, ("steps",), "steps must be an integer in 1..10000000, got 0"),
        ({"lr": 2.0}, ("lr",), "lr must be a finite number > 0 and <= 1, got 2.0"),
        ({"resolution": 20}, ("resolution",), "resolution must be a multiple of 8 (the autoencoder's stride), got 20"),
        ({"validation_steps": 0}, ("validation_steps",), "validation_steps must be an integer in 1..1000, got 0"),
        (
            {"image": None},
            ("image", "image_dir"),
            "give exactly one of image (one photo, the paper's setting) or image_dir",
        ),
        ({"token": " "}, ("token", "class_name"), "token and class_name must not be empty"),
        ({"quantize": "fp8"}, ("quantize",), "quantize must be one of int8, int4, nf4, got 'fp8'"),
        ({"mixed_precision": "fp8"}, ("mixed_precision",), "mixed_precision must be one of no, fp16, bf16, got 'fp8'"),
    ],
)
def test_train_config_names_fields_not_flags(settings, fields, message, tmp_path):
    # The library speaks in field names (the CLI shows flags: test_cli_shows_flags_for_fields).
    base = dict(model="m", image="photo.png", token="sks", class_name="dog", out=str(tmp_path / "run"))
    with pytest.raises(ConfigError) as info:
        TrainConfig(**{**base, **settings})
    assert str(info.value) == message and info.value.fields == fields and info.value.field == fields[0]


def test_generate_names_fields_not_flags(tmp_path):
    for settings, field, message in [
        ({"n": 0}, "n", "n must be an integer in 1..256, got 0"),
        ({"steps": 0}, "steps", "steps must be an integer in 1..1000, got 0"),
        ({"guidance": -1.0}, "guidance", "guidance must be a finite number >= 0 and <= 100, got -1.0"),
        ({"width": 20}, "width", "width must be a multiple of 8 (the autoencoder's stride), got 20"),
    ]:
        with pytest.raises(ConfigError) as info:
            generate("m", str(tmp_path / "a.safetensors"), ["a {}"], str(tmp_path / "out"), **settings)
        assert str(info.value) == message and info.value.field == field


def test_cli_shows_flags_for_fields(models, image, tmp_path, capsys):
    # A library error about a field, through the CLI: the flag the user typed.
    args = set_flag(train_args(models["sd"], image, tmp_path / "run", 1, 1), "--token", " ")
    rc, message = _cli(args, capsys)
    assert rc == 2 and message == "tlora train: error: --token and --class-name must not be empty", message
    assert written_files(tmp_path / "run") == []


@pytest.fixture(scope="module")
def trained(models, image, tmp_path_factory) -> Path:
    """A finished 2-step run (checkpoints 1 and 2) to copy."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert cli.main(train_args(models["sd"], image, out, 2, 1)) == 0
    return out


def _copy_run(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without a GPU")
def test_device_and_half_precision_refused_clearly_on_the_cpu(models, image, trained, tmp_path, capsys):
    args = train_args(models["sd"], image, tmp_path / "run", 1, 1)
    rc, message = _cli([*args, "--mixed-precision", "fp16"], capsys)
    assert rc == 2 and "--mixed-precision fp16 needs a CUDA GPU" in message and "use bf16 or no" in message, message
    rc, message = _cli([*args, "--device", "cuda"], capsys)
    assert rc == 2 and "--device 'cuda' is not available" in message, message
    rc, message = _cli([*args, "--device", "tpu9"], capsys)
    assert rc == 2 and "--device 'tpu9' is unknown" in message, message
    gen = [
        "generate",
        "--model",
        str(models["sd"]),
        "--adapter",
        str(trained / "adapter.safetensors"),
        "--prompt",
        "a {}",
        "-n",
        "1",
        "--steps",
        "2",
        "--height",
        "16",
        "--width",
        "16",
        "--out",
        str(tmp_path / "g"),
    ]
    rc, message = _cli([*gen, "--dtype", "fp16"], capsys)
    assert rc == 2 and "--dtype fp16 needs a CUDA GPU" in message, message
    rc, message = _cli([*gen, "--device", "cuda:3"], capsys)
    assert rc == 2 and "--device 'cuda:3' is not available" in message, message
    assert written_files(tmp_path / "run") == [] and written_files(tmp_path / "g") == []
    # bf16 runs on the CPU: sampling and training.
    assert cli.main([*gen, "--dtype", "bf16"]) == 0
    assert cli.main([*args, "--mixed-precision", "bf16"]) == 0


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
    ],
)
def test_resume_refuses_settings_it_cannot_honour(flag, value, fragment, models, image, trained, tmp_path, capsys):
    out = _copy_run(trained, tmp_path)
    args = set_flag(train_args(models["sd"], image, out, 3, 1, "--resume"), flag, value)
    rc, message = _cli(args, capsys)
    assert rc == 2 and "--resume cannot continue the run" in message and fragment in message, message
    assert not (out / "checkpoint-3").exists()


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


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(models, image, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(tlora.train.F, "mse_loss", nan_on_call(F.mse_loss, 3))
    rc, message = _cli(train_args(models["sd"], image, out, 4, 2), capsys)
    monkeypatch.undo()
    assert rc == 2 and "the loss is nan at step 3" in message, message
    assert f"The last good checkpoint is {out / 'checkpoint-2'}" in message
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "adapter.safetensors").exists()
    read(out / "checkpoint-2" / "adapter.safetensors")  # intact and finite


@pytest.mark.parametrize(
    "side,fragment", [(9000, "more than the 67,108,864-pixel limit"), (14000, "decompression bomb")]
)
def test_decompression_bombs_are_refused(side, fragment, models, image, tmp_path, capsys):
    bomb = write_bomb(tmp_path / "bomb.png", side)
    rc, message = _cli(train_args(models["sd"], bomb, tmp_path / "run", 1, 1), capsys)
    assert rc == 2 and str(bomb) in message and fragment in message, message
    prior = tmp_path / "prior"
    prior.mkdir()
    write_bomb(prior / "a.png", side)
    rc, message = _cli(train_args(models["sd"], image, tmp_path / "run", 1, 1, "--prior-dir", str(prior)), capsys)
    assert rc == 2 and str(prior / "a.png") in message and fragment in message, message


def test_non_regular_inputs_are_refused(models, image, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    rc, message = _cli(train_args(models["sd"], folder, tmp_path / "run", 1, 1), capsys)
    assert (
        rc == 2 and f"image {folder} is a folder, not an image file (for a folder of photos use --image-dir)" in message
    )
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    rc, message = _cli(train_args(models["sd"], fifo, tmp_path / "run", 1, 1), capsys)
    assert rc == 2 and "is not a regular file" in message, message
    adapter_fifo = tmp_path / "a.safetensors"
    os.mkfifo(adapter_fifo)
    gen = ["generate", "--model", str(models["sd"]), "--prompt", "a {}", "--out", str(tmp_path / "g")]
    for adapter, fragment in ((adapter_fifo, "named pipe (FIFO)"), (Path("/dev/zero"), "character device")):
        rc, message = _cli([*gen, "--adapter", str(adapter)], capsys)
        assert rc == 2 and fragment in message, message


@pytest.mark.parametrize(
    "case,fragment",
    [
        ("index is a list", "must be a JSON object with _class_name and components, got a list"),
        (
            "class name is a list",
            "_class_name must be a pipeline class name (a string), got ['StableDiffusionPipeline']",
        ),
        ("sd labelled sdxl", "says StableDiffusionXLPipeline but lists no text_encoder_2, tokenizer_2"),
        ("index not json", "model_index.json is not valid JSON"),
    ],
)
def test_broken_model_index_is_refused_clearly(case, fragment, models, image, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(models["sd"], model)
    break_model_index(model, case)
    rc, message = _cli(train_args(model, image, tmp_path / "run", 1, 1), capsys)
    assert rc == 2 and fragment in message, message


# ---- issue 21: masks, float images, resume state ----------------------------------------------


def _photo64(folder: Path) -> Path:
    return write_array(folder / "photo64.png", np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "case",
    ["smaller mask", "wider mask", "transparent cut-out", "black mask", "subject outside the crop"],
)
def test_masks_that_cannot_mask_the_image_are_refused(case, models, tmp_path, capsys):
    image = _photo64(tmp_path)
    mask = tmp_path / "mask.png"
    if case == "smaller mask":  # was cropped out of alignment with the image
        write_array(mask, np.full((16, 32), 255, np.uint8))
        fragments = [f"mask {mask} is 32x16 but image {image} is 64x64", "of the image's size"]
    elif case == "wider mask":
        write_array(mask, np.full((64, 80), 255, np.uint8))
        fragments = [f"mask {mask} is 80x64 but image {image} is 64x64"]
    elif case == "transparent cut-out":  # was composited on white: "all subject"
        write_array(mask, np.zeros((64, 64, 4), np.uint8))
        fragments = [f"mask {mask} is transparent everywhere"]
    elif case == "black mask":
        write_array(mask, np.zeros((64, 64), np.uint8))
        fragments = [f"mask {mask} is empty", "white pixels"]
    else:  # a 64x32 photo whose subject is in its left quarter: the centre crop keeps none of it
        image = write_array(tmp_path / "wide.png", np.zeros((32, 64, 3), np.uint8))
        a = np.zeros((32, 64), np.uint8)
        a[:, :12] = 255
        write_array(mask, a)
        fragments = [f"mask {mask}: no subject pixel is left after centre-cropping", "nothing to train on"]
    out = tmp_path / "run"
    rc, message = _cli(train_args(models["sd"], image, out, 1, 1, "--mask", str(mask)), capsys)
    assert rc == 2 and message.startswith("tlora train: error:"), message
    for fragment in fragments:
        assert fragment in message, message
    assert written_files(out) == []


def test_cutout_mask_marks_its_opaque_pixels(models, tmp_path, capsys):
    """An RGBA cut-out's subject is its alpha (>= 128), whatever its colours; a fully opaque RGBA
    mask is read by its grey levels like any other."""
    subject = disc(16, 5)
    cutout = np.zeros((16, 16, 4), np.uint8)
    cutout[..., :3] = 255  # white everywhere: read as grey levels this was "all subject"
    cutout[..., 3] = np.where(subject, 255, 0)
    path = write_array(tmp_path / "cutout.png", cutout)
    expected = torch.from_numpy(subject.astype(np.float32))[None, None]
    assert torch.equal(load_mask(path, 16), expected)
    opaque = np.zeros((16, 16, 4), np.uint8)
    opaque[..., :3] = np.where(subject, 255, 0)[..., None]
    opaque[..., 3] = 255
    assert torch.equal(load_mask(write_array(tmp_path / "opaque.png", opaque), 16), expected)
    photo = write_photo(tmp_path / "dog.png")  # 16x16, the mask's size
    assert cli.main(train_args(models["sd"], photo, tmp_path / "run", 1, 1, "--mask", str(path))) == 0, (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_float_images_are_refused(bad, models, tmp_path, capsys):
    a = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    ok = write_array(tmp_path / "ok.tif", a, "F")
    assert load_image(ok, 16).shape == (1, 3, 16, 16)  # a finite float TIFF trains
    a = a.copy()
    a[3, 4] = bad
    if bad != bad:  # NaN: the whole image, as a float TIFF with missing data
        a[:] = bad
    tiff = write_array(tmp_path / "bad.tif", a, "F")
    out = tmp_path / "run"
    rc, message = _cli(train_args(models["sd"], tiff, out, 1, 1), capsys)
    count = 256 if bad != bad else 1
    assert rc == 2 and f"image {tiff} has {count} non-finite pixel value(s) (NaN or infinity)" in message, message
    assert written_files(out) == []


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
    monkeypatch.setattr(tlora.train.F, "mse_loss", nan_on_call(F.mse_loss, 1))  # the first step after resuming
    rc, message = _cli(train_args(models["sd"], image, out, 4, 1, "--resume"), capsys)
    monkeypatch.undo()
    assert rc == 2 and "the loss is nan at step 3" in message, message
    assert f"The last good checkpoint is {out / 'checkpoint-2'}" in message


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
