"""`tlora.protocol.run` (`tlora evaluate --adapter ... --prompt-set paper-live`): the T-LoRA paper's
evaluation of one trained concept in one call. It samples every prompt of the set with the adapter
(the paper's sets: the base prompt "a photo of V*" 15 times, 25 context and 6 complex prompts 5
times each), then scores the images as the paper does: CLIP-I (its IS) and DINO against the
reference image with its background masked, CLIP-T (its TS) against the prompt with the concept's
token removed ("a photo of dog" for "a photo of sks dog": CLIP's text encoder never learnt the
token). Writes each group's images and grid under OUT/generated/<group>/, then protocol.json and
protocol.md in OUT. A group whose images are all there already (a run that was stopped) is scored
as it is, not sampled again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError
from .evaluate import METRICS, NAMES, Encoders, evaluate, reference_images
from .files.atomic import write_atomic
from .files.io import read
from .generate import adapter_concept, fill, prepare
from .prompt_sets import PROMPT_SETS, PromptGroup


def run(
    model: str,
    adapter: str,
    references: Sequence[str | Path],
    out: str | Path,
    prompt_set: str = "paper-object",
    clip: str | None = None,
    dino: str | None = None,
    masks: Sequence[str | Path] | None = None,
    mask_fill: tuple[int, int, int] = (255, 255, 255),
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    device: str | None = None,
    dtype: str = "fp32",
    scheduler: str | None = None,
    batch_size: int = 16,
) -> dict:
    """Generate `prompt_set` (tlora.prompt_sets) with `adapter` on `model`, score it, write the
    report; returns it. Sampling settings as `tlora.generate` (None: the family's defaults)."""
    if prompt_set not in PROMPT_SETS:
        raise InputError(f"unknown prompt set {prompt_set!r}: use one of {sorted(PROMPT_SETS)}", field="prompt_set")
    if clip is None and dino is None:
        raise InputError("nothing to score with: give clip (CLIP-I, CLIP-T) and / or dino", field=("clip", "dino"))
    chosen = PROMPT_SETS[prompt_set]
    _, meta = read(adapter)
    concept = adapter_concept(adapter, meta)
    token = meta["config"]["extra"]["token"]
    reference_images(references, masks, mask_fill)  # a bad reference or mask fails before sampling
    encoders = Encoders.load(clip, dino, device)
    out = Path(out)

    sampler = None
    first = 0  # prompt i of the whole set is sampled from seed + i, whatever group it is in
    folders = []
    for group in chosen.groups:
        folder = out / "generated" / group.name
        if not _complete(folder, group, concept):
            if sampler is None:
                sampler = prepare(
                    model, adapter, steps, guidance, device=device, dtype=dtype, scheduler=scheduler, meta=meta
                )
            sampler.grid(group.templates, folder, n=group.images, seed=seed + first)
        folders.append(folder)
        first += len(group.templates)

    scored = {
        g.name: evaluate(
            folder,
            references,
            clip=clip,
            dino=dino,
            masks=masks,
            drop_words=[token],
            mask_fill=mask_fill,
            batch_size=batch_size,
            encoders=encoders,
        )
        for g, folder in zip(chosen.groups, folders)
    }
    report = _combined(chosen.name, chosen.source, concept, token, model, adapter, scored, sampler)
    write_atomic(out / "protocol.json", json.dumps(report, indent=1, allow_nan=False))
    write_atomic(out / "protocol.md", markdown(report))
    return report


def _complete(folder: Path, group: PromptGroup, concept: str) -> bool:
    """Every image of the group is in `folder`, each with its prompt (as sample_grid writes them)."""
    for i, template in enumerate(group.templates):
        for j in range(group.images):
            path = folder / f"{i:02d}-{j}.png"
            if not path.is_file():
                return False
            try:
                with Image.open(path) as img:
                    if img.info.get("prompt") != fill(template, concept):
                        return False
            except OSError:
                return False
    return True


def _combined(name, source, concept, token, model, adapter, scored: dict[str, dict], sampler) -> dict:
    """One report from the groups' evaluate reports: the mean over all images (the paper's numbers),
    per group, per prompt and per image."""
    any_report = next(iter(scored.values()))
    metrics = [k for k in METRICS if k in any_report["metrics"]]
    per_image = [{"group": g, **row} for g, rep in scored.items() for row in rep["per_image"]]
    groups = [{"group": g, "prompts": len(rep["per_prompt"]), **rep["overall"]} for g, rep in scored.items()]
    return {
        "prompt_set": name,
        "source": source,
        "concept": concept,
        "model": model,
        "adapter": str(adapter),
        "sampling": None if sampler is None else {"steps": sampler.steps, "guidance": sampler.guidance},
        "models": any_report["models"],
        "references": any_report["references"],
        "masks": any_report["masks"],
        "mask_fill": any_report["mask_fill"],
        "drop_words": [token],
        "metrics": metrics,
        "overall": {"images": len(per_image), **{k: float(np.mean([r[k] for r in per_image])) for k in metrics}},
        "groups": groups,
        "per_prompt": [{"group": g, **row} for g, rep in scored.items() for row in rep["per_prompt"]],
        "per_image": per_image,
    }


def markdown(report: dict) -> str:
    keys = report["metrics"]
    fmt = lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"  # noqa: E731
    head = " | ".join(NAMES[k] for k in keys)
    lines = [
        f"Prompt set {report['prompt_set']} ({report['source']}), concept {report['concept']!r}.",
        "",
        f"| group | prompts | images | {head} |",
        "|---" * (len(keys) + 3) + "|",
    ]
    for g in report["groups"]:
        lines.append(f"| {g['group']} | {g['prompts']} | {g['images']} | " + " | ".join(fmt(g[k]) for k in keys) + " |")
    o = report["overall"]
    lines.append(f"| **all** | | {o['images']} | " + " | ".join(f"**{fmt(o[k])}**" for k in keys) + " |")
    lines += ["", f"| group | prompt | images | {head} |", "|---" * (len(keys) + 3) + "|"]
    for row in report["per_prompt"]:
        prompt = (row["prompt"] or "").replace("|", "\\|")
        lines.append(f"| {row['group']} | {prompt} | {row['images']} | " + " | ".join(fmt(row[k]) for k in keys) + " |")
    masked = f", its background filled with RGB {tuple(report['mask_fill'])}" if report["masks"] else ""
    lines += [
        "",
        f"CLIP-I (the paper's IS) and DINO: mean cosine to the reference image{masked}; CLIP-T (its TS): "
        f"cosine to the prompt without {report['drop_words']}. The 'all' row is the mean over every image.",
    ]
    return "\n".join(lines) + "\n"
