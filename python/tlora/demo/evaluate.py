"""Fine-tune the bundled toy model on one concept image and score the samples from pixels.

Shared by `tlora demo` and `benches/quality.py`, so both measure the same thing: for every
evaluation prompt (new position, new background) n samples are scored for concept fidelity,
prompt alignment and diversity, then averaged over prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import metrics
from .concepts import EVAL_PROMPTS, Concept

MODEL_DIR = Path(__file__).parent / "model"

# Fine-tuning settings for the toy model (32x32 scenes, attention layers 32 and 64 wide).
TOY_RANK = 16
TOY_STEPS = 800
TOY_LR = 2e-3
# A fine-tune is checkpointed this many times, so that an interrupted demo resumes near where it stopped.
TOY_CHECKPOINTS = 4


@dataclass
class Run:
    method: str
    scores: dict[str, float]
    rows: list[list[Image.Image]]  # samples, one row per evaluation prompt
    seconds: float


METHODS = {
    # name: (variant, min_rank as a function of rank)
    "LoRA": ("lora", lambda r: r),
    "Vanilla T-LoRA": ("vanilla", lambda r: max(1, r // 2)),
    "Ortho-LoRA": ("tlora", lambda r: r),
    "T-LoRA": ("tlora", lambda r: max(1, r // 2)),
}


def model_dir() -> Path:
    if not (MODEL_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the bundled toy model is missing from {MODEL_DIR}: "
            "reinstall tlora, or rebuild it with python -m tlora.demo.pretrain"
        )
    return MODEL_DIR


def score_rows(rows: list[list[Image.Image]], concept: Concept) -> dict[str, float]:
    per_prompt = [
        metrics.score([np.asarray(i) for i in row], concept, target) for row, target in zip(rows, EVAL_PROMPTS)
    ]
    return {k: float(np.mean([s[k] for s in per_prompt])) for k in per_prompt[0]}


def autoencoder_ceiling(concept: Concept) -> float:
    """Mean fidelity of the exact renders of every evaluation prompt after one encode/decode by the
    toy model's autoencoder: the most any fine-tune of this model can score (its 16x16 latents
    blur 1-2 px patterns)."""
    import torch
    from diffusers import AutoencoderKL

    from .concepts import render_concept
    from .pretrain import to_unit

    vae = AutoencoderKL.from_pretrained(model_dir() / "vae", dtype=torch.float32)
    renders = np.stack([render_concept(concept, p.position, p.background) for p in EVAL_PROMPTS])
    x = to_unit(torch.from_numpy(renders).permute(0, 3, 1, 2))
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
    decoded = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    rgb, alpha = concept.sprite()
    return float(np.mean([metrics.fidelity(img, rgb, alpha) for img in decoded]))


def sample_base(concept: Concept, n: int, seed: int, steps: int = 25, guidance: float = 5.0) -> Run:
    """The pretrained model without an adapter: it does not know the concept."""
    import time

    from ..generate import sample_images
    from ..pipelines import load_pipeline

    tic = time.perf_counter()
    pipe = load_pipeline(str(model_dir()))
    rows = sample_images(pipe, [p.text(concept) for p in EVAL_PROMPTS], n, steps, guidance, seed, desc="base")
    return Run("base model", score_rows(rows, concept), rows, time.perf_counter() - tic)


def finetune(
    concept: Concept,
    method: str,
    out: Path,
    rank: int = TOY_RANK,
    steps: int = TOY_STEPS,
    lr: float = TOY_LR,
    seed: int = 0,
    n: int = 4,
    sample_steps: int = 25,
    guidance: float = 5.0,
    adapter_options: dict | None = None,
) -> Run:
    """Train `method` on the concept's one image, then sample and score the evaluation prompts.
    `adapter_options` (TrainConfig's names: min_rank, rank_exponent, rank_schedule, rank_boundary,
    rank_scaling) replace the method's own, for the variants benches/quality.py compares."""
    import time

    from ..errors import CheckpointError
    from ..generate import sample_images
    from ..train.checkpoint import checkpoints
    from ..train.loop import train

    variant, min_rank = METHODS[method]
    out.mkdir(parents=True, exist_ok=True)
    image = out / "concept.png"
    Image.fromarray(concept.training_image()).save(image)
    run_dir = out / method.replace(" ", "-").lower()
    settings = dict(
        model=str(model_dir()),
        image=str(image),
        token=concept.token,
        class_name=concept.class_word,
        out=str(run_dir),
        variant=variant,
        rank=rank,
        min_rank=min_rank(rank),
        steps=steps,
        lr=lr,
        resolution=32,
        checkpoint_every=max(1, steps // TOY_CHECKPOINTS),
        seed=seed,
    )
    settings.update(adapter_options or {})
    tic = time.perf_counter()
    # The demo owns its folder: an interrupted fine-tune (checkpoints, no adapter file yet) resumes;
    # anything else there (a finished run, a run killed before its first checkpoint, other settings)
    # is replaced, so that a rerun never stops at "holds another run".
    unfinished = run_dir.is_dir() and not (run_dir / "adapter.safetensors").exists() and checkpoints(run_dir)
    result = None
    if unfinished:
        try:
            print(f"{method}: resuming the interrupted fine-tune in {run_dir}")
            result = train(**settings, resume=True)
        except CheckpointError as e:
            print(f"{method}: cannot resume ({e}): starting over")
    if result is None:
        result = train(**settings, overwrite=True)
    rows = sample_images(
        result.pipe, [p.text(concept) for p in EVAL_PROMPTS], n, sample_steps, guidance, seed, desc=f"sample {method}"
    )
    return Run(method, score_rows(rows, concept), rows, time.perf_counter() - tic)
