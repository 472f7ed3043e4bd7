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
# Each family's sampling defaults, (denoising steps, guidance scale), by tlora.train.recipes' Family
# names: the recipes read them from here, and `tlora generate --help` shows them.
SAMPLING_DEFAULTS = {"sd": (25, 7.5), "sdxl": (25, 5.0), "flux": (28, 3.5)}
FAMILY_NAMES = {"sd": "SD 1.x/2.x", "sdxl": "SD-XL", "flux": "FLUX"}
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
# DreamBooth's context prompt sets (tlora.evaluate.PAPER_PROMPTS).
PROMPT_SETS = ("object", "live")
