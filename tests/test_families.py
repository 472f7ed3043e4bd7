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

import math

import pytest
import torch

import tlora
from tlora import timesteps as conventions
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
    assert conventions.convention_for(pipe) == "edm"
    log = RankLog(inject(pipe.unet, timestep_convention=conventions.convention_for(pipe)), batch=2)
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
    name = conventions.convention_for(scheduler, model=model)
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


# ---- the conventions as functions --------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(conventions.CONVENTIONS))
def test_conventions_are_tensor_ops_on_any_device_and_dtype(name):
    """No host sync: a meta tensor (which has no values to read) maps without error; every input dtype
    and shape gives float32 of the same shape on the same device."""
    fn = conventions.mapping(name, None, T)
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
        got = conventions.mapping(name, None, T)(a)
        assert torch.allclose(got.double(), want.clamp(0, T), rtol=1e-6, atol=1e-4), name
    # Rounding slack: t/1000 in bfloat16 may land just past the end; clamped, not refused.
    assert conventions.mapping("unit", None, T)(torch.tensor(1.0002)).item() == T


# ---- choosing a convention ---------------------------------------------------------------------


def test_unknown_diffusers_class_refused_naming_class_and_option():
    prior = D.PriorTransformer(
        num_attention_heads=2,
        attention_head_dim=4,
        num_layers=1,
        embedding_dim=8,
        num_embeddings=4,
        additional_embeddings=1,
    )
    with pytest.raises(ValueError, match=r"PriorTransformer.*timestep_convention"):
        tlora.inject(prior, rank=2)
    assert tlora.adapter_of(prior) is None
    assert not any(type(m).__name__ == "TLoraLinear" for m in prior.modules())
    # With a convention it goes through.
    adapter = tlora.inject(prior, rank=2, timestep_convention="timesteps")
    assert adapter.config.timestep_convention == "timesteps"


def test_ambiguous_class_refused_without_a_choice():
    model, _ = cosmos()
    with pytest.raises(ValueError, match=r"CosmosTransformer3DModel.*edm_flow.*timestep_convention"):
        tlora.inject(model, rank=2)
    with pytest.raises(ValueError, match=r"unknown timestep_convention 'edm2'"):
        tlora.inject(model, rank=2, timestep_convention="edm2")


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
    conventions.register("custom", fn)
    try:
        again = tlora.load(other, path)
        assert drive(other, kwargs, lambda a: a, ts, again) == [(r_of(100.0),) * B, (r_of(900.0),) * B]
    finally:
        conventions._USER.pop("custom", None)


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


def test_registry_names_real_classes():
    """Every registered class exists in this diffusers and its forward takes the timestep argument."""
    import inspect

    for name in [*conventions.BY_CLASS, *conventions.AMBIGUOUS]:
        cls = getattr(D, name, None)
        assert cls is not None, f"{name} is not a diffusers class"
        params = inspect.signature(cls.forward).parameters
        assert "timestep" in params or "timesteps" in params, name
