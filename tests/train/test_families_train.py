"""Every family tlora trains, end to end on its tiny offline pipeline (tlora.testing.tiny and
tiny_families: configs only, tokenizers from the `tokenizers` library), saved as a diffusers folder:
`tlora train --steps 3` (with a validation grid) then `tlora generate` through the CLI; `--resume`
continues bit for bit; the ranks every adapted layer uses at each training step equal the paper's
r(t) of the noise level that step drew; 20 steps lower the denoising loss on a fixed noise / timestep batch.
"""

from __future__ import annotations

import shutil

import pytest
import reference
import torch
import torch.nn.functional as F
from family_ranks import RankLog
from PIL import Image
from train_runs import assert_same_tensors, log_entries

from tlora import cli
from tlora.images import load_image
from tlora.testing.tiny import KINDS, save_tiny_pipeline
from tlora.testing.tiny_families import FAMILY_KINDS, save_tiny_family_pipeline, train_side
from tlora.testing.train_inputs import train_args
from tlora.train.families import family_of
from tlora.train.loop import TrainConfig, _Run, train

pytestmark = pytest.mark.usefixtures("one_thread")
ALL = (*KINDS, *FAMILY_KINDS)
# HiDream's pipeline renders at the area of its default size whatever the size asked (256 px here).
SAMPLED_SIDE = {"hidream": 256}
RANK, MIN_RANK = 4, 1


class _Folders(dict):
    """Each family's tiny pipeline saved as a diffusers folder, when a test first asks for it."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, kind):
        save = save_tiny_pipeline if kind in KINDS else save_tiny_family_pipeline
        self[kind] = save(kind, self.root / kind)
        return self[kind]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return _Folders(tmp_path_factory.mktemp("family-models"))


def _args(kind, folders, image, out, steps, every, *extra):
    side = str(train_side(kind))
    args = train_args(folders[kind], image, out, steps, every, "--min-rank", str(MIN_RANK), *extra)
    return [side if a == "16" and args[i - 1] == "--resolution" else a for i, a in enumerate(args)]


@pytest.mark.parametrize("kind", ALL)
def test_train_3_steps_then_generate_and_resume(kind, folders, image, tmp_path, capsys):
    out = tmp_path / "run"
    validation = ["--validation-prompts", "a {} on a beach", "--validation-steps", "1"]
    assert cli.main(_args(kind, folders, image, out, 3, 3, *validation)) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "timesteps" in printed and [e["step"] for e in log_entries(out)] == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoint-3" / "samples").iterdir()) == ["00-0.png", "grid.png"]

    side = str(train_side(kind))
    gen = tmp_path / "samples"
    rc = cli.main(
        ["generate", "--model", str(folders[kind]), "--adapter", str(out / "adapter.safetensors")]
        + ["--prompt", "a {} on a beach", "-n", "1", "--steps", "2", "--height", side, "--width", side]
        + ["--out", str(gen)]
    )
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in gen.iterdir()) == ["00-0.png", "grid.png"]
    sampled = SAMPLED_SIDE.get(kind, int(side))
    assert Image.open(gen / "00-0.png").size == (sampled, sampled)

    # --resume: 2 steps, then on to 3 from checkpoint-2, equals the uninterrupted 3-step run
    resumed = tmp_path / "resumed"
    assert cli.main(_args(kind, folders, image, resumed, 2, 2)) == 0
    assert cli.main(_args(kind, folders, image, resumed, 3, 3, "--resume")) == 0
    assert "resuming from" in capsys.readouterr().out
    assert_same_tensors(resumed / "adapter.safetensors", out / "adapter.safetensors")
    assert [e["loss"] for e in log_entries(resumed)] == [e["loss"] for e in log_entries(out)]


def _run(kind, folders, image, out, **kw) -> _Run:
    """A training run as `train` builds it, kept open to watch its steps."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    side = train_side(kind)
    cfg = TrainConfig(
        model=str(folders[kind]), image=str(image), token="sks", class_name="dog", out=str(out),
        rank=RANK, min_rank=MIN_RANK, lr=3e-2, resolution=side, device="cpu", **kw,
    )  # fmt: skip
    AcceleratorState._reset_state()
    out.mkdir(parents=True)
    return _Run(cfg, Accelerator(cpu=True), out, torch.float32)


@pytest.mark.parametrize("kind", ALL)
def test_ranks_follow_the_sampled_noise_level(kind, folders, image, tmp_path):
    run = _run(kind, folders, image, tmp_path / "run", steps=4)
    drawn = []
    sample = run.fam.sample_timesteps

    def recording(*args, **kwargs):
        t = sample(*args, **kwargs)
        drawn.append(float(t))
        return t

    run.fam.sample_timesteps = recording  # records what the family's own sampler drew
    log = RankLog(run.adapter, batch=1)
    for step in range(4):
        run.step(step)
    T = run.fam.num_train_timesteps
    want = [(reference.rank_at(t, RANK, MIN_RANK, T),) for t in drawn]
    assert log.per_step() == want, (drawn, log.per_step())


@torch.no_grad()
def fixed_batch_loss(fam, image, side, n: int = 16) -> float:
    """The family's training loss on fixed draws: n evenly spaced noise levels, seeded noise."""
    mean, std = fam.encode_image(load_image(image, side))
    cond = fam.encode_prompt("a photo of sks dog", side)
    g = torch.Generator().manual_seed(1234)
    T = fam.num_train_timesteps
    total = 0.0
    for i in range(n):
        t = torch.tensor([float(int((i + 0.5) * T / n))])
        latents = mean + std * torch.randn(mean.shape, generator=g)
        noised = fam.noise(latents, torch.randn(mean.shape, generator=g), t)
        total += F.mse_loss(fam.predict(fam.denoiser, noised, cond), noised.target).item()
    return total / n


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_20_steps_lower_the_loss(kind, folders, image, tmp_path):
    side = train_side(kind)
    result = train(
        model=str(folders[kind]), image=str(image), token="sks", class_name="dog", out=str(tmp_path / "run"),
        rank=RANK, lr=3e-2, steps=20, checkpoint_every=20, resolution=side, device="cpu",
    )  # fmt: skip
    fam = family_of(result.pipe)
    after = fixed_batch_loss(fam, image, side)
    result.adapter.remove()
    before = fixed_batch_loss(fam, image, side)
    assert after < before, f"{kind}: {before:.4f} -> {after:.4f}"
    shutil.rmtree(tmp_path / "run")


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sampling_is_the_diffusers_scripts(sampling, shift):
    """The noise levels a flow family draws equal what diffusers' DreamBooth scripts draw from the
    same generator: u from training_utils.compute_density_for_timestep_sampling (the script's
    defaults: logit mean 0, std 1, mode scale 1.29), indices u * T into the timesteps of the
    scheduler built with that shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from tlora.testing.tiny_families import tiny_family_pipeline

    pipe = tiny_family_pipeline("sd3")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    fam = family_of(pipe)
    fam.configure_sampling(sampling, None)
    ours = fam.sample_timesteps(torch.Generator().manual_seed(7), 256)
    scheme = "none" if sampling == "uniform" else sampling
    u = compute_density_for_timestep_sampling(
        scheme, 256, logit_mean=0.0, logit_std=1.0, mode_scale=1.29, generator=torch.Generator().manual_seed(7)
    )
    theirs = pipe.scheduler.timesteps[(u * 1000).long()]
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-3)


def test_sampling_settings_that_do_not_apply_are_refused(folders, image, tmp_path, capsys):
    def last_line(args):
        assert cli.main(args) == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    sd = train_args(folders["sd"], image, tmp_path / "a", 1, 1, "--shift", "3")
    assert "--shift applies to flow-matching families" in last_line(sd)
    sd3 = train_args(folders["sd3"], image, tmp_path / "b", 1, 1, "--shift", "auto")
    line = last_line(sd3)
    assert "--shift auto" in line and "use_dynamic_shifting" in line
    bad = train_args(folders["sd3"], image, tmp_path / "c", 1, 1, "--timestep-sampling", "cosmap")
    assert cli.main(bad) == 2 and "--timestep-sampling" in capsys.readouterr().err


def test_two_expert_wan_is_refused(folders, image, tmp_path, capsys, monkeypatch):
    """A Wan 2.2 A14B (transformer_2) is refused with the reason and the fix: as a pipeline, and
    as a folder from its model_index.json, before any weights load."""
    import json

    import diffusers

    from tlora.errors import InputError
    from tlora.testing.tiny_families import tiny_family_pipeline

    pipe = tiny_family_pipeline("wan")
    pipe.register_modules(transformer_2=pipe.transformer)
    with pytest.raises(InputError, match="two experts") as refused:
        family_of(pipe)
    assert "high-noise expert only" in str(refused.value) and "single-transformer Wan" in str(refused.value)

    folder = tmp_path / "wan-a14b"
    shutil.copytree(folders["wan"], folder)
    shutil.copytree(folder / "transformer", folder / "transformer_2")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "transformer_2": index["transformer"]}))
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", None)  # loading would fail differently
    assert cli.main(train_args(folder, image, tmp_path / "run", 1, 1)) == 2
    err = capsys.readouterr().err
    assert "two experts" in err and "TI2V-5B" in err and "high-noise expert only" in err, err
