"""`tlora train`'s optimizer, schedule, EMA, batch, prompt, logging and run-file options on the tiny
SD pipeline, with the real packages (torch's AdamW, prodigyopt's Prodigy, bitsandbytes' 8-bit AdamW
on its CPU backend, tensorboard), each against an independent reference: diffusers' get_scheduler's
lr sequence, the EMA recurrence written out, per-sample losses computed one sample at a time, the
event file read back with tensorboard's own reader. Resuming each optimizer with its schedule and
EMA equals an uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_runs import assert_same_tensors, log_entries
from train_runs import cli_outcome as _cli

from tlora import cli
from tlora.testing.train_inputs import set_flag, train_args
from tlora.train.checkpoint import read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(models, image, out: Path, steps: int, every: int, *extra: str) -> Path:
    assert cli.main(train_args(models["sd"], image, out, steps, every, *extra)) == 0
    return out


OPTIMIZER_FLAGS = {
    "adamw": ["--adam-beta1", "0.8", "--adam-beta2", "0.99", "--adam-weight-decay", "0.01", "--adam-epsilon", "1e-6"],
    "prodigy": ["--lr", "1", "--adam-weight-decay", "0.01", "--no-prodigy-safeguard-warmup"],
    "adamw8bit": ["--adam-beta1", "0.8", "--adam-weight-decay", "0.01"],
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZER_FLAGS))
def test_each_optimizer_trains_and_resumes_bit_exactly_with_schedule_and_ema(optimizer, models, image, tmp_path):
    flags = [
        "--optimizer",
        optimizer,
        *OPTIMIZER_FLAGS[optimizer],
        "--lr-scheduler",
        "cosine",
        "--lr-warmup-steps",
        "2",
        "--ema-decay",
        "0.9",
        "--max-grad-norm",
        "1.0",
    ]
    whole = _run(models, image, tmp_path / "whole", 6, 3, *flags)
    part = tmp_path / "part"
    _run(models, image, part, 6, 3, *flags)
    shutil.rmtree(part / "checkpoint-6")
    (part / "adapter.safetensors").unlink()
    _run(models, image, part, 6, 3, *flags, "--resume")
    for name in ("adapter.safetensors", "checkpoint-6/adapter.safetensors", "checkpoint-6/state.safetensors"):
        assert_same_tensors(part / name, whole / name)
    assert [e["loss"] for e in log_entries(part)] == [e["loss"] for e in log_entries(whole)]

    cp = read_checkpoint(whole / "checkpoint-6")
    assert cp.optimizer == optimizer and cp.ema is not None and cp.ema_step == 6
    assert cp.scheduler["last_epoch"] == 6
    group = cp.groups[0]
    if optimizer == "prodigy":
        # Prodigy counted its steps (not the first, at lr 0) and accumulates its step size estimate
        assert group["k"] >= 5 and group["d_numerator"] != 0 and group["safeguard_warmup"] is False
        assert set(cp.state[0]) == {"step", "exp_avg", "exp_avg_sq", "s", "p0"}
    else:
        assert group["betas"][0] == 0.8 and group["weight_decay"] == 0.01
    if optimizer == "adamw8bit":
        # the tiny adapter's factors are under bitsandbytes' min_8bit_size: float32 moments
        assert set(cp.state[0]) == {"step", "state1", "state2"}


def test_lr_schedule_is_diffusers_get_scheduler(models, image, tmp_path):
    from diffusers.optimization import get_scheduler

    out = _run(
        models, image, tmp_path / "run", 7, 7, "--lr-scheduler", "cosine_with_restarts", "--lr-warmup-steps", "2",
        "--lr-num-cycles", "2",
    )  # fmt: skip
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-2)
    sched = get_scheduler("cosine_with_restarts", opt, num_warmup_steps=2, num_training_steps=7, num_cycles=2)
    want = []
    for _ in range(7):
        want.append(opt.param_groups[0]["lr"])  # the lr of each step, before the schedule moves on
        opt.step()
        sched.step()
    assert [e["lr"] for e in log_entries(out)] == want and want[0] == 0.0


def test_gradient_clipping_bounds_the_step(models, image, tmp_path):
    # With epsilon 1 and no weight decay, AdamW's first step is lr * g / (|g| + 1) ~ lr * g for a
    # small g: after clipping to norm c, the factors move by about lr * c (lr 1: steps well above
    # the factors' float32 spacing).
    flags = ["--adam-epsilon", "1", "--adam-weight-decay", "0", "--lr", "1"]
    clipped = _run(models, image, tmp_path / "clipped", 1, 1, *flags, "--max-grad-norm", "1e-3")
    free = _run(models, image, tmp_path / "free", 1, 1, *flags)
    start = _run(models, image, tmp_path / "start", 1, 1, *flags, "--lr", "1e-30")  # the initial factors

    def moved(run: Path) -> float:
        a, b = load_file(str(run / "adapter.safetensors")), load_file(str(start / "adapter.safetensors"))
        return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))

    assert moved(clipped) == pytest.approx(1e-3, rel=1e-2)
    assert log_entries(clipped)[0]["grad_norm"] > 1e-2  # the norm before clipping is logged
    assert moved(free) > 10 * moved(clipped)


def test_ema_adapter_is_the_average_of_the_raw_factors(models, image, tmp_path):
    decay = 0.5
    out = _run(models, image, tmp_path / "run", 4, 1, "--ema-decay", str(decay))
    raw = [load_file(str(out / f"checkpoint-{n}" / "adapter.safetensors")) for n in range(1, 5)]
    # diffusers' EMAModel: the first step copies; then decay min(decay, (1 + k) / (10 + k)) at step k + 1
    shadow = dict(raw[0])
    for k, theta in enumerate(raw[1:], start=1):
        d = min(decay, (1 + k) / (10 + k))
        shadow = {n: d * shadow[n] + (1 - d) * theta[n] for n in theta}
    final = load_file(str(out / "adapter.safetensors"))
    trained = [n for n in final if not n.endswith("0")]
    for n in trained:
        torch.testing.assert_close(final[n], shadow[n], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(final[n], raw[-1][n]) for n in trained)  # not the raw factors
    assert read_checkpoint(out / "checkpoint-4").ema_step == 4


def test_each_sample_of_a_batch_gets_the_rank_of_its_own_timestep(models, image, tmp_path):
    from accelerate import Accelerator

    from tlora.train.loop import TrainConfig, _Run

    cfg = TrainConfig(
        model=str(models["sd"]), image=str(image), token="sks", class_name="dog", out=str(tmp_path / "r"),
        resolution=16, rank=4, min_rank=1, train_batch_size=3, device="cpu",
    )  # fmt: skip
    run = _Run(cfg, Accelerator(cpu=True), tmp_path, torch.float32)
    with torch.no_grad():  # factors away from their frozen copies, so that the update depends on the rank
        g = torch.Generator().manual_seed(5)
        for p in run.adapter.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    latents, eps, _, cond = run.draw(run.lat_mean, run.lat_std, run.image_prompts)
    t = torch.tensor([0, 500, 999])  # ranks 4, 2 and 1
    with torch.no_grad():
        batch = run.objective(latents, eps, t, cond)
        single = [run.objective(latents[i : i + 1], eps[i : i + 1], t[i : i + 1], run.cond) for i in range(3)]
        shared = run.objective(latents, eps, torch.full((3,), 0), cond)
        shared_single = sum(run.objective(latents[i : i + 1], eps[i : i + 1], t[:1], run.cond) for i in range(3)) / 3
    torch.testing.assert_close(batch, sum(single) / 3, rtol=1e-5, atol=0)
    torch.testing.assert_close(shared, shared_single, rtol=1e-5, atol=0)
    assert not torch.allclose(batch, shared, rtol=1e-3)  # the ranks matter here


def test_batches_and_accumulation_step_the_optimizer_once_per_step(models, image, tmp_path):
    out = _run(models, image, tmp_path / "run", 2, 2, "--train-batch-size", "3", "--gradient-accumulation-steps", "2")
    cp = read_checkpoint(out / "checkpoint-2")
    assert {int(s["step"]) for s in cp.state.values()} == {2} and len(log_entries(out)) == 2


def test_captions_instance_prompt_and_caption_dropout(models, image, tmp_path):
    from accelerate import Accelerator

    from tlora.train.loop import TrainConfig, _Run

    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(image, folder / "a.png")
    shutil.copy(image, folder / "b.png")
    (folder / "b.txt").write_text("a {token} {class} on the grass\n")
    cfg = TrainConfig(
        model=str(models["sd"]), image=None, image_dir=str(folder), token="sks", class_name="dog",
        out=str(tmp_path / "r"), resolution=16, rank=4, instance_prompt="{token} {class}, studio photo",
        caption_dropout=0.5, train_batch_size=64, device="cpu",
    )  # fmt: skip
    run = _Run(cfg, Accelerator(cpu=True), tmp_path, torch.float32)
    assert run.image_prompts == ["sks dog, studio photo", "a sks dog on the grass"]
    assert set(run.conds) == {"", "sks dog, studio photo", "a sks dog on the grass"}
    _, _, _, cond = run.draw(run.lat_mean, run.lat_std, run.image_prompts, cfg.caption_dropout)
    empty = run.conds[""]["encoder_hidden_states"]
    dropped = sum(bool(torch.equal(c[None], empty)) for c in cond["encoder_hidden_states"])
    assert 16 < dropped < 48  # about half of 64 (binomial: outside this range with p < 1e-4)


@pytest.mark.parametrize(
    "flag,value,fragment",
    [
        ("--optimizer", "sgd", "argument --optimizer: invalid choice: 'sgd'"),
        ("--adam-beta1", "1", "argument --adam-beta1: must be a finite number >= 0 and < 1, got 1"),
        ("--adam-beta2", "nan", "argument --adam-beta2: must be a finite number"),
        ("--adam-weight-decay", "-1", "argument --adam-weight-decay: must be a finite number >= 0 and <= 1"),
        ("--adam-epsilon", "0", "argument --adam-epsilon: must be a finite number > 0"),
        ("--prodigy-beta3", "2", "argument --prodigy-beta3: must be a finite number >= 0 and <= 1"),
        ("--max-grad-norm", "0", "argument --max-grad-norm: must be a finite number > 0"),
        ("--lr-scheduler", "step", "argument --lr-scheduler: invalid choice: 'step'"),
        ("--lr-warmup-steps", "-1", "argument --lr-warmup-steps: must be an integer in 0..10000000"),
        ("--lr-num-cycles", "0", "argument --lr-num-cycles: must be an integer in 1..10000000"),
        ("--lr-power", "inf", "argument --lr-power: must be a finite number > 0"),
        ("--ema-decay", "1.5", "argument --ema-decay: must be a finite number > 0 and <= 1"),
        ("--train-batch-size", "0", "argument --train-batch-size: must be an integer in 1..1024"),
        ("--gradient-accumulation-steps", "x", "argument --gradient-accumulation-steps: 'x' is not an integer"),
        ("--caption-dropout", "1.5", "argument --caption-dropout: must be a finite number >= 0 and <= 1"),
        ("--noise-offset", "-1", "argument --noise-offset: must be a finite number >= 0"),
        ("--snr-gamma", "0", "argument --snr-gamma: must be a finite number > 0"),
        ("--report-to", "comet", "argument --report-to: invalid choice: 'comet'"),
        ("--validation-every", "0", "argument --validation-every: must be an integer >= 1"),
        ("--checkpoints-total-limit", "0", "argument --checkpoints-total-limit: must be an integer >= 1"),
        ("--lora-alpha", "0", "argument --lora-alpha: must be a finite number > 0"),
        ("--init", "first", "argument --init: invalid choice: 'first'"),
        ("--method", "dora", "argument --method: invalid choice: 'dora'"),
        ("--instance-prompt", "a {tokn} dog", "--instance-prompt 'a {tokn} dog' has '{tokn}'"),
        ("--ema-decay", "1", "--ema-decay must be < 1"),
    ],
)
def test_bad_values_of_the_new_options_exit_2_naming_the_option(flag, value, fragment, models, image, tmp_path, capsys):
    args = set_flag(train_args(models["sd"], image, tmp_path / "run", 1, 1), flag, value)
    rc, message = _cli(args, capsys)
    assert rc == 2 and fragment in message, message
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_missing_packages_are_one_line_naming_the_install(models, image, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # as if not installed: import fails
    rc, message = _cli(train_args(models["sd"], image, tmp_path / "p", 1, 1, "--optimizer", "prodigy"), capsys)
    assert rc == 2 and "--optimizer 'prodigy' needs the prodigyopt package: pip install prodigyopt" in message
    if __import__("importlib").util.find_spec("wandb") is None:
        rc, message = _cli(train_args(models["sd"], image, tmp_path / "w", 1, 1, "--report-to", "wandb"), capsys)
        assert rc == 2 and message.endswith("--report-to wandb needs the wandb package: pip install wandb"), message


def test_tensorboard_gets_loss_lr_grad_norm_and_the_validation_grid(models, image, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = _run(
        models, image, tmp_path / "run", 3, 3, "--report-to", "tensorboard", "--validation-prompt", "a {} on a beach",
        "--validation-steps", "1", "--validation-every", "2",
    )  # fmt: skip
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = acc.Tags()
    assert {"loss", "lr", "grad_norm"} <= set(tags["scalars"]), tags
    logged = log_entries(out)
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([e["loss"] for e in logged], rel=1e-6)
    assert [e.step for e in acc.Images("validation")] == [2, 3]
    # validation every 2 steps, checkpoints every 3: step 2's samples beside the checkpoints
    assert (out / "samples" / "step-2" / "grid.png").exists() and (out / "checkpoint-3" / "samples").is_dir()


def test_config_file_with_command_line_overrides_and_the_resolved_settings(models, image, tmp_path, capsys):
    run_toml = tmp_path / "run.toml"
    run_toml.write_text(
        f'model = "{models["sd"]}"\nimage = "{image}"\ntoken = "sks"\nclass-name = "dog"\n'
        f'out = "{tmp_path / "run"}"\nresolution = 16\nrank = 4\nsteps = 5\ncheckpoint_every = 1\n'
        'optimizer = "adamw"\nlr-scheduler = "linear"\nvalidation_prompts = ["a {} on a beach", "a {} in snow"]\n'
        "prodigy-decouple = false\nvalidation-steps = 1\n"
    )
    assert cli.main(["train", "--config", str(run_toml), "--steps", "2", "--lr", "0.02"]) == 0
    train = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert (train["steps"], train["lr"], train["lr_scheduler"], train["prodigy_decouple"]) == (2, 0.02, "linear", False)
    assert train["validation_prompts"] == ["a {} on a beach", "a {} in snow"]
    run_toml.write_text(run_toml.read_text() + "learning-rate = 1\n")
    rc, message = _cli(["train", "--config", str(run_toml)], capsys)
    assert rc == 2 and "unknown option 'learning-rate'" in message, message


def test_old_spellings_still_work_with_a_note(models, image, tmp_path, capsys):
    args = train_args(models["sd"], image, tmp_path / "run", 1, 1, "--variant", "vanilla")
    args += ["--validation-prompts", "a {} on a beach#a {} in snow", "--validation-steps", "1"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "--variant vanilla is now --method vanilla" in err and "--validation-prompts is deprecated" in err
    train = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert train["variant"] == "vanilla" and train["validation_prompts"] == ["a {} on a beach", "a {} in snow"]


def test_checkpoints_total_limit_keeps_the_newest(models, image, tmp_path):
    out = _run(models, image, tmp_path / "run", 4, 1, "--checkpoints-total-limit", "2")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]


def test_generate_adapter_scale_negative_prompt_and_scheduler(models, trained, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from tlora.generate import generate, sample_images
    from tlora.pipelines import load_pipeline

    adapter = str(trained / "adapter.safetensors")
    common = dict(model=str(models["sd"]), adapter=adapter, prompts=["a {} on a beach"], n=1, steps=2, device="cpu")
    off = generate(**common, out=str(tmp_path / "off"), adapter_scale=0.0).parent / "00-0.png"
    base = sample_images(load_pipeline(str(models["sd"])), ["a sks dog on a beach"], 1, 2, 7.5, 0)[0][0]
    assert np.array_equal(np.asarray(Image.open(off)), np.asarray(base))  # scale 0: the base model
    plain = np.asarray(Image.open(generate(**common, out=str(tmp_path / "plain")).parent / "00-0.png"))
    neg = generate(**common, out=str(tmp_path / "neg"), negative_prompt="a cat", scheduler="euler")
    assert not np.array_equal(np.asarray(Image.open(neg.parent / "00-0.png")), plain)
    args = ["generate", "--model", str(models["sd"]), "--adapter", adapter, "--prompt", "a {}", "--out", str(tmp_path)]
    rc, message = _cli([*args, "--scheduler", "flow_euler"], capsys)
    assert rc == 2 and "--scheduler flow_euler does not fit StableDiffusionPipeline" in message, message
    rc, message = _cli([*args, "--adapter-scale", "-1"], capsys)
    assert rc == 2 and "argument --adapter-scale: must be a finite number >= 0" in message, message


def test_class_images_are_sampled_to_the_count_and_flips_double_the_images(models, image, tmp_path):
    from accelerate import Accelerator

    from tlora.train.loop import TrainConfig, _Run

    prior = tmp_path / "prior"
    prior.mkdir()
    shutil.copy(image, prior / "mine.png")
    cfg = TrainConfig(
        model=str(models["sd"]), image=str(image), token="sks", class_name="dog", out=str(tmp_path / "r"),
        resolution=16, rank=4, prior_dir=str(prior), num_class_images=3, random_flip=True, device="cpu",
        validation_steps=2,
    )  # fmt: skip
    run = _Run(cfg, Accelerator(cpu=True), tmp_path, torch.float32)
    assert sorted(p.name for p in prior.iterdir()) == ["class-00001.png", "class-00002.png", "mine.png"]
    assert run.prior[0].shape[0] == 3 and run.lat_mean.shape[0] == 2  # the photo and its mirror image
    from tlora.images import load_image

    mirrored = run.fam.encode_image(load_image(image, 16).flip(-1))[0]
    torch.testing.assert_close(run.lat_mean[1:], mirrored)


def _resign(state: Path, edit) -> None:
    """Rewrite a checkpoint's state.safetensors through `edit(tensors, strings)`, its checksum
    recomputed: a well-formed, signed file whose content is wrong."""
    from tlora.files.io import adapter_checksum, read_raw, write_tensors

    raw, strings = read_raw(state)
    tensors = dict(raw)
    edit(tensors, strings)
    strings["checksum"] = adapter_checksum(list(tensors.items()), strings)
    write_tensors(state, list(tensors.items()), strings)


def _nan_ema(tensors, strings):
    tensors["ema.0"] = torch.full_like(tensors["ema.0"], float("nan"))


def _ema_step_ahead(tensors, strings):
    strings["ema"] = json.dumps({"optimization_step": 99})


def _schedule_elsewhere(tensors, strings):
    strings["scheduler"] = json.dumps({**json.loads(strings["scheduler"]), "last_epoch": 7})


def _no_ema_tensor(tensors, strings):
    del tensors["ema.1"]


def _unknown_optimizer(tensors, strings):
    strings["optimizer"] = json.dumps({**json.loads(strings["optimizer"]), "kind": "lion"})


@pytest.mark.parametrize(
    "edit,fragment",
    [
        (_nan_ema, "ema.0: holds"),
        (_ema_step_ahead, "ema: ema.optimization_step must be an integer in 0..2, got 99"),
        (_schedule_elsewhere, "scheduler: last_epoch must be an integer in 2..2, got 7"),
        (_no_ema_tensor, "ema: holds"),
        (_unknown_optimizer, "optimizer.kind: must be one of adamw, prodigy, adamw8bit, got 'lion'"),
    ],
)
def test_resume_refuses_bad_schedule_ema_and_optimizer_state(edit, fragment, models, image, tmp_path, capsys):
    flags = ["--ema-decay", "0.9", "--lr-scheduler", "linear"]
    out = _run(models, image, tmp_path / "run", 2, 2, *flags)
    _resign(out / "checkpoint-2" / "state.safetensors", edit)
    rc, message = _cli(train_args(models["sd"], image, out, 4, 2, *flags, "--resume"), capsys)
    assert rc == 2 and fragment in message and "checkpoint-2/state.safetensors" in message, message


def test_resume_refuses_another_optimizer_or_a_missing_ema(models, image, trained, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    prodigy = train_args(models["sd"], image, out, 4, 2, "--optimizer", "prodigy", "--resume")
    ema = train_args(models["sd"], image, out, 4, 2, "--ema-decay", "0.9", "--resume")
    # the run's config.json says so first
    rc, message = _cli(prodigy, capsys)
    assert rc == 2 and "--optimizer was 'adamw', now 'prodigy'" in message, message
    rc, message = _cli(ema, capsys)
    assert rc == 2 and "--ema-decay was unset (the default), now 0.9" in message, message
    # without it, the checkpoint itself
    (out / "config.json").unlink()
    rc, message = _cli(prodigy, capsys)
    assert rc == 2 and "was trained with --optimizer adamw, this run asks for prodigy" in message, message
    rc, message = _cli(ema, capsys)
    assert rc == 2 and "has no EMA of the factors" in message, message


def test_resumed_tensorboard_steps_continue(models, image, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = _run(models, image, tmp_path / "run", 4, 2, "--report-to", "tensorboard")
    shutil.rmtree(out / "checkpoint-4")
    _run(models, image, out, 4, 2, "--report-to", "tensorboard", "--resume")
    steps = []
    for event in sorted((out / "logs").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(event), size_guidance={"scalars": 0}).Reload()
        if "loss" in acc.Tags()["scalars"]:  # (accelerate writes the run's settings in files of their own)
            steps.append([e.step for e in acc.Scalars("loss")])
    assert steps == [[1, 2, 3, 4], [3, 4]]


def test_min_snr_weights_and_noise_offset(models, image, tmp_path, capsys):
    from accelerate import Accelerator

    from tlora.train.loop import TrainConfig, _Run

    base = dict(
        model=str(models["sd"]), image=str(image), token="sks", class_name="dog", out=str(tmp_path / "r"),
        resolution=16, rank=4, device="cpu", train_batch_size=2,
    )  # fmt: skip
    run = _Run(TrainConfig(**base, snr_gamma=5.0), Accelerator(cpu=True), tmp_path, torch.float32)
    # min(SNR, gamma) / SNR with SNR = abar / (1 - abar), from the model's own noise schedule
    abar = run.fam._ddpm().alphas_cumprod.double()
    snr = abar / (1 - abar)
    assert run.snr_weights.double() == pytest.approx((snr.clamp(max=5.0) / snr).tolist(), rel=1e-5)
    offset = _Run(TrainConfig(**base, noise_offset=0.1), Accelerator(cpu=True), tmp_path, torch.float32)
    _, eps, _, _ = offset.draw(offset.lat_mean, offset.lat_std, offset.image_prompts)
    g = torch.Generator().manual_seed(0)  # the run's draws, by hand: image, noise, latents, timesteps, offset
    torch.randint(0, 1, (2,), generator=g)
    want = torch.randn(eps.shape, generator=g)
    torch.randn(eps.shape, generator=g)
    torch.randint(0, 1000, (2,), generator=g)
    want = want + 0.1 * torch.randn((*eps.shape[:2], 1, 1), generator=g)
    assert torch.equal(eps, want)
    rc, message = _cli(train_args(models["flux"], image, tmp_path / "f", 1, 1, "--snr-gamma", "5"), capsys)
    assert rc == 2 and "--snr-gamma weights DDPM-noised losses; flux trains a flow-matching objective" in message


def test_pretrained_vae_replaces_the_models(models, image, tmp_path, capsys):
    from diffusers import AutoencoderKL

    from tlora.pipelines import load_pipeline

    vae = AutoencoderKL.from_pretrained(str(models["sd"] / "vae"))
    with torch.no_grad():
        for p in vae.parameters():
            p.mul_(0.5)
    vae.save_pretrained(tmp_path / "vae")
    pipe = load_pipeline(str(models["sd"]), vae=str(tmp_path / "vae"))
    assert all(torch.equal(a, b) for a, b in zip(pipe.vae.state_dict().values(), vae.state_dict().values()))
    rc, message = _cli(train_args(models["sd"], image, tmp_path / "r", 1, 1, "--pretrained-vae", str(image)), capsys)
    assert rc == 2 and f"--pretrained-vae {image} is not an AutoencoderKL folder" in message, message
