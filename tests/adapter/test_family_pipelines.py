"""The real pipelines: the ranks each adapted layer uses at a denoising step equal r(t) of that
step's noise level t (on the training scale 0..T), read from the real scheduler and never from
tlora's own conventions. SD, SD-XL, FLUX.1, Playground v2.5 (SD-XL with an EDM scheduler) and
Sana-Sprint run as their pipelines run them.
"""

from __future__ import annotations

import math

import diffusers as D
import pytest
import torch
from family_models import r, sana
from family_ranks import R_MIN, B, RankLog, T, inject, r_of

import tlora
from tlora import timesteps
from tlora.testing.tiny import sample_kwargs, tiny_flux_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline


def test_sd_pipeline_ddim():
    """StableDiffusionPipeline passes the DDIM scheduler's integer t (0..999) unchanged."""
    pipe = tiny_sd_pipeline()
    log = RankLog(inject(pipe.unet), batch=2)  # CFG doubles the batch
    pipe(**sample_kwargs("sd", steps=4), generator=torch.Generator().manual_seed(0))
    t_steps = pipe.scheduler.timesteps.tolist()
    assert log.per_step() == [(r_of(t),) * 2 for t in t_steps]
    assert len(set(log.per_step())) > 2  # the steps really span several ranks


def test_sdxl_pipeline_euler():
    """StableDiffusionXLPipeline passes the Euler scheduler's t (float, 0..999)."""
    pipe = tiny_sdxl_pipeline()
    log = RankLog(inject(pipe.unet), batch=2)
    pipe(**sample_kwargs("sdxl", steps=4), generator=torch.Generator().manual_seed(0))
    t_steps = pipe.scheduler.timesteps.tolist()
    assert log.per_step() == [(r_of(t),) * 2 for t in t_steps]


def test_flux_pipeline_passes_t_over_1000():
    """FluxPipeline: `timestep=timestep / 1000` with the flow-matching scheduler's t = sigma * 1000."""
    pipe = tiny_flux_pipeline()
    log = RankLog(inject(pipe.transformer), batch=1)
    pipe(**sample_kwargs("flux", steps=4), generator=torch.Generator().manual_seed(0))
    t_steps = pipe.scheduler.timesteps.tolist()
    assert log.per_step() == [(r_of(t),) for t in t_steps]
    assert log.per_step()[0] == (R_MIN,)  # the first step is pure noise: t = T


def test_playground_edm_pipeline():
    """Playground v2.5 = an SD-XL UNet driven by EDMDPMSolverMultistepScheduler, whose timesteps are
    0.25 * log(sigma). t is the SD-XL training step of that sigma (diffusers' own `_sigma_to_t` over
    the scaled_linear schedule), found from the scheduler by `convention_for(pipe)`."""
    import numpy as np

    pipe = tiny_sdxl_pipeline()
    pipe.scheduler = D.EDMDPMSolverMultistepScheduler(
        sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, num_train_timesteps=1000, prediction_type="epsilon"
    )
    assert timesteps.convention_for(pipe) == "edm"
    log = RankLog(inject(pipe.unet, timestep_convention=timesteps.convention_for(pipe)), batch=2)
    pipe(**sample_kwargs("sdxl", steps=5), generator=torch.Generator().manual_seed(0))
    assert (pipe.scheduler.timesteps < 0).any()  # the small sigmas: refused before conventions
    sdxl = D.EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    log_sigmas = np.log(((1 - sdxl.alphas_cumprod.double()) / sdxl.alphas_cumprod.double()).numpy() ** 0.5)
    sigmas = pipe.scheduler.sigmas[:-1].double().numpy()
    t_steps = [float(sdxl._sigma_to_t(np.array([s]), log_sigmas)[0]) for s in sigmas]
    assert log.per_step() == [(r_of(t),) * 2 for t in t_steps]
    assert len(set(log.per_step())) > 2


def test_sdxl_pipeline_continuous_euler_epsilon():
    """EulerDiscreteScheduler(timestep_type="continuous") keeps the discrete t (0..999) for epsilon
    prediction: diffusers' set_timesteps switches to 0.25 * log(sigma) only with v_prediction.
    convention_for must say "timesteps" (it said "edm", and 9 of 10 steps ran at t = 999)."""
    pipe = tiny_sdxl_pipeline()
    pipe.scheduler = D.EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, timestep_type="continuous", prediction_type="epsilon"
    )
    assert timesteps.convention_for(pipe) == "timesteps"
    log = RankLog(inject(pipe.unet, timestep_convention=timesteps.convention_for(pipe)), batch=2)
    pipe(**sample_kwargs("sdxl", steps=4), generator=torch.Generator().manual_seed(0))
    t_steps = pipe.scheduler.timesteps.tolist()
    assert min(t_steps) >= 1 and max(t_steps) > 500  # its discrete t, not 0.25 * log(sigma)
    assert log.per_step() == [(r_of(t),) * 2 for t in t_steps]
    assert len(set(log.per_step())) > 2


def test_continuous_euler_is_edm_only_with_v_prediction():
    """The scheduler's own timesteps decide: 0.25 * log(sigma) (negative at small sigma) for
    v_prediction, the discrete t otherwise; convention_for follows the same condition."""
    unet = tiny_sdxl_pipeline().unet
    for prediction, edm in (("v_prediction", True), ("epsilon", False), ("sample", False)):
        scheduler = D.EulerDiscreteScheduler(timestep_type="continuous", prediction_type=prediction)
        scheduler.set_timesteps(10)
        assert bool((scheduler.timesteps < 0).any()) == edm, prediction
        assert timesteps.convention_for(scheduler, model=unet) == ("edm" if edm else "timesteps"), prediction


def test_sana_sprint_steps_get_the_rank_of_their_flow_time():
    """SanaSprintPipeline passes the same SanaTransformer2DModel that SanaPipeline drives with
    sigma * 1000 * scale the flow time sin(s) / (cos(s) + sin(s)) in 0..1 of its SCMScheduler's
    TrigFlow angle s (pipeline_sana_sprint: scm_timestep = sin(timestep) / (cos(timestep) + sin(timestep));
    diffusers' Sana-Sprint training script passes the same flow_timestep). The TrigFlow state
    cos(s) x0 + sin(s) z is (cos(s) + sin(s)) times the flow state (1 - sigma) x0 + sigma z with that
    sigma, so the step's noise level is t = T * sigma: rank r(t) at r 8 / r_min 4, not near full rank."""
    rank, min_rank = 8, 4
    torch.manual_seed(0)
    model = D.SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=16,
        sample_size=8,
        patch_size=1,
        guidance_embeds=True,  # what makes a Sana transformer a Sprint one
    ).eval()
    scheduler = D.SCMScheduler()
    pipe = D.SanaSprintPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=scheduler)
    # Every way of choosing says the flow time: the pipeline, its scheduler, the bare transformer.
    assert timesteps.convention_for(pipe) == "unit"
    assert timesteps.convention_for(scheduler, model=model) == "unit"
    adapter = tlora.inject(model, rank=rank, min_rank=min_rank)
    assert adapter.config.timestep_convention == "unit"
    scheduler.set_timesteps(4, max_timesteps=1.57080, intermediate_timesteps=None)
    angles = scheduler.timesteps[:-1]  # the pipeline drops the final s = 0
    log = RankLog(adapter, batch=B)
    kwargs = dict(encoder_hidden_states=r(B, 5, 16), guidance=torch.full((B,), 4.5 * 0.1))
    with torch.no_grad():
        for s in angles:
            timestep = s.expand(B)
            scm_timestep = torch.sin(timestep) / (torch.cos(timestep) + torch.sin(timestep))
            model(r(B, 4, 8, 8), timestep=scm_timestep, **kwargs)
    # (the default max_timesteps 1.57080 is a hair past pi/2: its flow time a hair past 1, i.e. t = T)
    levels = [min(T, T * math.sin(s) / (math.sin(s) + math.cos(s))) for s in angles.double().tolist()]
    want = [(math.floor((T - t) / T * (rank - min_rank)) + min_rank,) * B for t in levels]
    assert log.per_step() == want
    assert want[0] == (min_rank,) * B and len(set(want)) > 2  # pure noise first, then rising ranks


def test_a_guidance_embedded_sana_cannot_run_under_sana_pipeline():
    """Why the guidance embedding marks a Sprint transformer: SanaPipeline calls the transformer
    without `guidance`, and that embedding cannot run without one."""
    m = D.SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=16,
        sample_size=8,
        patch_size=1,
        guidance_embeds=True,
    )
    with pytest.raises(TypeError, match="batch_size"):
        m(r(B, 4, 8, 8), encoder_hidden_states=r(B, 5, 16), timestep=torch.full((B,), 500.0))
    plain, _ = sana()
    assert timesteps.class_convention(plain) == "sana" and timesteps.class_convention(m) == "unit"
