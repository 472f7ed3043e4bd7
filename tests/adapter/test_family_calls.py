"""The families whose timestep argument has another name or position, or which were refused before:
each called the way its pipeline calls it (family_calls.MORE_FAMILIES), the ranks tlora's hook sets
for the call against r(t) of the step's noise level.
"""

from __future__ import annotations

import math

import diffusers as D
import pytest
import torch
from family_calls import MORE_FAMILIES
from family_models import r
from family_ranks import B, T, inject, r_of, ranks_of_call

import tlora
from tlora import timesteps


@pytest.mark.parametrize("family", sorted(MORE_FAMILIES))
def test_more_families_pipeline_call_ranks(family):
    """Each family called the way its pipeline calls it (same argument names and positions, the
    argument as the pipeline computes it from its scheduler): the step with noise fraction sigma
    gets r(T * sigma), its timestep argument found from the forward's signature."""
    build, steps, call, argument, convention = MORE_FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    adapter = inject(model)
    assert adapter.config.timestep_convention == convention
    assert timesteps.timestep_parameter(model) == argument
    sigmas, args = steps()
    seen = [ranks_of_call(adapter, lambda a=a: call(model, a)) for a in args]
    expected = [(r_of(min(T, T * s)),) * B for s in sigmas]
    assert seen == expected
    assert len(set(expected)) > 2, "the steps should span several ranks"


@pytest.mark.parametrize("scheduler,convention", [("IPNDMScheduler", "unit"), ("DDPMScheduler", "timesteps")])
def test_unet1d_depends_on_its_pipeline(scheduler, convention):
    """UNet1DModel: Dance Diffusion (IPNDMScheduler) passes its continuous time atan2(beta, alpha) * 2/pi
    in 0..1 (`self.unet(audio, t)`), value-guided RL planning (DDPMScheduler) the integer t: inject
    alone refuses, convention_for reads the scheduler."""
    torch.manual_seed(0)
    model = D.UNet1DModel(sample_size=64, block_out_channels=(8, 8, 16), norm_num_groups=4, extra_in_channels=16)
    with pytest.raises(tlora.ConfigError, match=r"UNet1DModel.*Dance Diffusion.*timestep_convention"):
        inject(model, target_modules=["query", "key", "value"])
    sched = getattr(D, scheduler)()
    name = timesteps.convention_for(sched, model=model)
    assert name == convention
    adapter = inject(model, target_modules=["query", "key", "value"], timestep_convention=name)
    sched.set_timesteps(6)
    levels = [float(t) * (T if convention == "unit" else 1) for t in sched.timesteps]
    seen = [ranks_of_call(adapter, lambda t=t: model(r(B, 2, 64), t), batch=B) for t in sched.timesteps]
    assert seen == [(r_of(min(T, t)),) * B for t in levels]
    assert len(set(seen)) > 2


def test_stable_audio_open_depends_on_its_scheduler():
    """StableAudioDiTModel: with CosineDPMSolverMultistepScheduler (stable-audio-open's) the pipeline
    passes the scheduler's t = atan(sigma) * 2/pi in 0..1 ("unit"); with an EDM scheduler 0.25 * log(sigma)
    of a schedule without training steps: refused by convention_for as by inject."""
    model = D.StableAudioDiTModel(
        sample_size=8,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        num_key_value_attention_heads=1,
        out_channels=4,
        cross_attention_dim=16,
        time_proj_dim=16,
        global_states_input_dim=16,
        cross_attention_input_dim=16,
    )
    # (the real CosineDPMSolverMultistepScheduler needs torchsde, absent here: the choice goes by its name)
    cosine = type("CosineDPMSolverMultistepScheduler", (), {})()
    assert timesteps.convention_for(cosine, model=model) == "unit"
    edm = D.EDMDPMSolverMultistepScheduler(sigma_min=0.3, sigma_max=500, sigma_data=1.0, sigma_schedule="exponential")
    with pytest.raises(tlora.ConfigError, match=r"StableAudioDiTModel.*CosineDPMSolverMultistepScheduler"):
        timesteps.convention_for(edm, model=model)
    with pytest.raises(tlora.ConfigError, match=r"StableAudioDiTModel"):
        tlora.inject(model, rank=2)
    adapter = inject(model, timestep_convention="unit")
    edm.set_timesteps(6)  # the same exponential sigmas 0.3..500
    sigmas = edm.sigmas[:-1]
    # scheduling_cosine_dpmsolver_multistep.precondition_noise: sigma.atan() / math.pi * 2;
    # pipeline_stable_audio: self.transformer(latent_model_input, t.unsqueeze(0), ...)
    arguments = sigmas.atan() / math.pi * 2
    seen = [
        ranks_of_call(adapter, lambda t=t: model(r(B, 4, 8), t.unsqueeze(0), encoder_hidden_states=r(B, 5, 16)))
        for t in arguments
    ]
    assert seen == [(r_of(T * math.atan(s) * 2 / math.pi),) * B for s in sigmas.double().tolist()]
    assert len(set(seen)) > 2
