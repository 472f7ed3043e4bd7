"""Tiny, offline pipelines of the families tlora trains beyond SD, SD-XL and FLUX (tiny.py's),
built from configs as tiny.py builds its own: 16x16 px images, latents downsampled by 2, one or
two layers 8-32 wide; tokenizers from the `tokenizers` library (Gemma's and Qwen's as word-level
models with their special tokens). Deterministic per seed, float32 on CPU.

    pipe = tiny_family_pipeline("sd3")              # StableDiffusion3Pipeline
    save_tiny_family_pipeline("sana", folder)       # a diffusers folder from_pretrained reads
"""

from __future__ import annotations

from pathlib import Path

from .tiny import (
    _seeded,
    tiny_clip_text_model_with_projection,
    tiny_clip_tokenizer,
    tiny_t5_encoder,
    tiny_t5_tokenizer,
    tiny_vae,
)

_WORDS = ("a", "photo", "of", "the", "dog", "cat", "in", "on", "sks", "painting", "style", "red", ".", ",")


def word_tokenizer(specials: dict[str, str], max_length: int, bos: bool = False):
    """A word-level fast tokenizer over the tests' words: `specials` maps pad / eos / unk / bos
    (the roles) to their token strings; with `bos`, every sequence starts with the bos token."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in specials.values():
        vocab.setdefault(token, len(vocab))
    for w in _WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials["unk"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        b = specials["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{b} $A", pair=f"{b} $A $B", special_tokens=[(b, vocab[b])]
        )
    roles = {f"{role}_token": token for role, token in specials.items()}
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **roles)


def _gemma_tokenizer(max_length: int = 512):
    return word_tokenizer({"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>"}, max_length, bos=True)


def _gemma2(seed: int, hidden: int):
    from transformers import Gemma2Config, Gemma2Model

    tok = _gemma_tokenizer()
    cfg = Gemma2Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        attn_implementation="eager",
    )
    with _seeded(seed):
        return Gemma2Model(cfg).eval()


def _flow(shift: float = 1.0, **kw):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, **kw)


# ---- SD3 / 3.5 --------------------------------------------------------------------------------

SD3_CLIP_PROJECTION = 16  # each CLIP's pooled embedding: pooled_projection_dim = 2 x 16
SD3_JOINT_DIM = 64  # the T5 width; the two CLIPs' 32 + 32 per-token features are padded to it


def tiny_sd3_pipeline(seed: int = 0):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    with _seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=SD3_JOINT_DIM,
            caption_projection_dim=16,
            pooled_projection_dim=2 * SD3_CLIP_PROJECTION,
            pos_embed_max_size=16,
        ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=_flow(3.0),
        vae=tiny_vae(seed + 1, flux=True),
        text_encoder=tiny_clip_text_model_with_projection(seed + 2, SD3_CLIP_PROJECTION),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_clip_text_model_with_projection(seed + 3, SD3_CLIP_PROJECTION),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=tiny_t5_encoder(seed + 4, d_model=SD3_JOINT_DIM),
        tokenizer_3=tiny_t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- Sana ---------------------------------------------------------------------------------------


def tiny_dc_ae(seed: int = 0):
    from diffusers import AutoencoderDC

    with _seeded(seed):
        return AutoencoderDC(
            in_channels=3,
            latent_channels=4,
            attention_head_dim=2,
            # three stages: a stride of 4, so that Sana's 32 px minimum side gives 8x8 latents
            encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 8, 8),
            decoder_block_out_channels=(8, 8, 8),
            encoder_qkv_multiscales=((), (), (5,)),
            decoder_qkv_multiscales=((), (), (5,)),
            encoder_layers_per_block=(1, 1, 1),
            decoder_layers_per_block=(1, 1, 1),
            downsample_block_type="conv",
            upsample_block_type="interpolate",
            decoder_norm_types="rms_norm",
            decoder_act_fns="silu",
            scaling_factor=0.41407,
        ).eval()


def tiny_sana_pipeline(seed: int = 0):
    from diffusers import SanaPipeline, SanaTransformer2DModel

    with _seeded(seed):
        transformer = SanaTransformer2DModel(
            patch_size=1,
            in_channels=4,
            out_channels=4,
            num_layers=1,
            num_attention_heads=2,
            attention_head_dim=4,
            num_cross_attention_heads=2,
            cross_attention_head_dim=4,
            cross_attention_dim=8,
            caption_channels=16,
            sample_size=8,
        ).eval()
    pipe = SanaPipeline(
        tokenizer=_gemma_tokenizer(),
        text_encoder=_gemma2(seed + 2, 16),
        vae=tiny_dc_ae(seed + 1),
        transformer=transformer,
        scheduler=_flow(3.0),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- Lumina2 ------------------------------------------------------------------------------------


def tiny_stride8_vae(seed: int = 0):
    """AutoencoderKL with 4 stages (stride 8, what Lumina2's pipeline assumes), FLUX-style shift and scale."""
    from diffusers import AutoencoderKL

    with _seeded(seed):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            sample_size=32,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            shift_factor=0.0609,
            scaling_factor=1.5035,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ).eval()


def tiny_lumina2_pipeline(seed: int = 0):
    from diffusers import Lumina2Pipeline, Lumina2Transformer2DModel

    with _seeded(seed):
        transformer = Lumina2Transformer2DModel(
            sample_size=4,
            patch_size=2,
            in_channels=4,
            hidden_size=16,
            num_layers=1,
            num_refiner_layers=1,
            num_attention_heads=2,
            num_kv_heads=2,
            multiple_of=16,
            axes_dim_rope=(4, 2, 2),
            axes_lens=(64, 16, 16),
            cap_feat_dim=16,
        ).eval()
    pipe = Lumina2Pipeline(
        transformer=transformer,
        scheduler=_flow(6.0),
        vae=tiny_stride8_vae(seed + 1),
        text_encoder=_gemma2(seed + 2, 16),
        tokenizer=_gemma_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- Qwen-Image ---------------------------------------------------------------------------------


def _qwen_tokenizer():
    """Word-level, splitting punctuation off words: the pipeline's chat template then comes to 36
    tokens, of which it drops its fixed 34 (the real tokenizer's count of the template's head)."""
    from tokenizers import pre_tokenizers

    tok = word_tokenizer({"pad": "<|endoftext|>", "eos": "<|im_end|>", "unk": "<unk>"}, 1024)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def tiny_qwenimage_pipeline(seed: int = 0):
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = _qwen_tokenizer()
    with _seeded(seed):
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=16,
            out_channels=4,
            num_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=16,
            guidance_embeds=False,
            axes_dims_rope=(8, 4, 4),
        ).eval()
    with _seeded(seed + 1):
        vae = AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=4,
            dim_mult=[1, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True],
            latents_mean=[0.1, -0.2, 0.0, 0.3],
            latents_std=[1.5, 0.8, 1.0, 1.2],
        ).eval()
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "vocab_size": len(tok),
            "bos_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id,
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16,
        vocab_size=len(tok),
        bos_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    with _seeded(seed + 2):
        text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    pipe = QwenImagePipeline(
        transformer=transformer, vae=vae, scheduler=_flow(), text_encoder=text_encoder, tokenizer=tok
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- Flux2 [klein] ---------------------------------------------------------------------------------

QWEN_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_flux2_vae(seed: int = 0, latent_channels: int = 1):
    """AutoencoderKLFlux2 of stride 2; its batch norm covers the 2x2 patches' 4 x latent_channels channels."""
    from diffusers import AutoencoderKLFlux2

    with _seeded(seed):
        return AutoencoderKLFlux2(
            sample_size=16,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=8,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ).eval()


def tiny_flux2_klein_pipeline(seed: int = 0):
    """Flux2KleinPipeline. Its prompt is the Qwen3 encoder's layers 9, 18 and 27 stacked: the
    tiny encoder has 28 layers, 8 wide."""
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = _qwen_tokenizer()
    tok.chat_template = QWEN_CHAT
    with _seeded(seed):
        transformer = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=24,
            timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4),
            guidance_embeds=False,
        ).eval()
    vae = tiny_flux2_vae(seed + 1)
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=28,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=4,
        max_position_embeddings=1024,
        bos_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with _seeded(seed + 2):
        text_encoder = Qwen3ForCausalLM(config).eval()
    pipe = Flux2KleinPipeline(
        scheduler=_flow(use_dynamic_shifting=True), vae=vae, text_encoder=text_encoder, tokenizer=tok,
        transformer=transformer,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- Z-Image ------------------------------------------------------------------------------------


def tiny_zimage_pipeline(seed: int = 0):
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tok = _qwen_tokenizer()
    tok.chat_template = QWEN_CHAT
    with _seeded(seed):
        transformer = ZImageTransformer2DModel(
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
            axes_lens=[256, 64, 64],
        ).eval()
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        bos_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with _seeded(seed + 2):
        text_encoder = Qwen3Model(config).eval()
    pipe = ZImagePipeline(
        scheduler=_flow(3.0), vae=tiny_vae(seed + 1, flux=True), text_encoder=text_encoder, tokenizer=tok,
        transformer=transformer,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- Chroma, AuraFlow, PixArt-Sigma: one T5-family encoder -------------------------------------


def tiny_chroma_pipeline(seed: int = 0):
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    with _seeded(seed):
        transformer = ChromaTransformer2DModel(
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
        ).eval()
    pipe = ChromaPipeline(
        scheduler=_flow(),
        vae=tiny_vae(seed + 1, latent_channels=1, flux=True),
        text_encoder=tiny_t5_encoder(seed + 2, d_model=16),
        tokenizer=tiny_t5_tokenizer(),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_umt5_encoder(seed: int = 0, d_model: int = 16):
    from transformers import UMT5Config, UMT5EncoderModel

    from .tiny import t5_vocab_size

    cfg = UMT5Config(
        vocab_size=t5_vocab_size(),
        d_model=d_model,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_heads=2,
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
        return UMT5EncoderModel(cfg).eval()


def tiny_auraflow_pipeline(seed: int = 0):
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel

    with _seeded(seed):
        transformer = AuraFlowTransformer2DModel(
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
        ).eval()
    pipe = AuraFlowPipeline(
        tokenizer=tiny_t5_tokenizer(),
        text_encoder=tiny_umt5_encoder(seed + 2),
        vae=tiny_vae(seed + 1),
        transformer=transformer,
        scheduler=_flow(1.73),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pixart_sigma_pipeline(seed: int = 0):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    with _seeded(seed):
        transformer = PixArtTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,  # learned sigma
            num_layers=1,
            cross_attention_dim=16,
            sample_size=8,
            patch_size=2,
            caption_channels=16,
            use_additional_conditions=False,
        ).eval()
    pipe = PixArtSigmaPipeline(
        tokenizer=tiny_t5_tokenizer(),
        text_encoder=tiny_t5_encoder(seed + 2, d_model=16),
        vae=tiny_vae(seed + 1),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(num_train_timesteps=1000),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- Wan (one frame) ----------------------------------------------------------------------------


def tiny_wan_pipeline(seed: int = 0):
    """WanPipeline whose VAE has Wan's strides (8 in space, 4 in time: one frame stays one latent frame)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    with _seeded(seed + 1):
        vae = AutoencoderKLWan(
            base_dim=4,
            z_dim=4,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.1, -0.2, 0.0, 0.3],
            latents_std=[1.5, 0.8, 1.0, 1.2],
        ).eval()
    with _seeded(seed):
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            text_dim=16,
            freq_dim=16,
            ffn_dim=32,
            num_layers=1,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        ).eval()
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    pipe = WanPipeline(
        tokenizer=tiny_t5_tokenizer(),
        text_encoder=tiny_umt5_encoder(seed + 2),
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- FLUX.1 Kontext -------------------------------------------------------------------------------


def tiny_flux_kontext_pipeline(seed: int = 0):
    """FluxKontextPipeline over tiny.py's FLUX.1 components (Kontext's transformer is FLUX.1's class)."""
    from diffusers import FluxKontextPipeline

    from .tiny import tiny_flux_pipeline

    pipe = FluxKontextPipeline(**tiny_flux_pipeline(seed).components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- HiDream-I1 -----------------------------------------------------------------------------------


def tiny_hidream_pipeline(seed: int = 0):
    """HiDreamImagePipeline. Its CLIPs are called with 128 tokens (so 128 positions here), and it
    samples at the area of its default size (128 latents a side): the transformer's position table
    covers 64x64 patches."""
    from diffusers import HiDreamImagePipeline, HiDreamImageTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, LlamaConfig, LlamaForCausalLM

    from .tiny import clip_vocab_size

    clip_tok = tiny_clip_tokenizer(128)

    def clip(s):
        cfg = CLIPTextConfig(
            vocab_size=clip_vocab_size(), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=128, projection_dim=8, bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id,
        )  # fmt: skip
        with _seeded(s):
            return CLIPTextModelWithProjection(cfg).eval()

    llama_tok = word_tokenizer(
        {"pad": "<|eot_id|>", "eos": "<|eot_id|>", "bos": "<|begin_of_text|>", "unk": "<unk>"}, 128
    )
    llama_cfg = LlamaConfig(
        vocab_size=len(llama_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=llama_tok.bos_token_id,
        eos_token_id=llama_tok.eos_token_id, pad_token_id=llama_tok.pad_token_id, attn_implementation="eager",
    )  # fmt: skip
    with _seeded(seed + 5):
        llama = LlamaForCausalLM(llama_cfg).eval()
    with _seeded(seed):
        transformer = HiDreamImageTransformer2DModel(
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            caption_channels=[16, 16],  # T5 and Llama widths
            text_emb_dim=16,  # the two CLIP projections, concatenated
            num_routed_experts=2,
            num_activated_experts=1,
            axes_dims_rope=(4, 2, 2),
            max_resolution=(128, 128),
            llama_layers=(0, 1),
        ).eval()
    pipe = HiDreamImagePipeline(
        scheduler=_flow(3.0),
        vae=tiny_vae(seed + 1, flux=True),
        text_encoder=clip(seed + 2),
        tokenizer=clip_tok,
        text_encoder_2=clip(seed + 3),
        tokenizer_2=tiny_clip_tokenizer(128),
        text_encoder_3=tiny_t5_encoder(seed + 4, d_model=16),
        tokenizer_3=tiny_t5_tokenizer(128),
        text_encoder_4=llama,
        tokenizer_4=llama_tok,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- Flux2 [dev] -----------------------------------------------------------------------------------

# Message contents as Flux2Pipeline formats them: a list of {"type": "text", "text": ...} parts.
MISTRAL_CHAT = (
    "{% for m in messages %}[{{ m['role'] }}]{% for part in m['content'] %}{{ part['text'] }} {% endfor %}{% endfor %}"
)


def tiny_flux2_pipeline(seed: int = 0):
    """Flux2Pipeline with a tiny Mistral 3 (its prompt is layers 10, 20 and 30 stacked: 31
    layers, 8 wide) and a word-level tokenizer in place of the Pixtral processor (text only)."""
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tok = word_tokenizer({"pad": "<pad>", "eos": "</s>", "bos": "<s>", "unk": "<unk>"}, 1024, bos=True)
    tok.chat_template = MISTRAL_CHAT
    config = Mistral3Config(
        text_config={
            "model_type": "mistral", "vocab_size": len(tok), "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 31, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 4,
            "max_position_embeddings": 1024, "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
        },
        vision_config={
            "model_type": "pixtral", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "head_dim": 4, "image_size": 32, "patch_size": 16,
        },
        image_token_index=len(tok) - 1,
    )  # fmt: skip
    with _seeded(seed + 2):
        text_encoder = Mistral3ForConditionalGeneration(config).eval()
    klein = tiny_flux2_klein_pipeline(seed)
    with _seeded(seed):
        from diffusers import Flux2Transformer2DModel

        transformer = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=24,
            timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4),
            guidance_embeds=True,
        ).eval()
    pipe = Flux2Pipeline(
        scheduler=klein.scheduler, vae=klein.vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- Krea 2 ---------------------------------------------------------------------------------------


def tiny_krea2_pipeline(seed: int = 0):
    """Krea2Pipeline with a 2-layer Qwen3-VL text model whose layers 1 and 2 are the selected taps."""
    from diffusers import AutoencoderKLQwenImage, Krea2Pipeline, Krea2Transformer2DModel
    from transformers import Qwen3VLConfig, Qwen3VLModel

    tok = _qwen_tokenizer()
    with _seeded(seed):
        transformer = Krea2Transformer2DModel(
            in_channels=16,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=32,
            timestep_embed_dim=8,
            text_hidden_dim=16,
            num_text_layers=2,
            text_num_attention_heads=2,
            text_num_key_value_heads=1,
            text_intermediate_size=16,
            num_layerwise_text_blocks=1,
            num_refiner_text_blocks=1,
            axes_dims_rope=(4, 2, 2),
            rope_theta=1000.0,
        ).eval()
    with _seeded(seed + 1):
        vae = AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=4,
            dim_mult=[1, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True],
            latents_mean=[0.1, -0.2, 0.0, 0.3],
            latents_std=[1.5, 0.8, 1.0, 1.2],
        ).eval()
    config = Qwen3VLConfig(
        text_config={
            "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "head_dim": 8, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        vocab_size=len(tok),
    )  # fmt: skip
    with _seeded(seed + 2):
        text_encoder = Qwen3VLModel(config).eval()
    scheduler = _flow(use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=6400)
    pipe = Krea2Pipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer,
        text_encoder_select_layers=(1, 2),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- Ideogram 4 ------------------------------------------------------------------------------------

# Qwen3-VL's chat template as the pipeline calls it: a user message of {"type": "text"} parts.
QWEN_VL_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for part in m['content'] %}{{ part['text'] }}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_ideogram4_pipeline(seed: int = 0):
    """Ideogram4Pipeline. Its prompt is 13 tapped layers of Qwen3-VL (0, 3, ..., 33, 35): the tiny
    text model has 36 layers, 8 wide (features 13 x 8), with 3-axis rotary sections (2, 1, 1); the
    VAE's batch-norm statistics are set away from 0 / 1 so that the normalisation is exercised."""
    import torch
    from diffusers import Ideogram4Pipeline, Ideogram4Transformer2DModel
    from diffusers.pipelines.ideogram4.pipeline_ideogram4 import QWEN3_VL_ACTIVATION_LAYERS
    from transformers import Qwen3VLConfig, Qwen3VLModel

    tok = _qwen_tokenizer()
    tok.chat_template = QWEN_VL_CHAT
    width, taps = 8, QWEN3_VL_ACTIVATION_LAYERS
    config = Qwen3VLConfig(
        text_config={
            "hidden_size": width, "intermediate_size": 16, "num_hidden_layers": max(taps) + 1,
            "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": len(tok),
            "pad_token_id": tok.pad_token_id, "bos_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 8},
        vocab_size=len(tok),
    )  # fmt: skip
    with _seeded(seed + 2):
        text_encoder = Qwen3VLModel(config).eval()

    def transformer(s):
        with _seeded(s):
            return Ideogram4Transformer2DModel(
                in_channels=8, num_layers=1, attention_head_dim=8, num_attention_heads=2, intermediate_size=32,
                adaln_dim=8, llm_features_dim=len(taps) * width, rope_theta=10000, mrope_section=(2, 1, 1),
            ).eval()  # fmt: skip

    vae = tiny_flux2_vae(seed + 1, latent_channels=2)
    with _seeded(seed + 4), torch.no_grad():
        vae.bn.running_mean.copy_(0.2 * torch.randn(vae.bn.num_features))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.num_features))
    pipe = Ideogram4Pipeline(
        scheduler=_flow(), vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer(seed),
        unconditional_transformer=transformer(seed + 3),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


BUILDERS = {
    "ideogram4": tiny_ideogram4_pipeline,
    "krea2": tiny_krea2_pipeline,
    "flux2_dev": tiny_flux2_pipeline,
    "hidream": tiny_hidream_pipeline,
    "flux_kontext": tiny_flux_kontext_pipeline,
    "wan": tiny_wan_pipeline,
    "chroma": tiny_chroma_pipeline,
    "auraflow": tiny_auraflow_pipeline,
    "pixart": tiny_pixart_sigma_pipeline,
    "flux2": tiny_flux2_klein_pipeline,
    "zimage": tiny_zimage_pipeline,
    "sd3": tiny_sd3_pipeline,
    "sana": tiny_sana_pipeline,
    "lumina2": tiny_lumina2_pipeline,
    "qwenimage": tiny_qwenimage_pipeline,
}
FAMILY_KINDS = tuple(BUILDERS)
# The image side a tiny family trains at: 16 px, except Sana's (sides divisible by 32; its tiny
# DC-AE has stride 4), Lumina2's (the pipeline fixes the autoencoder's stride at 8) and Wan's (its
# VAE's stride is 8): 32 px give them 4x4 latents.
TRAIN_SIDE = {"sana": 32, "lumina2": 32, "wan": 32}


def train_side(kind: str) -> int:
    return TRAIN_SIDE.get(kind, 16)


def tiny_family_pipeline(kind: str, seed: int = 0):
    if kind not in BUILDERS:
        raise ValueError(f"unknown family {kind!r}: one of {', '.join(FAMILY_KINDS)}")
    return BUILDERS[kind](seed)


def save_tiny_family_pipeline(kind: str, folder, seed: int = 0) -> Path:
    folder = Path(folder)
    tiny_family_pipeline(kind, seed).save_pretrained(folder, safe_serialization=True)
    return folder
