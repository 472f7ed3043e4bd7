"""`tlora demo`: the README's main job, on the toy model that ships with the package.

Fine-tunes the bundled pretrained toy text-to-image model on ONE image of a new concept (a
patterned sprite in a fixed place on a fixed background) with LoRA and with T-LoRA, samples
prompts that move the concept and change the background, prints fidelity / alignment /
diversity measured from pixels, and writes a side-by-side grid. No downloads; a few minutes on CPU.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# Stated costs on a 2-core CPU with one thread (measured at load ~3: 0.09 s per denoising step of a
# prompt's 4 samples, which run as one batch, so about as long for 1; a fine-tune step about 0.1 s):
# the first estimates; later ones use this run's own times.
SECONDS_PER_SAMPLE_STEP = 0.09
SECONDS_PER_TRAIN_STEP = 0.1
SAMPLE_STEPS = 25  # sample_base's and finetune's default denoising steps


def add_parser(sub) -> argparse.ArgumentParser:
    """The `demo` subcommand's parser (torch-free: the toy's concepts and settings only)."""
    from .concepts import CONCEPTS
    from .evaluate import TOY_RANK, TOY_STEPS

    p = sub.add_parser(
        "demo",
        help="LoRA vs T-LoRA on the bundled toy model (no downloads)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--concept", default="split_cross", choices=sorted(CONCEPTS), help="which concept to learn")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--steps", type=int, default=TOY_STEPS, help=f"training steps per method (default {TOY_STEPS})")
    p.add_argument(
        "--rank", type=int, default=TOY_RANK, help=f"adapter rank (default {TOY_RANK}; T-LoRA r_min = rank/2)"
    )
    p.add_argument("-n", type=int, default=4, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of training and sampling")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default 1, or OMP_NUM_THREADS when set: the toy model's steps are "
        "per-op overhead, so one thread is as fast alone and does not slow down when the cores are shared)",
    )
    return p


def choose_threads(threads: int | None) -> int:
    """Set torch's CPU thread count for the demo and say it in one line: `threads` (--threads), else
    OMP_NUM_THREADS's (torch read it at import), else 1."""
    import torch

    from ..errors import ConfigError

    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be 1 or more, got {threads}", field="threads")
        n, why = threads, "--threads"
    elif os.environ.get("OMP_NUM_THREADS"):
        n, why = torch.get_num_threads(), "OMP_NUM_THREADS"
    else:
        n, why = 1, "the toy model's steps are per-op overhead: one thread is as fast and copes with busy cores"
    torch.set_num_threads(n)
    print(f"threads: {n} ({why}; --threads N to change)")
    return n


def about(seconds: float) -> str:
    return f"about {seconds:.0f} s" if seconds < 90 else f"about {seconds / 60:.0f} min"


def run(args) -> None:
    from ..files.atomic import save_image
    from .concepts import EVAL_PROMPTS, concept
    from .evaluate import autoencoder_ceiling, finetune, sample_base

    c = concept(args.concept)
    out = Path(args.out)
    choose_threads(args.threads)
    print(
        f"concept {c.name!r}: trained as {c.prompt_for_training!r} on one image "
        f"({c.train_position}, {c.train_background} background)"
    )
    image_steps = len(EVAL_PROMPTS) * SAMPLE_STEPS  # denoising steps: a prompt's n samples are one batch
    guess = about(image_steps * SECONDS_PER_SAMPLE_STEP)
    print(f"sampling the base model: {len(EVAL_PROMPTS)} prompts x {args.n}, {guess} here")
    runs = [sample_base(c, args.n, args.seed)]
    per_image_step = runs[0].seconds / image_steps  # measured now, on this machine as busy as it is
    per_train_step = SECONDS_PER_TRAIN_STEP
    for method in ("LoRA", "T-LoRA"):
        guess = args.steps * per_train_step + image_steps * per_image_step
        print(f"fine-tuning {method}: {args.steps} steps, then sampling: {about(guess)} here")
        runs.append(finetune(c, method, out, rank=args.rank, steps=args.steps, seed=args.seed, n=args.n))
        per_train_step = max(0.0, runs[-1].seconds - image_steps * per_image_step) / args.steps

    path = out / "comparison.png"
    save_image(comparison(c, runs, args.rank, args.steps, args.n), path)

    print(
        f"\n{'method':12} {'fidelity':>9} {'alignment':>10} {'background':>11} {'position':>9} "
        f"{'diversity':>10} {'seconds':>8}"
    )
    for r in runs:
        s = r.scores
        print(
            f"{r.method:12} {s['fidelity']:9.3f} {s['alignment']:10.3f} {s['background_accuracy']:11.3f} "
            f"{s['position_accuracy']:9.3f} {s['diversity']:10.3f} {r.seconds:8.1f}"
        )
    print(
        f"\nfidelity: the concept's sprite is there (best normalised correlation, 1 = exact; "
        f"{autoencoder_ceiling(c):.3f} at most here:\n  exact renders of the prompts after the toy "
        "autoencoder's round trip);"
        "\nalignment: background colour and position follow the prompt (1 = always)."
        f"\nprompts: {len(EVAL_PROMPTS)} (e.g. {EVAL_PROMPTS[0].text(c)!r}), {args.n} samples each"
        f"\ngrid (rows = prompts; training image | base model | LoRA | T-LoRA): {path}"
    )


ENLARGE = 4  # the 32 px samples, enlarged by whole pixels (no smoothing: the 1-2 px patterns stay sharp)
LOOK_AT = (
    "What to look at: the concept's sprite is trained at the {position} of a {background} background. "
    "In rows whose prompt asks for another place or background, LoRA tends to copy the training layout "
    "(sprite at the {position}, {background} background); T-LoRA follows the prompt more often. The base "
    "model follows the prompt but does not know the concept."
)


def comparison(c, runs, rank: int, steps: int, n: int):
    """The demo's picture: one row per prompt: the training image, then each run's samples (the base
    model's first), a blank tile between runs, a note under the grid on what to look at."""
    from PIL import Image

    from ..images import grid
    from .concepts import EVAL_PROMPTS

    def big(img):
        return img.resize((img.width * ENLARGE, img.height * ENLARGE), Image.NEAREST)

    blank = Image.new("RGB", (32, 32), "white")
    tiles = []
    for i, _ in enumerate(EVAL_PROMPTS):
        tiles.append(big(Image.fromarray(c.training_image())))
        for r in runs:
            tiles += [big(img) for img in r.rows[i]] + [big(blank)]
    heads = ["training image"]
    for r in runs:
        what = "no adapter" if r.method == "base model" else f"rank {rank}, step {steps}"
        heads += [f"{r.method}\n{what}\nsample {k + 1}" for k in range(n)] + [""]
    note = LOOK_AT.format(position=c.train_position, background=c.train_background)
    return grid(
        tiles,
        cols=len(heads),
        col_labels=heads,
        row_labels=[p.text(c) for p in EVAL_PROMPTS],
        caption=note,
    )
