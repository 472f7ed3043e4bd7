"""The `tlora` command line. Each subcommand is a thin wrapper over the Python API of the same name."""

from __future__ import annotations

import argparse
import json
import math
import sys

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


MAX_SIDE = 4096  # as tlora.pipelines.MAX_SIDE (not imported: the parser loads no torch)


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
    value = _int(8, MAX_SIDE)(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of 8 (the autoencoder's stride)")
    return value


SEED = _int(0, 2**32 - 1)
DEVICE_HELP = "auto (default: CUDA when available, else the CPU), cpu, cuda or cuda:N"


def _train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train an adapter from one image",
        description="Train a T-LoRA adapter on one photo of a subject (paper defaults).",
    )
    p.add_argument("--model", required=True, help="local diffusers folder or hub id (SD 1.x/2.x, SD-XL, FLUX)")
    p.add_argument("--image", help="the training photo")
    p.add_argument("--image-dir", help="a folder of photos instead of one")
    p.add_argument("--token", required=True, help="rare word that will name the subject, e.g. sks")
    p.add_argument("--class-name", required=True, help="the subject's class, e.g. dog")
    p.add_argument("--out", required=True, help="output folder (adapter, checkpoints, samples, logs)")
    p.add_argument("--variant", default="tlora", choices=["tlora", "vanilla", "lora"])
    p.add_argument("--rank", type=_int(1, 4096), default=64)
    p.add_argument("--min-rank", type=_int(1, 4096), default=None, help="rank at t = T (default rank // 2)")
    p.add_argument("--rank-exponent", type=_float(0, 1000, lo_inclusive=False), default=1.0)
    p.add_argument("--steps", type=_int(1, 10_000_000), default=None, help="default 800 (tlora), 500 (vanilla, lora)")
    p.add_argument("--lr", type=_float(0, 1, lo_inclusive=False), default=1e-4)
    p.add_argument("--resolution", type=_side, default=None, help="default: the model's native size")
    p.add_argument(
        "--mixed-precision",
        default="no",
        choices=["no", "fp16", "bf16"],
        help="weights of the frozen model in fp16/bf16 with autocast (the adapter stays float32); fp16 needs a GPU",
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--checkpoint-every", type=_int(1), default=100)
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest checkpoint (same settings; a new --lr is applied)",
    )
    which.add_argument("--overwrite", action="store_true", help="replace another run's files in --out")
    p.add_argument(
        "--validation-prompts",
        default="",
        help='"#"-separated prompts with {} for the concept, e.g. "a {} in the jungle#a {} on a beach"',
    )
    p.add_argument("--validation-steps", type=_int(1, 1000), default=None, help="denoising steps of validation samples")
    p.add_argument("--mask", help="subject mask (white = subject): the loss sees only these pixels")
    p.add_argument("--prior-dir", help="class images for DreamBooth prior preservation")
    p.add_argument("--prior-weight", type=_float(0, 1000), default=1.0)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--target-modules", nargs="+", default=None, help="module name suffixes to adapt")
    p.add_argument(
        "--quantize",
        default=None,
        choices=["int8", "int4", "nf4"],
        help="keep the denoiser's Linear layers quantized and frozen: int8/int4 (optimum-quanto), "
        "nf4 (bitsandbytes, GPU)",
    )


def _generate_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="sample images with an adapter",
        description="Sample a stock diffusers pipeline with a T-LoRA adapter.",
    )
    p.add_argument("--model", required=True, help="the base model the adapter was trained on")
    p.add_argument("--adapter", required=True, help="adapter .safetensors file")
    p.add_argument("--prompt", action="append", required=True, help="prompt with {} for the concept; repeatable")
    p.add_argument("-n", type=_int(1, 256), default=4, help="images per prompt")
    p.add_argument("--steps", type=_int(1, 1000), default=None, help="denoising steps (SD-XL 25, FLUX 28)")
    p.add_argument("--guidance", type=_float(0, 100), default=None, help="guidance scale (SD-XL 5.0, FLUX 3.5)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--height", type=_side, default=None, help=f"multiple of 8, at most {MAX_SIDE}")
    p.add_argument("--width", type=_side, default=None, help=f"multiple of 8, at most {MAX_SIDE}")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "fp16", "bf16"],
        help="the pipeline's weights (the adapter stays float32); fp16 needs a GPU",
    )
    p.add_argument("--out", required=True, help="output folder for PNGs and grid.png")


def _export_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="bake an adapter into a static LoRA (diffusers, peft, kohya)",
        description="Bake a T-LoRA adapter at one rank into a standard LoRA that stock loaders read. "
        "A static LoRA uses that rank at every timestep: the per-timestep ranks are lost.",
    )
    p.add_argument("--adapter", required=True, help="tlora adapter .safetensors file")
    p.add_argument(
        "--format",
        required=True,
        choices=["diffusers", "peft", "kohya"],
        help="diffusers: pipe.load_lora_weights(file); peft: PeftModel.from_pretrained(denoiser, folder); "
        "kohya: lora_unet_* keys (SD/SD-XL UNets)",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--timestep", type=_float(0), default=None, help="bake rank r(t), t on the training scale 0..T")
    which.add_argument("--rank", type=_int(1), default=None, help="bake this rank (default: full rank, r(0))")
    p.add_argument("--out", required=True, help=".safetensors file (peft: a folder)")


def _import_parser(sub) -> None:
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
        # at least 2, as tlora.config.MIN_TIMESTEPS (not imported: the parser loads no torch)
        "--num-train-timesteps",
        type=_int(2, 1_000_000),
        default=None,
        help="default: the file's metadata, else 1000",
    )
    p.add_argument(
        "--reconstruct-base",
        action="store_true",
        help="LyCORIS files without base_q/base_p/base_lambda: rebuild them from the model's weights "
        "(right only for LyCORIS's default init)",
    )


def _evaluate_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="CLIP-I, CLIP-T and DINO scores of generated images",
        description="Score generated images as the paper does: CLIP-I and DINO (cosine to the reference "
        "image, its background masked when --mask is given) and CLIP-T (cosine to the prompt). "
        "Writes evaluation.json and evaluation.md (per prompt and overall mean).",
    )
    p.add_argument("--generated", required=True, help="folder of generated images (grid.png is skipped)")
    p.add_argument("--reference", action="append", required=True, help="the real image of the concept; repeatable")
    p.add_argument(
        "--mask",
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
        choices=["object", "live"],
        default=None,
        help="the 25 DreamBooth context prompts (object or live subject); file NN-*.png has prompt NN",
    )
    p.add_argument("--concept", help="what replaces {} in --prompt-set, e.g. 'dog' or 'sks dog'")
    p.add_argument("--drop-word", action="append", default=[], help="word removed from prompts before CLIP-T, e.g. sks")
    p.add_argument("--device", default="cpu", help="cpu (default), auto (CUDA when available), cuda or cuda:N")
    p.add_argument("--out", required=True, help="output folder for evaluation.json and evaluation.md")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlora", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _generate_parser(sub)
    info = sub.add_parser("info", help="show an adapter file's settings and modules")
    info.add_argument("adapter")
    _export_parser(sub)
    _import_parser(sub)
    _evaluate_parser(sub)
    from .demo import add_parser as add_demo

    add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse's usage errors (exit 2, message printed) and --help (0)
        return e.code if isinstance(e.code, int) else 2
    try:
        if args.command == "train":
            from .train import TrainConfig, train

            opts = {k: v for k, v in vars(args).items() if k != "command"}
            opts["validation_prompts"] = [p for p in opts["validation_prompts"].split("#") if p.strip()]
            result = train(TrainConfig(**opts))
            print(f"adapter written to {result.adapter_path}")
        elif args.command == "generate":
            from .generate import generate

            path = generate(
                args.model,
                args.adapter,
                args.prompt,
                args.out,
                n=args.n,
                steps=args.steps,
                guidance=args.guidance,
                seed=args.seed,
                height=args.height,
                width=args.width,
                device=args.device,
                dtype=args.dtype,
            )
            print(f"images written to {path.parent} (grid: {path})")
        elif args.command == "info":
            from .io import read_adapter

            f = read_adapter(args.adapter)
            n = sum(t.numel() for k, t in f.tensors.items() if not k.endswith(("0",)))
            print(json.dumps({k: v for k, v in f.meta.items() if k != "modules"}, indent=2))
            print(f"{len(f.modules)} adapted modules, {n:,} trainable values")
        elif args.command == "export":
            from .interop import export

            result = export(args.adapter, args.out, format=args.format, timestep=args.timestep, rank=args.rank)
            where = f"{result.path} and {result.config_path}" if result.config_path else str(result.path)
            print(f"{args.format} LoRA of rank {result.lora_rank} ({result.modules} modules) written to {where}")
            print(f"note: {result.note}")
        elif args.command == "import":
            from .interop import import_file

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
        elif args.command == "evaluate":
            from .evaluate import evaluate, markdown, parse_colour, write_report

            report = evaluate(
                args.generated,
                args.reference,
                clip=args.clip,
                dino=args.dino,
                masks=args.mask,
                prompts=args.prompts,
                prompt_set=args.prompt_set,
                concept=args.concept,
                drop_words=args.drop_word,
                mask_fill=parse_colour(args.mask_fill),
                device=args.device,
            )
            print(markdown(report) + f"written to {', '.join(map(str, write_report(report, args.out)))}")
        elif args.command == "demo":
            from .demo import run

            run(args)
    except (ValueError, OSError) as e:  # OSError: missing files, permissions, a full disk
        print(f"tlora {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
