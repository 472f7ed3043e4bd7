"""Every diffusers family's timestep convention: the ranks each adapted layer uses at a denoising
step equal r(t) of that step's noise level t (on the training scale 0..T).

The noise level is read from the real scheduler (its `timesteps`, or its `sigmas` mapped the way the
family's schedule defines t) and never from tlora's own conventions; r(t) is the paper's formula in
plain float64. SD, SD-XL, FLUX.1 and Playground v2.5 (SD-XL with an EDM scheduler) run their real
pipelines; the other families get a tiny model from a config (1 layer, 16-wide) called the way its
pipeline calls it: the scheduler's `set_timesteps` values through the pipeline's own transformation
(quoted next to each case from diffusers 0.42's pipeline source).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import tlora
from tlora import timesteps
from tlora.tiny import sample_kwargs, tiny_flux_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

D = pytest.importorskip("diffusers")

R, R_MIN, T = 8, 1, 1000
B = 2


def r_of(t: float) -> int:
    """The paper's schedule, float64: r(t) = floor(((T - t) / T) * (r - r_min)) + r_min."""
    return math.floor((T - t) / T * (R - R_MIN)) + R_MIN


class RankLog:
    """The ranks every adapted layer uses, one entry per model forward (per sample)."""

    def __init__(self, adapter: tlora.Adapter, batch: int):
        self.adapter, self.batch, self.steps = adapter, batch, []
        self._hooks = [layer.register_forward_pre_hook(self._seen) for layer in adapter.layers.values()]
        self._model_hook = adapter.model.register_forward_pre_hook(lambda *_: self.steps.append(set()))

    def _seen(self, module, args):
        ranks = self.adapter.state.ranks
        ranks = ranks.tolist() if isinstance(ranks, torch.Tensor) else list(ranks)
        self.steps[-1].add(tuple(ranks * self.batch if len(ranks) == 1 else ranks))

    def per_step(self) -> list[tuple[int, ...]]:
        for i, seen in enumerate(self.steps):
            assert len(seen) == 1, f"forward {i}: adapted layers used different ranks {seen}"
        return [next(iter(s)) for s in self.steps]


def inject(model, **kw):
    return tlora.inject(model, rank=R, min_rank=R_MIN, **kw)


# ---- real pipelines ----------------------------------------------------------------------------


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


# ---- forward-driven families -------------------------------------------------------------------


def r(*shape):
    return torch.randn(*shape)


def flow(shift=1.0, **kw):
    return D.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, **kw)


def flow_dpm(cls):
    return cls(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def expand(t):
    return t.expand(B)


# name: (build model + inputs, scheduler, what the pipeline passes for scheduler step t, the noise level of step t)
# Each builder returns (model, kwargs without the timestep, name of the timestep argument).
def sd3():
    m = D.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
        pos_embed_max_size=16,
    )
    return m, dict(hidden_states=r(B, 4, 8, 8), encoder_hidden_states=r(B, 5, 16), pooled_projections=r(B, 8))


def flux2():
    m = D.Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )
    return m, dict(
        hidden_states=r(B, 16, 4),
        encoder_hidden_states=r(B, 5, 16),
        img_ids=torch.zeros(16, 4),
        txt_ids=torch.zeros(5, 4),
    )


def auraflow():
    m = D.AuraFlowTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=64,
    )
    return m, dict(hidden_states=r(B, 4, 8, 8), encoder_hidden_states=r(B, 5, 16))


def lumina2():
    m = D.Lumina2Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=16,
        num_layers=1,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=8,
        axes_dim_rope=(4, 2, 2),
        axes_lens=(64, 16, 16),
        cap_feat_dim=16,
    )
    return m, dict(
        hidden_states=r(B, 4, 8, 8),
        encoder_hidden_states=r(B, 5, 16),
        encoder_attention_mask=torch.ones(B, 5, dtype=torch.bool),
    )


def pixart():
    m = D.PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        cross_attention_dim=16,
        sample_size=8,
        patch_size=2,
        caption_channels=16,
        use_additional_conditions=False,
    )
    return m, dict(
        hidden_states=r(B, 4, 8, 8),
        encoder_hidden_states=r(B, 5, 16),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


def sana(timestep_scale=1.0):
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
        timestep_scale=timestep_scale,
    )
    return m, dict(hidden_states=r(B, 4, 8, 8), encoder_hidden_states=r(B, 5, 16))


def hunyuandit():
    m = D.HunyuanDiT2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        patch_size=2,
        sample_size=8,
        hidden_size=16,
        num_layers=1,
        cross_attention_dim=16,
        cross_attention_dim_t5=16,
        pooled_projection_dim=16,
        text_len=5,
        text_len_t5=5,
    )
    return m, dict(
        hidden_states=r(B, 4, 8, 8),
        encoder_hidden_states=r(B, 5, 16),
        text_embedding_mask=torch.ones(B, 5),
        encoder_hidden_states_t5=r(B, 5, 16),
        text_embedding_mask_t5=torch.ones(B, 5),
        image_meta_size=torch.tensor([[64.0, 64, 64, 64, 0, 0]] * B),
        style=torch.zeros(B, dtype=torch.long),
        image_rotary_emb=(torch.ones(16, 8), torch.zeros(16, 8)),
    )


def _cogview(cls, **extra):
    m = cls(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        text_embed_dim=16,
        time_embed_dim=16,
        condition_dim=8,
        pos_embed_max_size=16,
        sample_size=8,
        **extra,
    )
    hw = torch.tensor([[64.0, 64]] * B)
    return m, dict(
        hidden_states=r(B, 4, 8, 8),
        encoder_hidden_states=r(B, 5, 16),
        original_size=hw,
        target_size=hw,
        crop_coords=torch.zeros(B, 2),
    )


def cogview3():
    return _cogview(D.CogView3PlusTransformer2DModel)


def cogview4():
    return _cogview(D.CogView4Transformer2DModel, rope_axes_dim=(4, 4))


def cogvideox():
    m = D.CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=16,
        num_layers=1,
        sample_width=8,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        max_text_seq_length=5,
    )
    return m, dict(hidden_states=r(B, 3, 4, 8, 8), encoder_hidden_states=r(B, 5, 16))


def ltx():
    m = D.LTXVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=1,
        caption_channels=16,
    )
    return m, dict(
        hidden_states=r(B, 2 * 4 * 4, 4),
        encoder_hidden_states=r(B, 5, 16),
        encoder_attention_mask=torch.ones(B, 5),
        num_frames=2,
        height=4,
        width=4,
    )


def _wan(cls):
    m = cls(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=16,
        num_layers=1,
        rope_max_seq_len=32,
    )
    return m, dict(hidden_states=r(B, 4, 2, 8, 8), encoder_hidden_states=r(B, 5, 16))


def wan():
    return _wan(D.WanTransformer3DModel)


def skyreels():
    return _wan(D.SkyReelsV2Transformer3DModel)


def mochi():
    m = D.MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        pooled_projection_dim=16,
        in_channels=4,
        text_embed_dim=16,
        time_embed_dim=4,
        max_sequence_length=5,
    )
    return m, dict(
        hidden_states=r(B, 4, 2, 8, 8),
        encoder_hidden_states=r(B, 5, 16),
        encoder_attention_mask=torch.ones(B, 5, dtype=torch.bool),
    )


def hunyuanvideo():
    m = D.HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=False,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4),
    )
    return m, dict(
        hidden_states=r(B, 4, 1, 8, 8),
        encoder_hidden_states=r(B, 5, 16),
        encoder_attention_mask=torch.ones(B, 5),
        pooled_projections=r(B, 8),
    )


def allegro():
    m = D.AllegroTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        cross_attention_dim=16,
        sample_height=8,
        sample_width=8,
        sample_frames=2,
        caption_channels=16,
    )
    return m, dict(hidden_states=r(B, 4, 2, 8, 8), encoder_hidden_states=r(B, 5, 16))


def cosmos():
    m = D.CosmosTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=12,
        num_layers=1,
        mlp_ratio=2,
        text_embed_dim=16,
        adaln_lora_dim=4,
        max_size=(4, 32, 32),
        patch_size=(1, 2, 2),
        concat_padding_mask=False,
    )
    return m, dict(hidden_states=r(B, 4, 1, 8, 8), encoder_hidden_states=r(B, 5, 16), fps=24)


def chroma():
    m = D.ChromaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(4, 4, 8),
        approximator_num_channels=8,
        approximator_hidden_dim=16,
        approximator_layers=1,
    )
    return m, dict(
        hidden_states=r(B, 16, 4),
        encoder_hidden_states=r(B, 5, 16),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(5, 3),
    )


def qwenimage():
    m = D.QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(4, 4, 8),
    )
    return m, dict(
        hidden_states=r(B, 16, 16),
        encoder_hidden_states=r(B, 5, 16),
        encoder_hidden_states_mask=torch.ones(B, 5),
        img_shapes=[[(1, 4, 4)]] * B,
    )


def hidream():
    m = D.HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=[16, 16],
        text_emb_dim=16,
        num_routed_experts=2,
        num_activated_experts=1,
        axes_dims_rope=(4, 2, 2),
        max_resolution=(32, 32),
        llama_layers=[0, 1],
    )
    return m, dict(
        hidden_states=r(B, 4, 8, 8),
        encoder_hidden_states_t5=r(B, 5, 16),
        encoder_hidden_states_llama3=r(2, B, 5, 16),
        pooled_embeds=r(B, 16),
    )


def easyanimate():
    m = D.EasyAnimateTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        patch_size=2,
        sample_width=8,
        sample_height=8,
        num_layers=1,
        mmdit_layers=1,
        time_embed_dim=8,
        text_embed_dim=16,
    )
    return m, dict(hidden_states=r(B, 4, 2, 8, 8), encoder_hidden_states=r(B, 5, 16))


def latte():
    m = D.LatteTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        cross_attention_dim=16,
        sample_size=8,
        patch_size=2,
        norm_type="ada_norm_single",
        caption_channels=16,
        video_length=2,
    )
    return m, dict(hidden_states=r(B, 4, 2, 8, 8), encoder_hidden_states=r(B, 5, 16))


def _mochi_steps(scheduler, n):
    from diffusers.pipelines.mochi.pipeline_mochi import linear_quadratic_schedule, retrieve_timesteps

    retrieve_timesteps(scheduler, n, "cpu", sigmas=linear_quadratic_schedule(n, 0.025))


def ddpm_scheduler():
    return D.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


# (builder, scheduler, passes(t) as the pipeline writes it, noise level of scheduler step t, set_timesteps override)
FAMILIES = {
    # pipeline_stable_diffusion_3: timestep = t.expand(latent_model_input.shape[0])
    "sd3": (sd3, lambda: flow(3.0), expand, None),
    # pipeline_flux2: timestep = t.expand(...).to(latents.dtype); transformer(timestep=timestep / 1000)
    "flux2": (flux2, flow, lambda t: expand(t) / 1000, None),
    # pipeline_aura_flow: timestep = torch.tensor([t / 1000]).expand(latent_model_input.shape[0])
    "auraflow": (auraflow, lambda: flow(1.73), lambda t: torch.tensor([t / 1000]).expand(B), None),
    # pipeline_lumina2: current_timestep = 1 - t / self.scheduler.config.num_train_timesteps
    "lumina2": (lumina2, lambda: flow(6.0), lambda t: expand(1 - t / 1000), None),
    # pipeline_pixart_alpha: current_timestep = t ... .expand(latent_model_input.shape[0])
    "pixart": (pixart, lambda: D.DPMSolverMultistepScheduler(num_train_timesteps=1000), expand, None),
    # pipeline_sana: timestep = t.expand(...) * self.transformer.config.timestep_scale
    "sana": (sana, lambda: flow_dpm(D.DPMSolverMultistepScheduler), expand, None),
    # pipeline_hunyuandit: t_expand = torch.tensor([t] * latent_model_input.shape[0])
    "hunyuandit": (hunyuandit, ddpm_scheduler, lambda t: torch.tensor([t] * B).to(torch.float32), None),
    # pipeline_cogview3plus: timestep = t.expand(latent_model_input.shape[0])
    "cogview3": (cogview3, lambda: D.CogVideoXDDIMScheduler(num_train_timesteps=1000), expand, None),
    # pipeline_cogview4: timestep = t.expand(latents.shape[0])
    "cogview4": (cogview4, flow, expand, None),
    # pipeline_cogvideox: timestep = t.expand(latent_model_input.shape[0])
    "cogvideox": (cogvideox, lambda: D.CogVideoXDDIMScheduler(num_train_timesteps=1000), expand, None),
    # pipeline_ltx: timestep = t.expand(latent_model_input.shape[0])
    "ltx": (ltx, flow, expand, None),
    # pipeline_wan: timestep = t.expand(latents.shape[0])
    "wan": (wan, lambda: flow_dpm(D.UniPCMultistepScheduler), expand, None),
    # pipeline_skyreels_v2: timestep = t.expand(latents.shape[0])
    "skyreels": (skyreels, lambda: flow_dpm(D.UniPCMultistepScheduler), expand, None),
    # pipeline_mochi: inverted sigmas; "self._current_timestep = 1000 - t"; timestep = t.expand(...)
    "mochi": (mochi, lambda: flow(invert_sigmas=True), expand, _mochi_steps),
    # pipeline_hunyuan_video: timestep = t.expand(latents.shape[0]).to(latents.dtype)
    "hunyuanvideo": (hunyuanvideo, lambda: flow(7.0), expand, None),
    # pipeline_allegro: timestep = t.expand(latent_model_input.shape[0])
    "allegro": (allegro, lambda: D.EulerAncestralDiscreteScheduler(num_train_timesteps=1000), expand, None),
    # pipeline_chroma: timestep = t.expand(latents.shape[0]); transformer(timestep=timestep / 1000)
    "chroma": (chroma, flow, lambda t: expand(t) / 1000, None),
    # pipeline_qwenimage: transformer(timestep=timestep / 1000)
    "qwenimage": (qwenimage, flow, lambda t: expand(t) / 1000, None),
    # pipeline_hidream_image: timestep = t.expand(...); transformer(timesteps=timestep)
    "hidream": (hidream, lambda: flow(3.0), expand, None),
    # pipeline_easyanimate: t_expand = torch.tensor([t] * latent_model_input.shape[0]).to(dtype)
    "easyanimate": (easyanimate, flow, lambda t: torch.tensor([t] * B).to(torch.float32), None),
    # pipeline_latte: current_timestep = t ... .expand(latent_model_input.shape[0])
    "latte": (latte, lambda: D.DDIMScheduler(num_train_timesteps=1000), expand, None),
}
NOISE_LEVEL = {"mochi": lambda t: T - t}  # the others: the scheduler's own t


def drive(model, kwargs, passes, t_steps, adapter, timestep_arg="timestep"):
    log = RankLog(adapter, batch=B)
    with torch.no_grad():
        for t in t_steps:
            model(**kwargs, **{timestep_arg: passes(t)})
    return log.per_step()


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


# ---- families whose timestep argument has another name, or which were refused before ------------


class _Stop(Exception):
    """Raised by a hook that runs after tlora's: the ranks of the call are set, the body is not needed."""


def ranks_of_call(adapter: tlora.Adapter, call, batch: int = B) -> tuple[int, ...]:
    """The per-sample ranks tlora's hook sets for `call()` (a forward written as the pipeline calls
    the model: same positional and keyword arguments), without running the model's body."""
    seen = []

    def grab(module, args, kwargs):
        ranks = adapter.state.ranks
        ranks = ranks.tolist() if isinstance(ranks, torch.Tensor) else list(ranks)
        seen.append(tuple(ranks * batch if len(ranks) == 1 else ranks))
        raise _Stop

    handle = adapter.model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), pytest.raises(_Stop):
            call()
    finally:
        handle.remove()
    return seen[0]


def zimage():
    return D.ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=16,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,
        axes_dims=[2, 2, 4],
        axes_lens=[64, 64, 64],
    )


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


def _zimage_steps():
    # pipeline_z_image*: timestep = t.expand(B); timestep = (1000 - timestep) / 1000
    scheduler = flow(3.0)
    scheduler.set_timesteps(6)
    return [float(t) / T for t in scheduler.timesteps], [((1000 - t) / 1000).expand(B) for t in scheduler.timesteps]


def _flow_sigmas(n):
    return torch.linspace(1.0, 1.0 / n, n, dtype=torch.float32).tolist()


def _ace_step_steps():
    from diffusers.pipelines.ace_step.pipeline_ace_step import AceStepPipeline

    # pipeline_ace_step: the scheduler has num_train_timesteps=1, its sigmas the shifted schedule
    sigmas = AceStepPipeline._get_timestep_schedule(None, num_inference_steps=8, shift=3.0).tolist()
    scheduler = D.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0)
    scheduler.set_timesteps(sigmas=sigmas)
    return sigmas, [float(t) * torch.ones(B) for t in scheduler.timesteps]


def _inverted_flow_steps():
    # pipeline_longcat_audio_dit: FlowMatchEulerDiscreteScheduler(shift=1.0, invert_sigmas=True),
    # set from sigmas = linspace(1, 1/n, n); curr_t = t / num_train_timesteps
    sigmas = _flow_sigmas(6)
    scheduler = D.FlowMatchEulerDiscreteScheduler(shift=1.0, invert_sigmas=True)
    scheduler.set_timesteps(sigmas=sigmas)
    return sigmas, [(t / scheduler.config.num_train_timesteps).expand(B) for t in scheduler.timesteps]


def _minimax_music3_steps():
    # minimax_music3 denoise: sigmas = linspace(1, 1/n, n) on its scheduler, whose t the transformer
    # takes directly as "flow-matching time in [0, 1], 0 = noise" (so 1 - sigma: the overlap blend
    # (1 - t) * noise + t * previous is pure noise at t = 0)
    sigmas = _flow_sigmas(6)
    scheduler = D.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0, invert_sigmas=True)
    scheduler.set_timesteps(sigmas=sigmas)
    assert torch.allclose(scheduler.timesteps, 1 - torch.tensor(sigmas))
    return sigmas, [t.expand(B) for t in scheduler.timesteps]


def _stable_audio_3_steps():
    from diffusers.pipelines.stable_audio_3.pipeline_stable_audio_3 import logsnr_sigma_schedule

    # pipeline_stable_audio_3: retrieve_timesteps(scheduler, sigmas=logsnr_sigma_schedule(...)),
    # transformer(latents, t.expand(B), ...) with t "in [0, 1]": a scheduler on num_train_timesteps=1
    sigmas = logsnr_sigma_schedule(8, -6.2, 2.0)
    scheduler = D.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0)
    scheduler.set_timesteps(sigmas=sigmas)
    return sigmas, [t.expand(B) for t in scheduler.timesteps]


def _wuerstchen_steps():
    # pipeline_stable_cascade(_prior) / pipeline_wuerstchen(_prior) with DDPMWuerstchenScheduler:
    # timestep_ratio = t.expand(B), t running from 1 (noise) to 0
    scheduler = D.DDPMWuerstchenScheduler()
    scheduler.set_timesteps(6)
    ratios = scheduler.timesteps[:-1]
    return ratios.tolist(), [t.expand(B) for t in ratios]


def _ddpm_steps(scheduler, passes):
    scheduler.set_timesteps(6)
    return [float(t) / T for t in scheduler.timesteps], [passes(t) for t in scheduler.timesteps]


def _sana_wm_steps():
    # sana_wm/refiner.py: timestep = torch.full((B, seq_len), sigma * timestep_scale_multiplier)
    sigmas = _flow_sigmas(6)
    return sigmas, [torch.full((B, 6), s * 500.0) for s in sigmas]


def _wuerstchen_prior():
    from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_prior import WuerstchenPrior

    return WuerstchenPrior(c_in=4, c=16, c_cond=16, c_r=8, depth=1, nhead=2)


def _audioldm2_unet():
    from diffusers.pipelines.audioldm2 import AudioLDM2UNet2DConditionModel

    return AudioLDM2UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=(16, 16),
        attention_head_dim=2,
    )


# name: (tiny model, (noise fractions sigma of the steps, what the pipeline passes at each step),
#        the pipeline's call with argument a, (argument name, its position), convention)
MORE_FAMILIES = {
    "zimage_controlnet": (
        lambda: D.ZImageControlNetModel(
            control_layers_places=[0], control_in_dim=4, dim=16, n_refiner_layers=1, n_heads=2, n_kv_heads=2
        ),
        _zimage_steps,
        # pipeline_z_image_controlnet: self.controlnet(latents_list, timestep_model_input, prompt_embeds, control)
        lambda m, a: m([r(4, 1, 8, 8)] * B, a, [r(5, 16)] * B, [r(4, 1, 8, 8)] * B, conditioning_scale=1.0),
        ("t", 1),
        "reversed_unit",
    ),
    "acestep": (
        lambda: D.AceStepTransformer1DModel(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            in_channels=8,
            audio_acoustic_hidden_dim=4,
            patch_size=2,
            sliding_window=4,
            encoder_hidden_size=16,
        ),
        _ace_step_steps,
        lambda m, a: m(
            hidden_states=r(B, 8, 4),
            timestep=a,
            timestep_r=a,
            encoder_hidden_states=r(B, 5, 16),
            context_latents=r(B, 8, 4),
            return_dict=False,
        ),
        ("timestep", 1),
        "unit",
    ),
    "longcat_audio": (
        lambda: D.LongCatAudioDiTTransformer(dit_dim=16, dit_depth=2, dit_heads=2, dit_text_dim=16, latent_dim=4),
        _inverted_flow_steps,
        lambda m, a: m(
            hidden_states=r(B, 8, 4),
            encoder_hidden_states=r(B, 5, 16),
            encoder_attention_mask=torch.ones(B, 5, dtype=torch.bool),
            timestep=a,
        ),
        ("timestep", 3),
        "reversed_unit",
    ),
    "minimax_music3": (
        lambda: D.MiniMaxMusic3Transformer1DModel(
            in_channels=4,
            condition_dim=16,
            num_layers=1,
            num_attention_heads=2,
            attention_head_dim=8,
            ff_inner_dim=32,
            rotary_dim=4,
            fourier_embedding_dim=16,
        ),
        _minimax_music3_steps,
        lambda m, a: m(hidden_states=r(B, 4, 8), timestep=a, return_dict=False, encoder_hidden_states=r(B, 5, 16)),
        ("timestep", 1),
        "reversed_unit",
    ),
    "stable_audio_3": (
        lambda: D.StableAudio3DiTModel(
            io_channels=4,
            embed_dim=16,
            depth=1,
            num_heads=2,
            cond_token_dim=16,
            global_cond_dim=16,
            local_add_cond_dim=4,
            timestep_features_dim=16,
            num_memory_tokens=2,
            use_differential_attention=False,
        ),
        _stable_audio_3_steps,
        lambda m, a: m(r(B, 4, 8), a, encoder_hidden_states=r(B, 5, 16), global_hidden_states=r(B, 16)),
        ("timestep", 1),
        "unit",
    ),
    "stable_cascade": (
        lambda: D.StableCascadeUNet(
            in_channels=4,
            out_channels=4,
            timestep_ratio_embedding_dim=16,
            conditioning_dim=16,
            block_out_channels=(16, 16),
            num_attention_heads=(2, 2),
            down_num_layers_per_block=(1, 1),
            up_num_layers_per_block=(1, 1),
            clip_text_pooled_in_channels=16,
            clip_seq=2,
            dropout=(0.0, 0.0),
            switch_level=(False,),
            timestep_conditioning_type=("sca",),
        ),
        _wuerstchen_steps,
        lambda m, a: m(sample=r(B, 4, 8, 8), timestep_ratio=a, clip_text_pooled=r(B, 1, 16), return_dict=False),
        ("timestep_ratio", 1),
        "unit",
    ),
    "wuerstchen_prior": (
        _wuerstchen_prior,
        _wuerstchen_steps,
        # pipeline_wuerstchen_prior: self.prior(latents, r=ratio, c=text_encoder_hidden_states)
        lambda m, a: m(r(B, 4, 8, 8), r=a, c=r(B, 5, 16)),
        ("r", 1),
        "unit",
    ),
    "t5film": (
        lambda: D.T5FilmDecoder(
            input_dims=4, targets_length=8, d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32, dropout_rate=0.0
        ),
        # pipeline_spectrogram_diffusion: noise_time = t / num_train_timesteps, times ones(batch)
        lambda: _ddpm_steps(ddpm_scheduler(), lambda t: (t / 1000) * torch.ones(B)),
        lambda m, a: m(
            encodings_and_masks=[(r(B, 5, 16), torch.ones(B, 5, dtype=torch.bool))],
            decoder_input_tokens=r(B, 8, 4),
            decoder_noise_time=a,
        ),
        ("decoder_noise_time", 2),
        "unit",
    ),
    "prior": (
        lambda: D.PriorTransformer(
            num_attention_heads=2,
            attention_head_dim=4,
            num_layers=1,
            embedding_dim=8,
            num_embeddings=4,
            additional_embeddings=1,
        ),
        # pipeline_kandinsky_prior: UnCLIPScheduler; self.prior(latent_model_input, timestep=t, ...)
        lambda: _ddpm_steps(D.UnCLIPScheduler(), lambda t: t),
        lambda m, a: m(r(B, 8), timestep=a, proj_embedding=r(B, 8), encoder_hidden_states=r(B, 4, 8)),
        ("timestep", 1),
        "timesteps",
    ),
    "audioldm2": (
        _audioldm2_unet,
        # pipeline_audioldm2: self.unet(latent_model_input, t, encoder_hidden_states=..., ...)
        lambda: _ddpm_steps(D.DDIMScheduler(), lambda t: t),
        lambda m, a: m(r(B, 4, 8, 8), a, encoder_hidden_states=r(B, 5, 16)),
        ("timestep", 1),
        "timesteps",
    ),
    "sana_wm_refiner": (
        lambda: D.SanaWMLTX2RefinerTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            num_layers=1,
            caption_channels=16,
            audio_in_channels=4,
            audio_out_channels=4,
            audio_num_attention_heads=2,
            audio_attention_head_dim=8,
            audio_cross_attention_dim=16,
            timestep_scale_multiplier=500,  # not T: the convention divides by the model's own
        ),
        _sana_wm_steps,
        lambda m, a: m(
            hidden_states=r(B, 6, 4),
            encoder_hidden_states=r(B, 5, 16),
            timestep=a,
            video_rotary_emb=(r(B, 6, 16), r(B, 6, 16)),
        ),
        ("timestep", 2),
        "scaled_sigma",
    ),
}


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


# ---- the conventions as functions --------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(timesteps.CONVENTIONS))
def test_conventions_are_tensor_ops_on_any_device_and_dtype(name):
    """No host sync: a meta tensor (which has no values to read) maps without error; every input dtype
    and shape gives float32 of the same shape on the same device."""
    fn = timesteps.mapping(name, None, T)
    out = fn(torch.zeros(3, device="meta"))
    assert out.device.type == "meta" and out.dtype == torch.float32 and out.shape == (3,)
    for a in (
        torch.tensor(0.5),
        torch.tensor([0.25, 0.5], dtype=torch.float16),
        torch.tensor([0.5], dtype=torch.bfloat16),
        torch.tensor([0, 1], dtype=torch.int64),
        0.5,
    ):
        y = fn(a)
        assert y.dtype == torch.float32 and y.shape == torch.as_tensor(a).shape
        assert bool(((y >= 0) & (y <= T)).all())


def test_convention_values_against_plain_formulas():
    a = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    expect = {
        "timesteps": a,
        "unit": T * a,
        "reversed_unit": T * (1 - a),
        "reversed": (T - a).clamp(0, T),
        "t_minus_1": a + 1,
        "edm_flow": T * torch.exp(4 * a) / (1 + torch.exp(4 * a)),
    }
    for name, want in expect.items():
        got = timesteps.mapping(name, None, T)(a)
        assert torch.allclose(got.double(), want.clamp(0, T), rtol=1e-6, atol=1e-4), name
    # Rounding slack: t/1000 in bfloat16 may land just past the end; clamped, not refused.
    assert timesteps.mapping("unit", None, T)(torch.tensor(1.0002)).item() == T


# ---- choosing a convention ---------------------------------------------------------------------


def test_unknown_diffusers_class_refused_naming_class_and_option():
    temporal = D.TransformerTemporalModel(num_attention_heads=2, attention_head_dim=4, in_channels=8, norm_num_groups=4)
    with pytest.raises(tlora.ConfigError, match=r"TransformerTemporalModel \(a building block.*timestep_convention"):
        tlora.inject(temporal, rank=2)
    assert tlora.adapter_of(temporal) is None
    assert not any(type(m).__name__ == "TLoraLinear" for m in temporal.modules())
    # With a convention it goes through.
    adapter = tlora.inject(temporal, rank=2, timestep_convention="timesteps")
    assert adapter.config.timestep_convention == "timesteps"


def test_ambiguous_class_refused_without_a_choice():
    model, _ = cosmos()
    with pytest.raises(tlora.ConfigError, match=r"CosmosTransformer3DModel.*edm_flow.*timestep_convention"):
        tlora.inject(model, rank=2)
    with pytest.raises(tlora.ConfigError, match=r"unknown timestep_convention 'edm2'"):
        tlora.inject(model, rank=2, timestep_convention="edm2")


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = torch.nn.Linear(8, 8)

    def forward(self, x, t):
        return self.to_q(x)


class _Wrapper(_Net):
    def forward(self, *args, **kwargs):
        return self.to_q(args[0])


class _KeywordOnly(_Net):
    def forward(self, x, *, timestep_ratio):
        return self.to_q(x)


def test_timestep_argument_comes_from_the_signature():
    """The argument is found by name and position in the forward's signature (`t` here, as
    Z-Image's), keyword-only ones by keyword, and a forward(*args, **kwargs) by keyword."""
    assert timesteps.timestep_parameter(_Net()) == ("t", 1)
    assert timesteps.timestep_parameter(_Net) == ("t", 1)  # the class: `self` does not count
    assert timesteps.timestep_parameter(_KeywordOnly()) == ("timestep_ratio", None)
    assert timesteps.timestep_parameter(_Wrapper()) is None
    x = torch.randn(B, 8)
    for model, call in (
        (_Net(), lambda m, t: m(x, t)),
        (_Net(), lambda m, t: m(x, t=t)),
        (_KeywordOnly(), lambda m, t: m(x, timestep_ratio=t)),
        (_Wrapper(), lambda m, t: m(x, timestep=t)),
    ):
        adapter = inject(model)
        assert [ranks_of_call(adapter, lambda t=t: call(model, t)) for t in (900.0, 100.0)] == [
            (r_of(900.0),) * B,
            (r_of(100.0),) * B,
        ]
    with pytest.raises(tlora.ConfigError, match=r"_Wrapper\.forward was called without a timestep"):
        with torch.no_grad():
            model(x, torch.tensor(500.0))  # positional, into *args: no name to find it by


def test_custom_callable_and_reload(tmp_path):
    """A function is used as given; files store "custom" and loading asks for it to be registered."""
    torch.manual_seed(0)
    model, kwargs = sd3()
    fn = lambda a: T - a  # noqa: E731  (this model's "pipeline" counts the other way)
    adapter = inject(model, timestep_convention=fn)
    assert adapter.config.timestep_convention == "custom"
    ts = [torch.full((B,), 900.0), torch.full((B,), 100.0)]
    assert drive(model, kwargs, lambda a: a, ts, adapter) == [(r_of(100.0),) * B, (r_of(900.0),) * B]
    path = tlora.save(model, tmp_path / "a.safetensors")
    assert tlora.read(path)[1]["config"]["timestep_convention"] == "custom"

    torch.manual_seed(0)
    other, _ = sd3()
    with pytest.raises(ValueError, match=r"register\('custom', fn\)"):
        tlora.load(other, path)
    assert tlora.adapter_of(other) is None
    timesteps.register("custom", fn)
    try:
        again = tlora.load(other, path)
        assert drive(other, kwargs, lambda a: a, ts, again) == [(r_of(100.0),) * B, (r_of(900.0),) * B]
    finally:
        timesteps._USER.pop("custom", None)


def test_timestep_scale_still_multiplies_and_is_stored(tmp_path):
    torch.manual_seed(0)
    model, kwargs = sd3()
    adapter = inject(model, timestep_scale=500.0)
    assert adapter.config.timestep_convention == "scale" and adapter.timestep_scale == 500.0
    assert drive(model, kwargs, lambda a: a, [torch.full((B,), 1.5)], adapter) == [(r_of(750.0),) * B]
    meta = tlora.read(tlora.save(model, tmp_path / "s.safetensors"))[1]
    assert meta["timestep_scale"] == 500.0
    adapter.remove()
    with pytest.raises(ValueError, match=r"timestep_scale=500.0 is the 'scale' convention.*'unit'"):
        inject(model, timestep_scale=500.0, timestep_convention="unit")


def test_files_without_a_convention_use_the_class_default():
    """Adapter files written before conventions existed have no timestep_convention: FLUX still gets
    t/1000 read as T * argument."""
    from tlora.adapter import inject_config

    model = tiny_flux_pipeline().transformer
    config = tlora.AdapterConfig.from_dict({"rank": R, "min_rank": R_MIN})
    assert config.timestep_convention is None
    adapter = inject_config(model, config)
    assert adapter.ranks_for(torch.tensor([0.25])) == [r_of(250.0)]
    assert adapter.timestep_scale == 1000.0


# Registered or refused classes that diffusers does not export at its top level, and their modules.
NOT_EXPORTED = {
    "MultiControlNetUnionModel": "diffusers.models.controlnets.multicontrolnet_union",
    "WuerstchenPrior": "diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_prior",
    "WuerstchenDiffNeXt": "diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_diffnext",
    "UTransformer2DModel": "diffusers.pipelines.deprecated.unidiffuser.modeling_uvit",
    "UNetFlatConditionModel": "diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet",
}


def diffusers_class(name: str):
    import importlib

    if name in NOT_EXPORTED:
        return getattr(importlib.import_module(NOT_EXPORTED[name]), name)
    return getattr(D, name, None)


def test_registry_names_real_classes():
    """Every registered class exists in this diffusers and its forward's signature shows the timestep
    argument; every refused one exists too."""
    for name in [*timesteps.BY_CLASS, *timesteps.AMBIGUOUS, *timesteps.REFUSED]:
        cls = diffusers_class(name)
        assert cls is not None, f"{name} is not a diffusers class"
        if name not in timesteps.REFUSED:
            assert timesteps.timestep_parameter(cls) is not None, name


def test_every_diffusers_class_with_a_timestep_is_classified_and_the_readme_lists_the_rest():
    """Each model class diffusers exports whose forward takes a time-like argument is registered,
    ambiguous (the pipeline decides) or refused with a reason, and the README names every class
    that is not simply registered."""
    from pathlib import Path

    import diffusers.models
    import diffusers.pipelines

    classified = {*timesteps.BY_CLASS, *timesteps.AMBIGUOUS, *timesteps.REFUSED}
    unclassified = []
    for package in (diffusers.models, diffusers.pipelines):
        for name in sorted({n for names in package._import_structure.values() for n in names}):
            cls = getattr(package, name, None)
            if not (isinstance(cls, type) and issubclass(cls, D.ModelMixin)):
                continue
            params = list(inspect.signature(cls.forward).parameters)[1:]
            if not any("time" in p or p in timesteps.TIMESTEP_ARGS for p in params):
                continue
            if not any(c.__name__ in classified for c in cls.__mro__):
                unclassified.append(f"{name}({', '.join(params[:4])}, ...)")
    assert not unclassified, unclassified
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Timestep conventions")[1].split("\n## ")[0]
    missing = [n for n in [*timesteps.AMBIGUOUS, *timesteps.REFUSED] if f"`{n}`" not in section]
    assert not missing, f"README's timestep section does not list {missing}"
