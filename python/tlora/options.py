"""The choices and limits of tlora's options, one definition each: the library's checks and the
command line's parser both read them from here.

It imports nothing, so the parser (`tlora --help`, argument errors) loads no torch. The adapter's
own settings (variants, the rank and timestep limits) live in `tlora.config`, torch-free too.
"""

from __future__ import annotations

# Largest image side trained on or sampled (SD-XL is 1024, FLUX up to 2048).
MAX_SIDE = 4096
# Image sides are multiples of the autoencoder's stride.
SIDE_STRIDE = 8
# Seeds of training and sampling (torch generators seeded per process / per prompt from them).
MAX_SEED = 2**32 - 1

# Training.
MAX_TRAIN_STEPS = 10_000_000
PAPER_STEPS = {"tlora": 800, "vanilla": 500, "lora": 500}  # the paper's steps per variant
MAX_LR = 1.0  # the learning rate is in (0, MAX_LR]
MIXED_PRECISION = ("no", "fp16", "bf16")
# Quantized frozen bases: int8 / int4 through optimum-quanto, nf4 through bitsandbytes (tlora.adapter.quantized).
QUANTIZE = ("int8", "int4", "nf4")
# Optimizers of the adapter's factors (tlora.train.optim): torch's AdamW (the paper's), Prodigy
# (the `prodigyopt` package; the paper's FLUX setting, lr 1) and bitsandbytes' 8-bit AdamW.
OPTIMIZERS = ("adamw", "prodigy", "adamw8bit")
# Learning-rate schedules, by diffusers.optimization.get_scheduler's names.
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# Where training reports loss, lr, gradient norm and validation grids (accelerate's trackers).
REPORT_TO = ("none", "tensorboard", "wandb")
MAX_BATCH = 1024  # --train-batch-size and --gradient-accumulation-steps
MAX_CLASS_IMAGES = 100_000

# Sampling (`tlora generate`, and training's validation samples).
MAX_SAMPLE_STEPS = 1000  # denoising steps
MAX_IMAGES = 256  # per prompt
MAX_GUIDANCE = 100.0
# Each family's sampling defaults, (denoising steps, guidance scale), by tlora.train.families' Family
# names (each its stock pipeline's call defaults): the recipes read them from here, and `tlora
# generate --help` shows them.
SAMPLING_DEFAULTS = {
    "sd": (25, 7.5),
    "sdxl": (25, 5.0),
    "flux": (28, 3.5),
    "sd3": (28, 7.0),
    "sana": (20, 4.5),
    "lumina2": (30, 4.0),
    "qwenimage": (50, 4.0),  # true_cfg_scale: Qwen-Image is not guidance-distilled
    "flux2": (50, 4.0),
    "zimage": (50, 5.0),
    "chroma": (35, 5.0),
    "auraflow": (50, 3.5),
    "pixart": (20, 4.5),
    "wan": (50, 5.0),
    "flux_kontext": (28, 3.5),
    "hidream": (50, 5.0),
    "krea2": (28, 4.5),
    "ideogram4": (48, 7.0),  # its guidance_schedule: 7.0, then 3.0 for the last 3 steps
}
FAMILY_NAMES = {
    "sd": "SD 1.x/2.x",
    "sdxl": "SD-XL",
    "flux": "FLUX",
    "sd3": "SD3/3.5",
    "sana": "Sana",
    "lumina2": "Lumina2",
    "qwenimage": "Qwen-Image",
    "flux2": "Flux2 (dev, klein)",
    "zimage": "Z-Image",
    "chroma": "Chroma",
    "auraflow": "AuraFlow",
    "pixart": "PixArt-Sigma",
    "wan": "Wan (one frame)",
    "flux_kontext": "FLUX.1 Kontext",
    "hidream": "HiDream-I1",
    "krea2": "Krea 2",
    "ideogram4": "Ideogram4",
}
# How training draws its noise levels (`--timestep-sampling`): the densities of diffusers'
# training_utils.compute_density_for_timestep_sampling (its "none" is uniform; sigmoid is the
# sigmoid of a standard normal, logit_normal's default), and the mode density's scale.
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode", "sigmoid")
# Each family's default sampling: its diffusers DreamBooth LoRA script's --weighting_scheme
# (logit_normal for SD3 and Ideogram4, whose logit mean follows the resolution; "none" = uniform
# for the others).
FAMILY_SAMPLINGS = {
    "sd": "uniform",
    "sdxl": "uniform",
    "flux": "uniform",
    "sd3": "logit_normal",
    "ideogram4": "logit_normal",
}
# Each family's default target modules: its diffusers DreamBooth LoRA script's list (None: the
# attention projections, tlora.config.DEFAULT_TARGETS). Here, not in adapter/targets.py, so that
# `tlora train --help` (torch-free) states them.
FAMILY_TARGETS: dict[str, tuple[str, ...] | None] = {
    "sd": None,
    "sdxl": None,
    # train_dreambooth_lora_flux.py: attention of both streams and the double blocks' feed-forwards
    "flux": (
        "attn.to_k",
        "attn.to_q",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    ),
    # train_dreambooth_lora_sd3.py: attention of both streams
    "sd3": (
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
    ),
    "sana": ("to_k", "to_q", "to_v"),
    "lumina2": ("to_k", "to_q", "to_v", "to_out.0"),
    "qwenimage": ("to_k", "to_q", "to_v", "to_out.0"),
    # train_dreambooth_lora_flux2(_klein).py: the double blocks' attention, the single blocks' fused
    # qkv+mlp input and their attention output (single_transformer_blocks.N.attn.to_out, for every
    # N: the suffix attn.to_out, which in the double blocks names a ModuleList and adapts nothing)
    "flux2": ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj", "attn.to_out"),
    "zimage": ("to_k", "to_q", "to_v", "to_out.0"),
    # no diffusers script: Chroma is FLUX.1-derived, FLUX.1's list; AuraFlow and PixArt-Sigma: attention
    "chroma": None,
    "auraflow": None,
    "pixart": None,
    "wan": None,
    "hidream": ("to_k", "to_q", "to_v", "to_out"),
    # train_dreambooth_lora_krea2.py: every projection of the DiT and its text and time embedders,
    # but text_fusion.projector: a Linear(num_text_layers, 1) holds no rank above 1 (T-LoRA's factors
    # are orthonormal, r <= min(in, out))
    "krea2": (
        "img_in",
        "final_layer.linear",
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "to_gate",
        "ff.up",
        "ff.down",
        "txt_in.linear_1",
        "txt_in.linear_2",
        "time_embed.linear_1",
        "time_embed.linear_2",
        "time_mod_proj",
    ),
    # train_dreambooth_lora_ideogram4.py: attention and the SwiGLU feed-forward (w1, w2, w3)
    "ideogram4": ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"),
}
FAMILY_TARGETS["chroma"] = FAMILY_TARGETS["flux"]
# train_dreambooth_lora_flux_kontext.py: FLUX.1's list and the single blocks' MLP input
FAMILY_TARGETS["flux_kontext"] = (*FAMILY_TARGETS["flux"], "proj_mlp")
# The family whose default targets `tlora.inject(denoiser)` takes when none are given (a model
# without its pipeline: a training script's `unet` / `transformer`), by the denoiser's class (or a
# base class of it); other classes take tlora.config.DEFAULT_TARGETS. FLUX.1's transformer is
# also Kontext's: the text-to-image script's list.
DENOISER_FAMILIES = {
    "UNet2DConditionModel": "sd",
    "FluxTransformer2DModel": "flux",
    "SD3Transformer2DModel": "sd3",
    "SanaTransformer2DModel": "sana",
    "Lumina2Transformer2DModel": "lumina2",
    "QwenImageTransformer2DModel": "qwenimage",
    "Flux2Transformer2DModel": "flux2",
    "ZImageTransformer2DModel": "zimage",
    "ChromaTransformer2DModel": "chroma",
    "HiDreamImageTransformer2DModel": "hidream",
    "Krea2Transformer2DModel": "krea2",
    "Ideogram4Transformer2DModel": "ideogram4",
}
MODE_SCALE = 1.29
MAX_SHIFT = 1000.0  # flow matching's --shift is in (0, MAX_SHIFT]
# `tlora generate --scheduler`: name -> (diffusers class, settings over the model's scheduler config).
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
}
# The pipeline's weights: option value -> torch dtype name.
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# Static LoRA formats `tlora export` writes (tlora.files.export).
EXPORT_FORMATS = ("diffusers", "peft", "kohya")
# Evaluation prompt sets (tlora.prompt_sets): DreamBooth's and the T-LoRA paper's, for objects and pets.
PROMPT_SETS = ("object", "live", "paper-object", "paper-live")
