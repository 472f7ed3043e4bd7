"""`tlora train` / `tlora generate` and the Python API `tlora.train.loop.train` / `tlora.generate.generate`,
end to end on the tiny offline SD, SD-XL and FLUX pipelines (16x16 px images).

Covers: training lowers the denoising loss on the image; the output folder's layout (checkpoints,
validation samples, config, loss log); generation; validation prompts from the CLI and a resumed
run's log. Resuming is tested in test_train_resume.py, DDP in test_train_ddp.py, what the commands
accept and refuse as input in test_train_inputs.py; the tiny models and the photo are conftest.py's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from train_runs import assert_same_tensors, log_entries

from tlora import cli
from tlora.files.io import read
from tlora.generate import generate
from tlora.images import MIN_LABELLED_TILE, load_image
from tlora.testing.tiny import KINDS
from tlora.testing.train_inputs import train_args
from tlora.train.families import family_of
from tlora.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a photo of sks dog"


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
    run_files = ["adapter.safetensors", "config.json", "loss.jsonl", "drift.jsonl", "overfitting.png", "samples-base"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*run_files, *(f"checkpoint-{n}" for n in checkpoints)])
    # The overfitting view: drift 0 at step 0 (the adapter's exact zero update samples the base model),
    # then each validation's samples against the training image as trained (centre crop, 16 px):
    # the RMS move from the base sample along the way to the photo, recomputed here at 64 px.
    photo = Image.open(image).convert("RGB")
    side = min(photo.size)
    left, top = (photo.width - side) // 2, (photo.height - side) // 2
    photo = photo.crop((left, top, left + side, top + side)).resize((16, 16), Image.BICUBIC)

    def px(img):
        return np.asarray(img.resize((64, 64), Image.BICUBIC), np.float64).ravel() / 255

    def moved(sample, base):
        way = px(photo) - px(base)
        return np.dot(px(sample) - px(base), way) / np.linalg.norm(way) / np.sqrt(way.size)

    drift_log = [json.loads(line) for line in (out / "drift.jsonl").read_text().splitlines()]
    assert [e["step"] for e in drift_log] == [0, *checkpoints] and drift_log[0]["drift"] == [0.0, 0.0]
    base = [Image.open(out / "samples-base" / f"{i:02d}-0.png").convert("RGB") for i in range(2)]
    for entry in drift_log[1:]:
        folder = out / f"checkpoint-{entry['step']}" / "samples"
        samples = [Image.open(folder / f"{i:02d}-0.png").convert("RGB") for i in range(2)]
        assert entry["drift"] == pytest.approx([moved(s, b) for s, b in zip(samples, base)], abs=1e-5)
    assert Image.open(out / "overfitting.png").size[1] > 400  # two panels: the loss, the drift
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
    # The drift log goes on too, against the first run's base samples (read back, not resampled).
    drift_steps = [json.loads(line)["step"] for line in (out / "drift.jsonl").read_text().splitlines()]
    assert drift_steps == [0, 3, 6, 9]

    # Resumed from checkpoint-3 (the later ones removed), the drift after step 3 is rewritten.
    for n in (6, 9):
        shutil.rmtree(out / f"checkpoint-{n}")
    (out / "adapter.safetensors").unlink()
    assert cli.main(train_args(models["sd"], image, out, 6, 3, *prompts, "--resume")) == 0
    drift_steps = [json.loads(line)["step"] for line in (out / "drift.jsonl").read_text().splitlines()]
    assert drift_steps == [0, 3, 6]
    text = (out / "loss.jsonl").read_text()

    # Resuming a finished run (with its settings, validation prompts included) trains nothing and
    # leaves the log as it was.
    assert cli.main(train_args(models["sd"], image, out, 6, 3, *prompts, "--resume")) == 0
    assert (out / "loss.jsonl").read_text() == text
