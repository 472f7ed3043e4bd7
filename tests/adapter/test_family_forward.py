"""Every diffusers family's timestep convention, on tiny models called the way their pipelines call
them: the scheduler's `set_timesteps` values through the pipeline's own transformation (family_models.FAMILIES);
the ranks each adapted layer uses at a step equal r(t) of that step's noise level t, read from the
real scheduler (its `timesteps`, or its `sigmas` mapped the way the family's schedule defines t).
"""

from __future__ import annotations

import diffusers as D
import pytest
import torch
from family_models import FAMILIES, NOISE_LEVEL, cosmos, expand, flow, flow_dpm, lumina2, r, sana, zimage
from family_ranks import B, RankLog, T, drive, inject, r_of

from tlora import timesteps


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_forward_ranks(family):
    build, make_scheduler, passes, set_steps = FAMILIES[family]
    torch.manual_seed(0)
    model, kwargs = build()
    model.eval()
    scheduler = make_scheduler()
    # Mochi's linear-quadratic schedule stays near pure noise for its first half: more steps.
    set_steps(scheduler, 12) if set_steps else scheduler.set_timesteps(6)
    t_steps = scheduler.timesteps
    adapter = inject(model)
    arg = "timesteps" if family == "hidream" else "timestep"
    noise = NOISE_LEVEL.get(family, lambda t: t)
    expected = [(r_of(float(noise(t))),) * B for t in t_steps]
    assert drive(model, kwargs, passes, t_steps, adapter, arg) == expected
    assert len(set(expected)) > 2, "the steps should span several ranks"


def test_sana_divides_by_its_config_scale():
    """Sana's pipeline multiplies t by transformer.config.timestep_scale; t is recovered for any scale."""
    torch.manual_seed(0)
    model, kwargs = sana(timestep_scale=0.5)
    scheduler = flow_dpm(D.DPMSolverMultistepScheduler)
    scheduler.set_timesteps(6)
    adapter = inject(model)
    seen = drive(model, kwargs, lambda t: expand(t) * model.config.timestep_scale, scheduler.timesteps, adapter)
    assert seen == [(r_of(float(t)),) * B for t in scheduler.timesteps]


@pytest.mark.parametrize("version", ["cosmos1_edm", "cosmos2_flow"])
def test_cosmos_either_pipeline(version):
    """CosmosTransformer3DModel is driven two ways: Cosmos 1 (EDMEulerScheduler, 0.25 * log sigma) and
    Cosmos 2 (the pipeline passes sigma / (sigma + 1)). convention_for reads which from the scheduler;
    t = T * sigma / (sigma + 1) in both."""
    torch.manual_seed(0)
    model, kwargs = cosmos()
    if version == "cosmos1_edm":
        scheduler = D.EDMEulerScheduler(
            sigma_min=0.002,
            sigma_max=80.0,
            sigma_data=0.5,
            sigma_schedule="karras",
            num_train_timesteps=1000,
            prediction_type="epsilon",
            rho=7.0,
            final_sigmas_type="sigma_min",
        )
        scheduler.set_timesteps(6)
        # pipeline_cosmos_text2world: timestep = t.expand(latents.shape[0])
        args = [expand(t) for t in scheduler.timesteps]
    else:
        from diffusers.pipelines.cosmos.pipeline_cosmos2_text2image import retrieve_timesteps

        # pipeline_cosmos2_text2image: karras sigmas 0.002..80 registered on a flow-matching scheduler,
        # set from sigmas = linspace(0, 1, steps); current_t = current_sigma / (current_sigma + 1)
        scheduler = D.FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True, shift=1.0)
        scheduler.register_to_config(sigma_max=80.0, sigma_min=0.002, sigma_data=1.0, final_sigmas_type="sigma_min")
        retrieve_timesteps(scheduler, device="cpu", sigmas=torch.linspace(0, 1, 6, dtype=torch.float64))
        args = [expand(s / (s + 1)) for s in scheduler.sigmas[:-1]]
    sigmas = scheduler.sigmas[:-1].double().tolist()
    name = timesteps.convention_for(scheduler, model=model)
    assert name == {"cosmos1_edm": "edm_flow", "cosmos2_flow": "unit"}[version]
    adapter = inject(model, timestep_convention=name)
    seen = drive(model, kwargs, lambda a: a, args, adapter)
    assert seen == [(r_of(T * s / (1 + s)),) * B for s in sigmas]
    assert len(set(seen)) > 2


def test_per_sample_timesteps_reversed_family():
    """A training batch with one timestep per sample (Lumina2 passes 1 - t/T): ranks per sample."""
    torch.manual_seed(0)
    model, kwargs = lumina2()
    adapter = inject(model)
    t = torch.tensor([900.0, 100.0])
    seen = drive(model, kwargs, lambda a: a, [1 - t / T], adapter)
    assert seen == [(r_of(900.0), r_of(100.0))]
    assert r_of(900.0) < r_of(100.0)


def test_zimage_pipeline_call_passes_t_reversed():
    """ZImageTransformer2DModel.forward(x, t, cap_feats): the argument is named `t` and
    pipeline_z_image passes timestep = (1000 - t) / 1000 positionally; t = T * (1 - a). A real
    forward of a tiny model, called the way the pipeline calls it."""
    torch.manual_seed(0)
    model = zimage().eval()
    adapter = inject(model)
    assert timesteps.timestep_parameter(model) == ("t", 1)
    assert adapter.config.timestep_convention == "reversed_unit"
    scheduler = flow(3.0)
    scheduler.set_timesteps(6)
    latents = [r(4, 1, 8, 8) for _ in range(B)]  # the pipeline's latent_model_input.unsqueeze(2).unbind(0)
    caps = [r(5, 16) for _ in range(B)]
    log = RankLog(adapter, batch=B)
    with torch.no_grad():
        for t in scheduler.timesteps:
            timestep = t.expand(B)
            timestep = (1000 - timestep) / 1000
            model(latents, timestep, caps, return_dict=False)
    expected = [(r_of(float(t)),) * B for t in scheduler.timesteps]
    assert log.per_step() == expected and len(set(expected)) > 2
