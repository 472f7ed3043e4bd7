"""Tiny models (1 layer, 16 wide) of the diffusers families that tests/adapter/test_family_forward.py drives
forward, each built from a config, with the inputs its pipeline gives it: every builder returns
(model, keyword arguments without the timestep). FAMILIES pairs each with its scheduler and what
its pipeline passes as the timestep at scheduler step t (quoted next to each case from diffusers
0.42's pipeline source).
"""

from __future__ import annotations

import diffusers as D
import torch
from family_ranks import B, T


def r(*shape):
    return torch.randn(*shape)


def flow(shift=1.0, **kw):
    return D.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, **kw)


def flow_dpm(cls):
    return cls(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def expand(t):
    return t.expand(B)


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


def _mochi_steps(scheduler, n):
    from diffusers.pipelines.mochi.pipeline_mochi import linear_quadratic_schedule, retrieve_timesteps

    retrieve_timesteps(scheduler, n, "cpu", sigmas=linear_quadratic_schedule(n, 0.025))


def ddpm_scheduler():
    return D.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


# name: (builder, scheduler, passes(t) as the pipeline writes it, set_timesteps override or None);
# the noise level of scheduler step t is t but where NOISE_LEVEL says otherwise.
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
