"""Ideogram4's recipe against the pipeline's own code and its DreamBooth script's formulas, on the
tiny pipeline (tlora.testing.tiny_families): the noise levels the script draws, the latents the
pipeline decodes back to the VAE's image, the noising, target and the packed transformer call as
the script writes them, and the pipeline's guidance schedule. (Training end to end, resume, ranks
and the loss: test_families_train.py[ideogram4].)"""

from __future__ import annotations

import inspect

import pytest
import torch

from tlora.errors import ConfigError
from tlora.testing.tiny_families import tiny_family_pipeline
from tlora.train.families import family_of
from tlora.train.families.ideogram4 import MAX_SEQUENCE_LENGTH, guidance_schedule

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return tiny_family_pipeline("ideogram4")


@pytest.mark.parametrize("side", [16, 512, 1024, 2048])
@pytest.mark.parametrize("sampling", ["logit_normal", "uniform", "mode"])
def test_noise_levels_are_the_scripts(pipe, sampling, side):
    """train_dreambooth_lora_ideogram4.py draws sigma = compute_density_for_timestep_sampling(
    weighting_scheme, logit_mean=_resolution_aware_mu(h, w, 0), logit_std=1.5, mode_scale=1.29)
    and uses it as sigma (no grid, no shift)."""
    from diffusers.pipelines.ideogram4.pipeline_ideogram4 import _resolution_aware_mu
    from diffusers.training_utils import compute_density_for_timestep_sampling

    fam = family_of(pipe)
    fam.configure_sampling(None if sampling == "logit_normal" else sampling, None)
    ours = fam.sample_timesteps(torch.Generator().manual_seed(3), 512, side) / fam.num_train_timesteps
    scheme = "none" if sampling == "uniform" else sampling
    theirs = compute_density_for_timestep_sampling(
        scheme, 512, logit_mean=_resolution_aware_mu(side, side, base_mu=0.0), logit_std=1.5, mode_scale=1.29,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_a_given_shift_shifts_every_density(pipe):
    fam = family_of(pipe)
    for sampling in ("uniform", "logit_normal"):
        fam.configure_sampling(sampling, 1.0)
        base = fam.sample_timesteps(torch.Generator().manual_seed(5), 64, 16) / 1000
        fam.configure_sampling(sampling, 3.0)
        shifted = fam.sample_timesteps(torch.Generator().manual_seed(5), 64, 16) / 1000
        torch.testing.assert_close(shifted, 3 * base / (1 + 2 * base), rtol=1e-5, atol=1e-6)
    fam.configure_sampling("uniform", "auto")  # by resolution, as logit_normal's default
    auto = fam.sample_timesteps(torch.Generator().manual_seed(5), 64, 2048) / 1000
    fam.configure_sampling("uniform", 4.0)
    torch.testing.assert_close(auto, fam.sample_timesteps(torch.Generator().manual_seed(5), 64, 2048) / 1000)


@torch.no_grad()
def test_latents_decode_back_through_the_pipeline(pipe, monkeypatch):
    """The recipe's token latents, handed to the pipeline as its `latents` with a scheduler step
    that changes nothing, are unpatched, de-normalised and decoded by the pipeline's own code into
    the image the VAE decodes from its posterior mode."""
    fam = family_of(pipe)
    pixels = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents, std = fam.encode_image(pixels)
    assert latents.shape == (1, 8, 4, 4) and not std.any()
    monkeypatch.setattr(pipe.scheduler, "step", lambda v, t, x, return_dict=False: (x,))
    image = pipe(
        "a photo of sks dog", height=16, width=16, num_inference_steps=1, guidance_scale=1.0,
        guidance_schedule=None, latents=fam.layout(latents), output_type="pt",
    ).images  # fmt: skip
    mode = pipe.vae.encode(pixels).latent_dist.mode()
    want = (pipe.vae.decode(mode).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(image, want, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_noising_target_and_call_are_the_scripts(pipe):
    """zt = (1 - sigma) x0 + sigma noise, the timestep 1 - sigma, the target x0 - noise, and the
    prediction the transformer's output at the image positions of [zeros at the text positions,
    zt], with the conditioning exactly as the pipeline's encode_prompt returns it."""
    fam = family_of(pipe)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 8, 4, 4, generator=g), torch.randn(2, 8, 4, 4, generator=g)
    t = torch.tensor([250.0, 900.0])
    noised = fam.noise(x0, eps, t)
    sigma = (t / 1000).view(2, 1, 1)
    tokens = x0.flatten(2).transpose(1, 2)
    noise = eps.flatten(2).transpose(1, 2)
    torch.testing.assert_close(noised.model_input, (1 - sigma) * tokens + sigma * noise)
    torch.testing.assert_close(noised.timestep, 1 - sigma.view(2))
    torch.testing.assert_close(noised.target, tokens - noise)

    cond = fam.encode_prompt("a photo of sks dog", 16)
    pred = fam.predict(pipe.transformer, noised, cond)
    embeds, position_ids, segment_ids, indicator = pipe.encode_prompt(
        "a photo of sks dog", grid_h=4, grid_w=4, max_sequence_length=MAX_SEQUENCE_LENGTH, device="cpu"
    )
    packed = torch.cat([torch.zeros(2, MAX_SEQUENCE_LENGTH, 8), noised.model_input], dim=1)
    want = pipe.transformer(
        hidden_states=packed, timestep=noised.timestep, encoder_hidden_states=embeds.expand(2, -1, -1),
        position_ids=position_ids.expand(2, -1, -1), segment_ids=segment_ids.expand(2, -1),
        indicator=indicator.expand(2, -1), return_dict=False,
    )[0][:, MAX_SEQUENCE_LENGTH:]  # fmt: skip
    torch.testing.assert_close(pred, want)


def test_sampling_follows_the_pipelines_guidance_schedule(pipe):
    from diffusers import Ideogram4Pipeline

    stock = inspect.signature(Ideogram4Pipeline.__call__).parameters["guidance_schedule"].default
    steps, guidance = family_of(pipe).default_steps, family_of(pipe).default_guidance
    assert guidance_schedule(steps, guidance) == list(stock) and len(stock) == steps
    assert guidance_schedule(10, 5.0) == [5.0] * 7 + [3.0] * 3
    assert guidance_schedule(2, 5.0) == [5.0, 5.0]
    with pytest.raises(ConfigError, match="no negative prompt"):
        family_of(pipe).sample(pipe, "a dog", {"num_inference_steps": 2, "guidance_scale": 4.0, "negative_prompt": "x"})
