"""The `tlora` command line. Each subcommand is a thin wrapper over the Python API of the same name.

The parser imports no torch (only `tlora.options`, `tlora.config` and `tlora.errors`), so `tlora
--help`, `tlora COMMAND --help` and argument errors are quick; a command's handler imports what it
runs. Each option's dest is the library's name for it (`--reference` sets `references`), so the
handlers pass options through and an error about a setting is shown with the flag the user typed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from pathlib import Path

from .config import (
    DEFAULT_RANK_BOUNDARY,
    DEFAULT_TARGETS,
    INIT_SOURCES,
    INITS,
    MAX_RANK,
    MAX_TIMESTEPS,
    MIN_TIMESTEPS,
    RANK_SCALINGS,
    RANK_SCHEDULES,
    VARIANTS,
)
from .errors import InputError
from .options import (
    DTYPES,
    EXPORT_FORMATS,
    FAMILY_NAMES,
    FAMILY_SAMPLINGS,
    FAMILY_TARGETS,
    LR_SCHEDULERS,
    MAX_BATCH,
    MAX_CLASS_IMAGES,
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_LR,
    MAX_SAMPLE_STEPS,
    MAX_SEED,
    MAX_SHIFT,
    MAX_SIDE,
    MAX_TRAIN_STEPS,
    MIXED_PRECISION,
    OPTIMIZERS,
    PAPER_STEPS,
    PROMPT_SETS,
    QUANTIZE,
    REPORT_TO,
    SAMPLING_DEFAULTS,
    SCHEDULERS,
    SIDE_STRIDE,
    TIMESTEP_SAMPLINGS,
)

DESCRIPTION = """\
T-LoRA: customize a text-to-image diffusion model from ONE image without overfitting.
High-noise timesteps train only a few ranks, so the adapter learns the subject, not the photo's
layout and background.

  tlora demo                                  fine-tune the bundled tiny model, LoRA vs T-LoRA
  tlora train --model M --image dog.jpg --token sks --class-name dog --out runs/dog
  tlora generate --model M --adapter runs/dog/adapter.safetensors --prompt "a {} on a beach" --out out/
  tlora info runs/dog/adapter.safetensors     what an adapter file holds
  tlora export --adapter A --format diffusers --out lora.safetensors   bake into a static LoRA
  tlora import --adapter ref.safetensors --model M --out tlora.safetensors   read another tool's T-LoRA
"""


def _int(lo: int, hi: int | None = None):
    """An argparse type: an integer in lo..hi (exit 2 with a message otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(
                f"must be an integer {f'>= {lo}' if hi is None else f'in {lo}..{hi}'}, got {value}"
            )
        return value

    return parse


def _float(lo: float, hi: float | None = None, lo_inclusive: bool = True):
    """An argparse type: a finite number in [lo, hi] ((lo, hi] without lo_inclusive)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        low = f"{'>=' if lo_inclusive else '>'} {lo:g}" + ("" if hi is None else f" and <= {hi:g}")
        if not math.isfinite(value) or (value < lo if lo_inclusive else value <= lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be a finite number {low}, got {text}")
        return value

    return parse


def _side(text: str) -> int:
    value = _int(SIDE_STRIDE, MAX_SIDE)(text)
    if value % SIDE_STRIDE:
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of {SIDE_STRIDE} (the autoencoder's stride)")
    return value


def _paper_steps() -> str:
    """ "800 (tlora), 500 (vanilla, lora)": PAPER_STEPS for the --steps help."""
    by_steps: dict[int, list[str]] = {}
    for variant, steps in PAPER_STEPS.items():
        by_steps.setdefault(steps, []).append(variant)
    return ", ".join(f"{steps} ({', '.join(variants)})" for steps, variants in by_steps.items())


def _family_defaults(which: int) -> str:
    """ "SD 1.x/2.x 25, SD-XL 25, FLUX 28": each family's sampling default (0 steps, 1 guidance)."""
    return ", ".join(f"{FAMILY_NAMES[f]} {d[which]}" for f, d in SAMPLING_DEFAULTS.items())


def _family_samplings() -> str:
    """ "SD3 logit_normal, others uniform": each family's default timestep sampling."""
    special = [f"{FAMILY_NAMES[f]} {s}" for f, s in FAMILY_SAMPLINGS.items() if s != "uniform"]
    return ", ".join([*special, "others uniform"])


def _family_targets() -> str:
    """Each family's default target modules, for the --target-modules help."""
    by_list: dict[tuple[str, ...], list[str]] = {}
    for f, targets in FAMILY_TARGETS.items():
        by_list.setdefault(targets or DEFAULT_TARGETS, []).append(FAMILY_NAMES[f])
    return "; ".join(f"{', '.join(names)}: {' '.join(t)}" for t, names in by_list.items())


def _shift(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    return _float(0, MAX_SHIFT, lo_inclusive=False)(text)


class _Defaults(argparse.HelpFormatter):
    """Shows each option's default after its help: every default that is a value (not None, not a
    flag's False, not an empty string or list), unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and default is not argparse.SUPPRESS
            and default is not None
            and default is not False
            and default not in ("", [])
            and "default" not in text
        ):
            text += " (default: %(default)s)"
        return text


class _RawDefaults(_Defaults, argparse.RawDescriptionHelpFormatter):
    """_Defaults for the subcommands whose descriptions are laid out by hand (demo)."""


SEED = _int(0, MAX_SEED)


class _DeprecatedMethod(argparse.Action):
    """`--variant tlora|vanilla|lora`, the old spelling of --method: accepted with a note."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(
            f"tlora train: note: --variant {values} is now --method {values} (--weights-variant is diffusers' "
            "weights variant)",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def _beta(text: str) -> float:
    value = _float(0, 1)(text)
    if value == 1:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 and < 1, got {text}")
    return value


DEVICE_HELP = "auto (default: CUDA when available, else the CPU), cpu, cuda or cuda:N"


def _train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="train an adapter from one image",
        description="Train a T-LoRA adapter on one photo of a subject (paper defaults).",
    )
    p.add_argument(
        "--config",
        metavar="TOML",
        help="a TOML file of these options (lr = 1e-4, train-batch-size = 2, validation-prompt = [...]); "
        "the command line overrides it",
    )
    p.add_argument(
        "--model", required=True, help=f"local diffusers folder or hub id ({', '.join(FAMILY_NAMES.values())})"
    )
    p.add_argument("--image", help="the training photo")
    p.add_argument("--image-dir", help="a folder of photos instead of one")
    p.add_argument("--token", required=True, help="rare word that will name the subject, e.g. sks")
    p.add_argument("--class-name", required=True, help="the subject's class, e.g. dog")
    p.add_argument("--out", required=True, help="output folder (adapter, checkpoints, samples, logs)")
    p.add_argument(
        "--variant",
        dest="variant",
        choices=VARIANTS,
        default=argparse.SUPPRESS,
        action=_DeprecatedMethod,
        help="deprecated spelling of --method (use --weights-variant for diffusers' weights variant)",
    )
    p.add_argument(
        "--method",
        dest="variant",
        default="tlora",
        choices=VARIANTS,
        help="tlora: ranks by timestep; vanilla, lora: the baselines",
    )
    p.add_argument("--rank", type=_int(1, MAX_RANK), default=64, help="adapter rank r (at t = 0)")
    p.add_argument("--min-rank", type=_int(1, MAX_RANK), default=None, help="rank at t = T (default rank // 2)")
    p.add_argument(
        "--rank-exponent",
        type=_float(0, 1000, lo_inclusive=False),
        default=1.0,
        help="exponent a of the power schedule r(t) = floor(((T - t)/T)^a (r - r_min)) + r_min",
    )
    p.add_argument(
        "--rank-schedule",
        choices=RANK_SCHEDULES,
        default="power",
        help="shape of r(t): power (the paper's, with --rank-exponent), cosine (floor(cos(pi t / 2T) (r - r_min)) "
        "+ r_min) or step (r below --rank-boundary, r_min from it)",
    )
    p.add_argument(
        "--rank-boundary",
        type=_float(0, 1, lo_inclusive=False),
        default=DEFAULT_RANK_BOUNDARY,
        help="the step schedule's boundary as a fraction of T (default 0.875: full rank for t < 875 of 1000)",
    )
    p.add_argument(
        "--rank-scaling",
        choices=RANK_SCALINGS,
        default="none",
        help="none (the paper's: one scale at every rank) or rank (the update at rank r(t) scaled by r / r(t))",
    )
    p.add_argument("--steps", type=_int(1, MAX_TRAIN_STEPS), default=None, help=f"default {_paper_steps()}")
    p.add_argument("--lr", type=_float(0, MAX_LR, lo_inclusive=False), default=1e-4, help="learning rate (AdamW)")
    p.add_argument("--resolution", type=_side, default=None, help="default: the model's native size")
    p.add_argument(
        "--mixed-precision",
        default="no",
        choices=MIXED_PRECISION,
        help="weights of the frozen model in fp16/bf16 with autocast (the adapter stays float32); fp16 needs a GPU",
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--seed", type=SEED, default=0, help="seed of initialisation, timesteps and noise")
    p.add_argument("--checkpoint-every", type=_int(1), default=100, help="steps between checkpoints")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest checkpoint (same settings; a new --lr is applied)",
    )
    which.add_argument("--overwrite", action="store_true", help="replace another run's files in --out")
    p.add_argument(
        "--validation-prompt",
        dest="validation_prompts",
        metavar="PROMPT",
        action="append",
        default=[],
        help="prompt of validation samples, with {} for the concept, e.g. 'a {} in the jungle'; repeatable",
    )
    p.add_argument(
        "--validation-prompts",
        dest="validation_prompts_joined",
        metavar="PROMPTS",
        default=None,
        help='deprecated: "#"-separated prompts (use --validation-prompt, repeated)',
    )
    p.add_argument(
        "--validation-every",
        type=_int(1),
        default=None,
        help="steps between validation samples (default: --checkpoint-every)",
    )
    p.add_argument(
        "--validation-steps", type=_int(1, MAX_SAMPLE_STEPS), default=None, help="denoising steps of validation samples"
    )
    p.add_argument("--mask", help="subject mask (white = subject): the loss sees only these pixels")
    p.add_argument("--prior-dir", help="class images for DreamBooth prior preservation")
    p.add_argument("--prior-weight", type=_float(0, 1000), default=1.0, help="weight of the prior images' loss")
    p.add_argument("--gradient-checkpointing", action="store_true", help="less memory, slower steps")
    p.add_argument(
        "--target-modules",
        nargs="+",
        default=None,
        help=f"module name suffixes to adapt (default: {_family_targets()})",
    )
    p.add_argument(
        "--quantize",
        default=None,
        choices=QUANTIZE,
        help="keep the denoiser's Linear layers quantized and frozen: int8/int4 (optimum-quanto), "
        "nf4 (bitsandbytes, GPU)",
    )
    g = p.add_argument_group("model")
    g.add_argument("--revision", default=None, help="the model's hub revision (branch, tag or commit)")
    g.add_argument(
        "--weights-variant", default=None, help="diffusers' weights variant, e.g. fp16 (files NAME.fp16.safetensors)"
    )
    g.add_argument(
        "--pretrained-vae", default=None, help="another VAE (folder or hub id), e.g. madebyollin/sdxl-vae-fp16-fix"
    )
    g = p.add_argument_group("adapter")
    g.add_argument(
        "--lora-alpha",
        type=_float(0, lo_inclusive=False),
        default=None,
        help="scale the update by alpha / rank (default: 1)",
    )
    g.add_argument("--init", default="last", choices=INITS, help="which SVD triplets initialise P, lambda, Q (tlora)")
    g.add_argument(
        "--init-from", default="random", choices=INIT_SOURCES, help="SVD of a random matrix or of the weight (tlora)"
    )
    p.add_argument(
        "--timestep-sampling",
        default=None,
        choices=TIMESTEP_SAMPLINGS,
        help="density of the noise levels trained on (default: the family's diffusers script's: "
        f"{_family_samplings()})",
    )
    p.add_argument(
        "--shift",
        type=_shift,
        default=None,
        help="flow matching: sigma -> k sigma / (1 + (k - 1) sigma); auto: by resolution, as the pipeline "
        "samples (default: the scheduler's static shift, none with use_dynamic_shifting; Ideogram4's logit_normal: "
        "by resolution, side / 512, as its script)",
    )
    _optimization_options(p)
    return p


def _optimization_options(p: argparse.ArgumentParser) -> None:
    """The optimizer, schedule, EMA, batch, prompts and logging options of `tlora train`, named as in
    diffusers' DreamBooth scripts. Text-encoder training is left out: T-LoRA adapts the denoiser only."""
    unit = _float(0, 1)
    g = p.add_argument_group("optimizer and schedule")
    g.add_argument(
        "--optimizer",
        default="adamw",
        choices=OPTIMIZERS,
        help="adamw (torch); prodigy (pip install prodigyopt; use --lr 1); adamw8bit (bitsandbytes)",
    )
    g.add_argument("--adam-beta1", type=_beta, default=0.9, help="beta1 of AdamW, 8-bit AdamW and Prodigy")
    g.add_argument("--adam-beta2", type=_beta, default=0.999, help="beta2 of AdamW, 8-bit AdamW and Prodigy")
    g.add_argument("--adam-weight-decay", type=unit, default=1e-4, help="weight decay of the factors")
    g.add_argument(
        "--adam-epsilon", type=_float(0, 1, lo_inclusive=False), default=1e-8, help="epsilon of the optimizer"
    )
    g.add_argument("--prodigy-beta3", type=_beta, default=None, help="Prodigy's beta3 (default: sqrt(beta2))")
    for name, what in (
        ("decouple", "AdamW-style decoupled weight decay"),
        ("use-bias-correction", "Adam's bias correction"),
        ("safeguard-warmup", "leave the lr out of the step size's estimate during warm-up"),
    ):
        g.add_argument(
            f"--prodigy-{name}", action=argparse.BooleanOptionalAction, default=True, help=f"Prodigy: {what}"
        )
    g.add_argument(
        "--max-grad-norm",
        type=_float(0, lo_inclusive=False),
        default=None,
        help="clip the gradient norm (default: no clipping)",
    )
    g.add_argument("--lr-scheduler", default="constant", choices=LR_SCHEDULERS, help="diffusers' get_scheduler")
    g.add_argument("--lr-warmup-steps", type=_int(0, MAX_TRAIN_STEPS), default=0, help="steps of linear warm-up")
    g.add_argument("--lr-num-cycles", type=_int(1, MAX_TRAIN_STEPS), default=1, help="cosine_with_restarts' cycles")
    g.add_argument("--lr-power", type=_float(0, 100, lo_inclusive=False), default=1.0, help="polynomial's power")
    g.add_argument(
        "--ema-decay",
        type=_float(0, 1, lo_inclusive=False),
        default=None,
        help="keep an EMA of the factors: validation and adapter.safetensors use it, checkpoints keep both",
    )
    g.add_argument(
        "--train-batch-size",
        type=_int(1, MAX_BATCH),
        default=1,
        help="samples per step, each with its own timestep, noise (and rank r(t)): of the one image, or "
        "drawn from --image-dir",
    )
    g.add_argument(
        "--gradient-accumulation-steps", type=_int(1, MAX_BATCH), default=1, help="batches per optimizer step"
    )
    g = p.add_argument_group("prompts")
    g.add_argument(
        "--instance-prompt",
        default="a photo of {token} {class}",
        help="training prompt; {token} and {class} are --token and --class-name. In --image-dir, NAME.txt "
        "beside NAME.png is that image's caption",
    )
    g.add_argument("--class-prompt", default="a photo of {class}", help="prompt of the --prior-dir images")
    g.add_argument("--caption-dropout", type=unit, default=0.0, help="probability of training on the empty prompt")
    g = p.add_argument_group("data")
    g.add_argument("--random-flip", action="store_true", help="train on the images' mirror images too")
    g.add_argument(
        "--num-class-images",
        type=_int(0, MAX_CLASS_IMAGES),
        default=0,
        help="sample prior images with the base model (--class-prompt) until --prior-dir holds this many",
    )
    g = p.add_argument_group("loss")
    g.add_argument("--noise-offset", type=_float(0, 10), default=0.0, help="per-channel offset of the noise")
    g.add_argument(
        "--snr-gamma", type=_float(0, 1000, lo_inclusive=False), default=None, help="min-SNR weighting (SD, SD-XL)"
    )
    g = p.add_argument_group("logging and files")
    g.add_argument(
        "--report-to",
        default="none",
        choices=REPORT_TO,
        help="accelerate's trackers, in --out/logs (wandb: if installed)",
    )
    g.add_argument("--checkpoints-total-limit", type=_int(1), default=None, help="keep only the newest N checkpoints")


def _generate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "generate",
        help="sample images with an adapter",
        description="Sample a stock diffusers pipeline with a T-LoRA adapter.",
    )
    p.add_argument("--model", required=True, help="the base model the adapter was trained on")
    p.add_argument("--adapter", required=True, help="adapter .safetensors file")
    p.add_argument(
        "--prompt",
        dest="prompts",
        metavar="PROMPT",
        action="append",
        required=True,
        help="prompt with {} for the concept; repeatable",
    )
    p.add_argument("-n", type=_int(1, MAX_IMAGES), default=4, help="images per prompt")
    p.add_argument(
        "--steps",
        type=_int(1, MAX_SAMPLE_STEPS),
        default=None,
        help=f"denoising steps (default by family: {_family_defaults(0)})",
    )
    p.add_argument(
        "--guidance",
        type=_float(0, MAX_GUIDANCE),
        default=None,
        help=f"guidance scale (default by family: {_family_defaults(1)})",
    )
    p.add_argument("--seed", type=SEED, default=0, help="seed of the first prompt's noise (prompt i: seed + i)")
    p.add_argument("--height", type=_side, default=None, help=f"multiple of {SIDE_STRIDE}, at most {MAX_SIDE}")
    p.add_argument("--width", type=_side, default=None, help=f"multiple of {SIDE_STRIDE}, at most {MAX_SIDE}")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=list(DTYPES),
        help="the pipeline's weights (the adapter stays float32); fp16 needs a GPU",
    )
    p.add_argument("--negative-prompt", default=None, help="what guidance steers away from, e.g. 'blurry, lowres'")
    p.add_argument("--scheduler", default=None, choices=list(SCHEDULERS), help="sampler (default: the model's)")
    p.add_argument(
        "--adapter-scale", type=_float(0, 10), default=1.0, help="strength of the adapter's update (0: the base model)"
    )
    p.add_argument("--out", required=True, help="output folder for PNGs and grid.png")
    return p


# Why `tlora export` writes a rank-2k LoRA for a rank-k T-LoRA (tlora.files.export).
DIFFERENCE_FORM = (
    "A rank-k T-LoRA becomes a rank-2k LoRA: its update s (P L Q - P0 L0 Q0) (L = diag(lambda)) is "
    "written exactly in the difference form A = [Q; Q - Q0], B = s [P L - P0 L0, P0 L0]."
)


def _export_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export",
        help="bake an adapter into a static LoRA (diffusers, peft, kohya)",
        description="Bake a T-LoRA adapter at one rank into a standard LoRA that stock loaders read. "
        f"{DIFFERENCE_FORM} A static LoRA uses that rank at every timestep: the per-timestep ranks are lost.",
    )
    p.add_argument("--adapter", required=True, help="tlora adapter .safetensors file")
    p.add_argument(
        "--format",
        required=True,
        choices=EXPORT_FORMATS,
        help="diffusers: pipe.load_lora_weights(file); peft: PeftModel.from_pretrained(denoiser, folder); "
        "kohya: lora_unet_* keys (SD/SD-XL UNets)",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--timestep", type=_float(0), default=None, help="bake rank r(t), t on the training scale 0..T")
    which.add_argument("--rank", type=_int(1), default=None, help="bake this rank (default: full rank, r(0))")
    p.add_argument("--out", required=True, help=".safetensors file (peft: a folder)")
    return p


def _import_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "import",
        help="convert a reference-code or LyCORIS T-LoRA file to a tlora adapter",
        description="Read a T-LoRA checkpoint of the reference code (SD-XL processor weights) or a "
        "LyCORIS tlora state dict (safetensors only) and write it as a tlora adapter file.",
    )
    p.add_argument("--adapter", required=True, help="the other tool's .safetensors file")
    p.add_argument("--model", required=True, help="the base model it was trained on (diffusers folder or hub id)")
    p.add_argument("--out", required=True, help="tlora adapter .safetensors file to write")
    p.add_argument(
        "--min-rank", type=_int(1), default=None, help="rank at t = T (default: the file's metadata, else rank // 2)"
    )
    p.add_argument(
        "--rank-exponent",
        type=_float(0, 1000, lo_inclusive=False),
        default=None,
        help="default: the file's metadata, else 1.0",
    )
    p.add_argument(
        "--num-train-timesteps",
        type=_int(MIN_TIMESTEPS, MAX_TIMESTEPS),
        default=None,
        help="default: the file's metadata, else 1000",
    )
    p.add_argument(
        "--reconstruct-base",
        action="store_true",
        help="LyCORIS files without base_q/base_p/base_lambda: rebuild them from the model's weights "
        "(right only for LyCORIS's default init)",
    )
    return p


def _evaluate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "evaluate",
        help="CLIP-I, CLIP-T and DINO scores of generated images",
        description="Score generated images as the paper does: CLIP-I and DINO (cosine to the reference "
        "image, its background masked when --mask is given) and CLIP-T (cosine to the prompt). "
        "Writes evaluation.json and evaluation.md (per prompt and overall mean).",
    )
    p.add_argument(
        "--generated",
        default=None,
        help="folder of generated images to score (grid.png is skipped); or --adapter to sample them first",
    )
    p.add_argument(
        "--adapter",
        default=None,
        help="sample --prompt-set with this adapter on --model into OUT/generated first, then score it "
        "(the paper's protocol in one command with --prompt-set paper-object / paper-live)",
    )
    p.add_argument("--model", default=None, help="with --adapter: the base model it was trained on")
    p.add_argument(
        "--reference",
        dest="references",
        metavar="REFERENCE",
        action="append",
        required=True,
        help="the real image of the concept; repeatable",
    )
    p.add_argument(
        "--mask",
        dest="masks",
        metavar="MASK",
        action="append",
        default=None,
        help="subject mask of each --reference (white = subject), in the same order; the background "
        "is filled with --mask-fill before CLIP-I and DINO",
    )
    p.add_argument("--mask-fill", default="255,255,255", help="R,G,B of the masked background (default white)")
    p.add_argument("--clip", help="CLIP model folder or hub id, e.g. openai/clip-vit-base-patch32 (CLIP-I, CLIP-T)")
    p.add_argument("--dino", help="DINO model folder or hub id, e.g. facebook/dinov2-small or facebook/dino-vits16")
    p.add_argument(
        "--prompts",
        help='manifest: JSON {file: prompt}, or JSON/JSONL of {"file", "prompt"} '
        "(default: the prompt `tlora generate` stores in each PNG)",
    )
    p.add_argument(
        "--prompt-set",
        choices=PROMPT_SETS,
        default=None,
        help="object / live: DreamBooth's 25 context prompts; paper-object / paper-live: the T-LoRA paper's "
        "(a photo of {} x15, 25 context and 6 complex prompts x5); file NN-*.png has prompt NN",
    )
    p.add_argument("--concept", help="what replaces {} in --prompt-set, e.g. 'dog' or 'sks dog'")
    p.add_argument(
        "--drop-word",
        dest="drop_words",
        metavar="DROP_WORD",
        action="append",
        default=[],
        help="word removed from prompts before CLIP-T, e.g. sks",
    )
    p.add_argument(
        "--steps", type=_int(1, MAX_SAMPLE_STEPS), default=None, help="with --adapter: denoising steps (the family's)"
    )
    p.add_argument("--guidance", type=_float(0, MAX_GUIDANCE), default=None, help="with --adapter: guidance scale")
    p.add_argument("--seed", type=SEED, default=0, help="with --adapter: prompt i of the set is sampled from seed + i")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="with --adapter: the pipeline's weights")
    p.add_argument("--device", default="cpu", help="cpu (default), auto (CUDA when available), cuda or cuda:N")
    p.add_argument(
        "--out",
        required=True,
        help="output folder for evaluation.json and evaluation.md (with --adapter: generated/, protocol.json "
        "and protocol.md)",
    )
    return p


def _info_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "info", help="show an adapter file's settings and modules", description="Show an adapter file's settings."
    )
    p.add_argument("adapter", help="tlora adapter .safetensors file (what `tlora train` writes)")
    return p


# ---- the handlers: each imports what it runs --------------------------------------------------


def _options(args: argparse.Namespace) -> dict:
    """The command's options by the library's names (their dests)."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "func", "flags")}


def _run_train(args: argparse.Namespace) -> None:
    from .train.loop import TrainConfig, train

    opts = _options(args)
    opts.pop("config")
    joined = opts.pop("validation_prompts_joined")
    if joined is not None:
        print(
            "tlora train: note: --validation-prompts is deprecated: give --validation-prompt once per prompt",
            file=sys.stderr,
        )
        opts["validation_prompts"] += [p for p in joined.split("#") if p.strip()]
    result = train(TrainConfig(**opts))
    print(f"adapter written to {result.adapter_path}")


def _run_generate(args: argparse.Namespace) -> None:
    from .generate import generate

    path = generate(**_options(args))
    print(f"images written to {path.parent} (grid: {path})")


def _run_info(args: argparse.Namespace) -> None:
    from .files.io import read_adapter

    f = read_adapter(args.adapter)
    n = sum(t.numel() for k, t in f.tensors.items() if not k.endswith(("0",)))
    print(json.dumps({k: v for k, v in f.meta.items() if k != "modules"}, indent=2))
    c = f.config
    if c.masked:
        shape = {
            "power": f"power (a = {c.rank_exponent:g})",
            "cosine": "cosine",
            "step": f"step (full rank for t < {c.rank_boundary:g} T)",
        }[c.rank_schedule]
        print(
            f"r(t): {shape}, rank {c.rank} at t = 0 to {c.min_rank} at t = {c.num_train_timesteps}; "
            f"rank scaling: {c.rank_scaling}"
        )
    print(f"{len(f.modules)} adapted modules, {n:,} trainable values")


def _run_export(args: argparse.Namespace) -> None:
    from .files.export import export

    result = export(args.adapter, args.out, format=args.format, timestep=args.timestep, rank=args.rank)
    where = f"{result.path} and {result.config_path}" if result.config_path else str(result.path)
    why = ""
    if result.lora_rank == 2 * result.rank:  # variant tlora and vanilla: the trained factors and the frozen copy
        why = f" (2 x rank {result.rank}: [Q; Q - Q0] and [P L - P0 L0, P0 L0], exact)"
    print(f"{args.format} LoRA of rank {result.lora_rank}{why} ({result.modules} modules) written to {where}")
    print(f"note: {result.note}")


def _run_import(args: argparse.Namespace) -> None:
    from .files.export import import_file

    adapter, out = import_file(
        args.adapter,
        args.model,
        args.out,
        min_rank=args.min_rank,
        rank_exponent=args.rank_exponent,
        num_train_timesteps=args.num_train_timesteps,
        reconstruct_base=args.reconstruct_base,
    )
    c = adapter.config
    print(
        f"{c.variant} adapter of rank {c.rank} (min rank {c.min_rank}, {len(adapter.layers)} modules) "
        f"from {c.extra.get('imported_from', 'a tlora file')} written to {out}"
    )


def _run_evaluate(args: argparse.Namespace) -> None:
    from .evaluate import evaluate, markdown, parse_colour, write_report

    opts = _options(args)
    out = opts.pop("out")
    opts["mask_fill"] = parse_colour(opts["mask_fill"])
    sampling = {k: opts.pop(k) for k in ("adapter", "model", "steps", "guidance", "seed", "dtype")}
    if sampling["adapter"] is not None:
        _run_protocol(opts, sampling, out)
        return
    if opts["generated"] is None:
        raise InputError(
            "give --generated (a folder of images to score) or --adapter with --model and --prompt-set "
            "(sample the set, then score it)",
            field="generated",
        )
    given = [k for k in ("model", "steps", "guidance") if sampling[k] is not None]
    if given:
        raise InputError(f"{given[0]} samples images: it needs adapter (or leave it out)", field=(given[0], "adapter"))
    report = evaluate(**opts)
    print(markdown(report) + f"written to {', '.join(map(str, write_report(report, out)))}")


def _run_protocol(opts: dict, sampling: dict, out: str) -> None:
    from .protocol import markdown, run

    if opts.pop("generated") is not None:
        raise InputError(
            "give --generated (score a folder) or --adapter (sample, then score), not both", field="generated"
        )
    if sampling["model"] is None or opts["prompt_set"] is None:
        raise InputError(
            "adapter samples a prompt set: give model (the base model) and prompt_set (e.g. paper-object)",
            field=("model", "prompt_set"),
        )
    for k in ("prompts", "concept"):
        if opts.pop(k) is not None:
            raise InputError(f"{k} is read from the adapter and the prompt set with adapter: leave it out", field=k)
    if opts.pop("drop_words"):
        raise InputError(
            "with adapter, the concept's token is dropped before CLIP-T: leave drop_words out", field="drop_words"
        )
    report = run(out=out, **sampling, **opts)
    print(markdown(report) + f"written to {Path(out) / 'protocol.json'} and {Path(out) / 'protocol.md'}")


def _handled_by(p: argparse.ArgumentParser, run) -> None:
    """`run(args)` runs the command; `flags` maps each option's dest (the library's name for the
    setting) to its flag, for the error messages."""
    # The flag an error shows for a setting: its action's longest option string; of two actions of one
    # setting (--method and its old spelling --variant), the one added last.
    flags = {a.dest: max(a.option_strings, key=len) for a in p._actions if a.option_strings}
    p.set_defaults(func=run, flags=flags)


def build_parser() -> argparse.ArgumentParser:
    from .demo.run import add_parser as demo_parser
    from .demo.run import run as run_demo

    parser = argparse.ArgumentParser(
        prog="tlora", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _handled_by(_train_parser(sub), _run_train)
    _handled_by(_generate_parser(sub), _run_generate)
    _handled_by(_info_parser(sub), _run_info)
    _handled_by(_export_parser(sub), _run_export)
    _handled_by(_import_parser(sub), _run_import)
    _handled_by(_evaluate_parser(sub), _run_evaluate)
    _handled_by(demo_parser(sub), run_demo)
    for p in sub.choices.values():
        raw = issubclass(p.formatter_class, argparse.RawDescriptionHelpFormatter)
        p.formatter_class = _RawDefaults if raw else _Defaults
    return parser


def in_flags(error: Exception, flags: dict[str, str]) -> str:
    """The error's message with the settings it names (`fields`, the library's names: see
    tlora.errors) shown as the command's flags: the first whole-word use of each name."""
    text = str(error)
    for field in getattr(error, "fields", ()):
        if field in flags:
            pattern = rf"(?<![\w./'\"-]){re.escape(field)}(?![\w./'\"-])"
            text = re.sub(pattern, lambda _, flag=flags[field]: flag, text, count=1)
    return text


# What third-party packages log about themselves when diffusers imports its optional quantization
# backends (torchao, bitsandbytes) and its pipelines, for any command that touches diffusers: not
# the user's concern.
# logger -> a fragment of exactly that message.
THIRD_PARTY_NOISE = {
    # torchao registers its Enums with torch's pytree at import, which torch now deprecates
    "torch.utils._pytree": "is an Enum subclass and is now natively supported by torch.compile",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    "diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects",
    # diffusers' pipeline modules name transformers' image processors (CLIP, Siglip) at import;
    # without torchvision transformers hands out the Pillow ones, which tlora's pipelines never use
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back to",
}


class _ThirdPartyNoise(logging.Filter):
    """Drops THIRD_PARTY_NOISE's message of its logger; the pytree one only about torchao's Enums."""

    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        if self.fragment not in str(record.msg) and self.fragment not in record.getMessage():
            return True
        if record.name == "torch.utils._pytree":
            args = record.args if isinstance(record.args, tuple) else ()
            return not (args and str(getattr(args[0], "__module__", "")).startswith("torchao"))
        return False


def quiet_third_party() -> None:
    """Filter THIRD_PARTY_NOISE on its loggers (once; the loggers need not exist yet: logging
    returns the same object when the package creates it)."""
    for name, fragment in THIRD_PARTY_NOISE.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _ThirdPartyNoise) for f in log.filters):
            log.addFilter(_ThirdPartyNoise(fragment))


class ConfigFileError(Exception):
    """A --config file that cannot be read or names an unknown option (exit 2, one line)."""


def with_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`argv` with `tlora train --config run.toml`'s settings put before the command line's, so that
    the command line overrides them and each value is checked as if typed: keys are option names
    (`lr`, `train-batch-size` or `train_batch_size`), flags true/false, repeatable options and
    --target-modules lists."""
    if not argv or argv[0] != "train" or not any(a == "--config" or a.startswith("--config=") for a in argv):
        return argv
    rest, path = [], None
    it = iter(argv[1:])
    for a in it:
        if a == "--config":
            path = next(it, None)
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            rest.append(a)
    if not path:
        raise ConfigFileError("argument --config: expected a TOML file")
    import tomllib

    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as e:
        raise ConfigFileError(f"argument --config: cannot read {path} ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigFileError(f"argument --config: {path} is not TOML ({e})") from None
    train = parser._subparsers._group_actions[0].choices["train"]
    actions = {a.option_strings[0]: a for a in train._actions if a.option_strings and a.dest != "help"}
    given = {a.split("=", 1)[0] for a in rest if a.startswith("--")}
    front: list[str] = []
    for key, value in table.items():
        flag = "--" + str(key).replace("_", "-")
        if flag == "--validation-prompts" and isinstance(value, list):
            flag = "--validation-prompt"  # a list is the repeated option's (the library's name for it)
        action = actions.get(flag)
        if action is None or flag == "--config":
            raise ConfigFileError(f"argument --config: {path}: unknown option {key!r} (see tlora train --help)")
        if flag in given or (action.dest == "variant" and "--variant" in given):
            continue  # the command line overrides the file
        front += _config_tokens(path, key, flag, action, value)
    return ["train", *front, *rest]


def _config_tokens(path: str, key: str, flag: str, action: argparse.Action, value) -> list[str]:
    where = f"argument --config: {path}: {key}"
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ConfigFileError(f"{where} must be true or false, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [flag if value else "--no-" + flag[2:]]
        return [flag] if value else []
    many = isinstance(action, argparse._AppendAction) or action.nargs == "+"
    values = value if isinstance(value, list) and many else [value]
    if any(isinstance(v, (dict, list, bool)) for v in values) or not values:
        raise ConfigFileError(f"{where} must be {'a list of ' if many else 'a '}string or number, got {value!r}")
    if isinstance(action, argparse._AppendAction):
        return [t for v in values for t in (flag, str(v))]
    return [flag, *map(str, values)]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        argv = with_config_file(parser, argv)
    except ConfigFileError as e:
        print(f"tlora train: error: {e}", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse's usage errors (exit 2, message printed) and --help (0)
        return e.code if isinstance(e.code, int) else 2
    quiet_third_party()
    try:
        args.func(args)
    except (ValueError, OSError) as e:  # OSError: missing files, permissions, a full disk
        print(f"tlora {args.command}: error: {in_flags(e, args.flags)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
