"""Tiny models of the diffusers families whose timestep argument has another name or position, or
which were refused before (MORE_FAMILIES, for tests/adapter/test_family_calls.py): each with the noise
fractions of its pipeline's steps, what the pipeline passes at each step, and the pipeline's call.
"""

from __future__ import annotations

import diffusers as D
import torch
from family_models import ddpm_scheduler, flow, r
from family_ranks import B, T


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
