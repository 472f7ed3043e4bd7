"""Tiny, offline, seeded diffusers components and pipelines, for tests (ours and users').

Everything is built from configs (nothing comes from a model hub): the CLIP tokenizers from a
hand-written vocab.json + merges.txt, the T5 tokenizer (a T5TokenizerFast) from a `tokenizers` Unigram model. Each
builder is deterministic for a given seed (it draws from a forked RNG, so the caller's global torch
RNG state is left alone) and returns float32 modules on CPU, small enough that a few denoising
steps take milliseconds.

    pipe = tiny_sd_pipeline()                 # StableDiffusionPipeline, DDIM
    pipe = tiny_sdxl_pipeline()               # StableDiffusionXLPipeline, Euler
    pipe = tiny_flux_pipeline()               # FluxPipeline, flow-matching Euler
    save_tiny_pipeline("sd", folder)          # a diffusers folder DiffusionPipeline.from_pretrained reads

Sizes the tests rely on: images are IMAGE_SIZE x IMAGE_SIZE pixels, the VAE downsamples by 2, so
SD/SD-XL latents are (4, LATENT_SIZE, LATENT_SIZE) and FLUX latents (1, LATENT_SIZE, LATENT_SIZE),
packed into (LATENT_SIZE/2)^2 tokens of 4 channels. Prompts tokenize to TOKENS tokens.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

IMAGE_SIZE = 16
LATENT_SIZE = 8
TOKENS = 16  # CLIP model_max_length, and the T5 max_sequence_length the FLUX pipeline is called with
T5_MAX_LENGTH = 32
CLIP_POSITIONS = 77
KINDS = ("sd", "sdxl", "flux")

# Denoiser call arguments implied by the configs below.
SD_CROSS_DIM = 32
SDXL_CROSS_DIM = 64  # text_encoder hidden (32) + text_encoder_2 hidden (32)
SDXL_POOLED_DIM = 32  # text_encoder_2 projection_dim
FLUX_JOINT_DIM = 32
FLUX_POOLED_DIM = 32


@contextlib.contextmanager
def _seeded(seed: int):
    """Run a block with the global torch RNG seeded, restoring the caller's RNG state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ---- tokenizers -------------------------------------------------------------------------------

_CLIP_WORDS = ("a", "photo", "of", "the", "dog", "cat", "in", "on", "sks", "painting", "style", "red")


def tiny_clip_tokenizer(max_length: int = TOKENS):
    from ..demo.tokenizer import clip_tokenizer

    return clip_tokenizer(_CLIP_WORDS, max_length)


def clip_vocab_size() -> int:
    from ..demo.tokenizer import vocab_and_merges

    return len(vocab_and_merges(_CLIP_WORDS)[0])


_T5_WORDS = ("a", "photo", "of", "the", "dog", "cat", "in", "on", "sks", "painting", "style", "red", ".", ",")


def tiny_t5_tokenizer(max_length: int = T5_MAX_LENGTH):
    """A T5TokenizerFast (what FLUX pipelines ship, and diffusers' FLUX training script loads from
    tokenizer_2/) over a `tokenizers` Unigram model of whole words: <pad> 0, </s> 1, <unk> 2,
    then each word of _T5_WORDS as one piece, no sentinel tokens."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    for w in dict.fromkeys(_T5_WORDS):
        vocab.append(("\u2581" + w, -1.0))  # SentencePiece's word-start mark, as in T5's own vocabulary
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def t5_vocab_size() -> int:
    return 3 + len(set(_T5_WORDS))


# ---- text encoders ----------------------------------------------------------------------------


def _clip_config(projection_dim: int = 32):
    from transformers import CLIPTextConfig

    tok = tiny_clip_tokenizer()
    return CLIPTextConfig(
        vocab_size=clip_vocab_size(),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        # CLIP's own 77 positions: diffusers' FLUX training script pads prompts to 77 tokens; the
        # tokenizers' model_max_length (TOKENS) is what the pipelines pad to.
        max_position_embeddings=CLIP_POSITIONS,
        projection_dim=projection_dim,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def tiny_clip_text_model(seed: int = 0, projection_dim: int = 32):
    from transformers import CLIPTextModel

    with _seeded(seed):
        return CLIPTextModel(_clip_config(projection_dim)).eval()


def tiny_clip_text_model_with_projection(seed: int = 0, projection_dim: int = SDXL_POOLED_DIM):
    from transformers import CLIPTextModelWithProjection

    with _seeded(seed):
        return CLIPTextModelWithProjection(_clip_config(projection_dim)).eval()


def tiny_t5_encoder(seed: int = 0, d_model: int = FLUX_JOINT_DIM):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=t5_vocab_size(),
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with _seeded(seed):
        return T5EncoderModel(cfg).eval()


# ---- denoisers and VAEs -----------------------------------------------------------------------


def tiny_sd_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    with _seeded(seed):
        return UNet2DConditionModel(
            sample_size=LATENT_SIZE,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(16, 32),
            norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=SD_CROSS_DIM,
            attention_head_dim=4,
        ).eval()


def tiny_sdxl_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    time_dim = 8
    with _seeded(seed):
        return UNet2DConditionModel(
            sample_size=LATENT_SIZE,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(16, 32),
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=SDXL_CROSS_DIM,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 1),
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            # 6 micro-conditioning values (original size, crop, target size) + the pooled text embedding
            projection_class_embeddings_input_dim=6 * time_dim + SDXL_POOLED_DIM,
        ).eval()


def tiny_flux_transformer(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    with _seeded(seed):
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=FLUX_JOINT_DIM,
            pooled_projection_dim=FLUX_POOLED_DIM,
            guidance_embeds=False,
            axes_dims_rope=[4, 4, 8],
        ).eval()


def tiny_vae(seed: int = 0, latent_channels: int = 4, flux: bool = False):
    from diffusers import AutoencoderKL

    extra = (
        dict(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)
        if flux
        else {}
    )
    with _seeded(seed):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=latent_channels,
            sample_size=IMAGE_SIZE,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            **extra,
        ).eval()


def denoiser(pipe) -> torch.nn.Module:
    """The module T-LoRA adapts: the UNet, or the FLUX transformer."""
    return pipe.transformer if hasattr(pipe, "transformer") else pipe.unet


# ---- pipelines --------------------------------------------------------------------------------


def tiny_sd_pipeline(seed: int = 0, scheduler: str = "ddim"):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    common = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    if scheduler == "ddim":
        sched = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **common)
    elif scheduler == "euler":
        sched = EulerDiscreteScheduler(**common)
    else:
        raise ValueError(f"unknown scheduler {scheduler!r}: ddim or euler")
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed + 1),
        text_encoder=tiny_clip_text_model(seed + 2),
        tokenizer=tiny_clip_tokenizer(),
        unet=tiny_sd_unet(seed),
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    sched = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(seed + 1),
        text_encoder=tiny_clip_text_model(seed + 2),
        text_encoder_2=tiny_clip_text_model_with_projection(seed + 3),
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        unet=tiny_sdxl_unet(seed),
        scheduler=sched,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
        vae=tiny_vae(seed + 1, latent_channels=1, flux=True),
        text_encoder=tiny_clip_text_model(seed + 2, projection_dim=FLUX_POOLED_DIM),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_t5_encoder(seed + 3),
        tokenizer_2=tiny_t5_tokenizer(),
        transformer=tiny_flux_transformer(seed),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


BUILDERS = {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline, "flux": tiny_flux_pipeline}
DENOISER_BUILDERS = {"sd": tiny_sd_unet, "sdxl": tiny_sdxl_unet, "flux": tiny_flux_transformer}


def tiny_pipeline(kind: str, seed: int = 0):
    if kind not in BUILDERS:
        raise ValueError(f"unknown pipeline kind {kind!r}: one of {', '.join(KINDS)}")
    return BUILDERS[kind](seed)


def tiny_denoiser(kind: str, seed: int = 0) -> torch.nn.Module:
    """Only the denoiser of `tiny_pipeline(kind, seed)` (the same weights), without the rest."""
    if kind not in DENOISER_BUILDERS:
        raise ValueError(f"unknown pipeline kind {kind!r}: one of {', '.join(KINDS)}")
    return DENOISER_BUILDERS[kind](seed)


def sample_kwargs(kind: str, steps: int = 3) -> dict:
    """Arguments for a quick sampling call of `tiny_pipeline(kind)`."""
    kw = dict(prompt="a photo of sks dog", num_inference_steps=steps, height=IMAGE_SIZE, width=IMAGE_SIZE)
    if kind == "flux":
        kw["max_sequence_length"] = TOKENS
    return kw


def save_tiny_pipeline(kind: str, folder, seed: int = 0) -> Path:
    """Build `tiny_pipeline(kind, seed)` and write it as a diffusers folder (safetensors weights,
    configs, tokenizer files) that `DiffusionPipeline.from_pretrained(folder)` loads offline."""
    folder = Path(folder)
    tiny_pipeline(kind, seed).save_pretrained(folder, safe_serialization=True)
    return folder


# ---- scoring models for `tlora evaluate` (random weights: the scores mean nothing) ------------

EVAL_IMAGE_SIZE = 32  # what the tiny CLIP / DINO image processors resize and crop to
EVAL_TOKENS = 32


def save_tiny_clip(folder, seed: int = 0) -> Path:
    """A randomly initialised CLIPModel with its CLIPProcessor (image processor + word-level tokenizer)
    saved to `folder`, readable by CLIPModel/CLIPProcessor.from_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = tiny_clip_tokenizer(EVAL_TOKENS)
    text = dict(
        vocab_size=clip_vocab_size(),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=EVAL_TOKENS,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=EVAL_IMAGE_SIZE,
        patch_size=8,
    )
    with _seeded(seed):
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    images = CLIPImageProcessor(
        size={"shortest_edge": EVAL_IMAGE_SIZE}, crop_size={"height": EVAL_IMAGE_SIZE, "width": EVAL_IMAGE_SIZE}
    )
    folder = Path(folder)
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    return folder


def save_tiny_dino(folder, seed: int = 0) -> Path:
    """A randomly initialised Dinov2Model with DINOv2's image processor (BitImageProcessor) saved to `folder`."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    with _seeded(seed):
        model = Dinov2Model(
            Dinov2Config(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                mlp_ratio=2,
                image_size=EVAL_IMAGE_SIZE,
                patch_size=8,
            )
        ).eval()
    folder = Path(folder)
    model.save_pretrained(folder)
    BitImageProcessor(
        size={"shortest_edge": EVAL_IMAGE_SIZE},
        crop_size={"height": EVAL_IMAGE_SIZE, "width": EVAL_IMAGE_SIZE},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    return folder
