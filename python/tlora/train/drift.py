"""Overfitting in view: how far validation samples have drifted toward the training image.

A fine-tune on one photo overfits by copying it: prompts that ask for another place or background
come back with the photo's layout and background. That shows in pixels. For each validation
prompt the trainer samples with a fixed seed; the drift of a sample is its similarity to the
training image minus the similarity of the base model's sample of the same prompt and seed (the
adapter starts as an exact zero update, so that sample is the step-0 one): 0 at the start, rising
as the model starts to reproduce the photo instead of the prompt. Similarity is the Pearson
correlation of the two images' pixels at a common size, so it reads layout and colour, not
brightness.

`drift.jsonl` in the run folder holds one line per validation: {"step", "drift": [per prompt],
"mean"}; `overfitting.png` plots the loss and the mean drift per step. With several training
images a sample's likeness is its similarity to the closest one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

COMPARE_SIDE = 64  # px: both images are compared at this size (layout and colour survive it)
DRIFT_LOG = "drift.jsonl"
PLOT = "overfitting.png"
BASE_SAMPLES = "samples-base"  # the step-0 validation (the adapter adds exactly zero: the base model)


def _pixels(img: Image.Image) -> np.ndarray:
    small = img.convert("RGB").resize((COMPARE_SIDE, COMPARE_SIDE), Image.BICUBIC)
    return np.asarray(small, np.float64).ravel()


def similarity(a: Image.Image, b: Image.Image) -> float:
    """Pearson correlation of the pixels of `a` and `b` (RGB, both at COMPARE_SIDE px): 1 for the
    same picture up to brightness and contrast, about 0 for unrelated ones; 0 when either is flat."""
    x, y = _pixels(a), _pixels(b)
    x, y = x - x.mean(), y - y.mean()
    norm = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / norm) if norm > 0 else 0.0


def likeness(sample: Image.Image, training_images: Sequence[Image.Image]) -> float:
    """How much `sample` looks like the training set: its similarity to the closest training image."""
    return max(similarity(sample, t) for t in training_images)


@dataclass
class DriftTracker:
    """The training images and the base model's validation samples (one per prompt, the seeds the
    validation uses); `record` turns a later validation's samples into drifts and logs them."""

    training_images: Sequence[Image.Image]
    base_samples: Sequence[Image.Image]
    log: Path | None = None
    history: list[tuple[int, list[float]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._base = [likeness(s, self.training_images) for s in self.base_samples]

    def drifts(self, samples: Sequence[Image.Image]) -> list[float]:
        if len(samples) != len(self._base):
            raise ValueError(f"{len(samples)} validation samples for {len(self._base)} base samples")
        return [likeness(s, self.training_images) - b for s, b in zip(samples, self._base)]

    def record(self, step: int, samples: Sequence[Image.Image]) -> float:
        """The mean drift of `samples` (validation at `step`), appended to the log; returns it."""
        values = self.drifts(samples)
        mean = float(np.mean(values))
        self.history.append((step, values))
        if self.log is not None:
            entry = {"step": step, "drift": [round(v, 6) for v in values], "mean": round(mean, 6)}
            with open(self.log, "a") as f:
                f.write(json.dumps(entry) + "\n")
        return mean


def read_drift(path: Path) -> list[tuple[int, float]]:
    """(step, mean drift) of each line of a drift.jsonl."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            out.append((int(entry["step"]), float(entry["mean"])))
    return out


def smoothed(points: Sequence[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """A running mean over `window` points (the loss of one image at random timesteps is noisy)."""
    out, total = [], 0.0
    for i, (x, y) in enumerate(points):
        total += y
        if i >= window:
            total -= points[i - window][1]
        out.append((x, total / min(i + 1, window)))
    return out


def plot(
    loss: dict[str, Sequence[tuple[int, float]]], drift: dict[str, Sequence[tuple[int, float]]], title: str
) -> Image.Image:
    """Two panels, one above the other: the loss per step (a running mean) and the mean drift toward
    the training image per validation step, one line per run."""
    from ..images import line_chart, stack

    loss = {k: v for k, v in loss.items() if v}  # (none before the first step)
    window = max(1, max(len(v) for v in loss.values()) // 40) if loss else 1
    panels = []
    if loss:
        panels.append(
            line_chart(
                {k: smoothed(v, window) for k, v in loss.items()},
                title=f"{title}: training loss (running mean of {window} steps)",
                xlabel="training step",
                ylabel="loss",
            )
        )
    panels.append(
        line_chart(
            drift,
            title=f"{title}: drift of validation samples toward the training image",
            xlabel="training step",
            ylabel="similarity - base model's",
            zero_line=True,
        )
    )
    return stack(panels)


def read_samples(folder: Path, count: int) -> list[Image.Image]:
    """The first sample of each of `count` prompts that generate.sample_grid wrote into `folder`."""
    return [Image.open(folder / f"{i:02d}-0.png").convert("RGB") for i in range(count)]


def truncate(path: Path, step: int) -> None:
    """Keep the drift entries up to `step` (a resumed run rewrites what came after)."""
    from ..files.atomic import write_atomic

    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        write_atomic(path, "".join(line + "\n" for line in keep))


def read_loss(path: Path) -> list[tuple[int, float]]:
    """(step, loss) of each line of a loss.jsonl."""
    if not path.exists():
        return []
    return [(int(e["step"]), float(e["loss"])) for e in map(json.loads, path.read_text().splitlines()) if e]


class OverfittingView:
    """The trainer's side: the base samples (BASE_SAMPLES in the run folder) against the training
    images; after each validation the drift is logged and the plot redrawn."""

    def __init__(self, out: Path, training_images: Sequence[Image.Image], prompts: int, title: str):
        self.out, self.title = out, title
        base = read_samples(out / BASE_SAMPLES, prompts)
        self.tracker = DriftTracker(training_images, base, log=out / DRIFT_LOG)
        self.prompts = prompts

    def record(self, step: int, samples_dir: Path) -> float:
        mean = self.tracker.record(step, read_samples(samples_dir, self.prompts))
        self.draw()
        return mean

    def draw(self) -> Path:
        from ..files.atomic import save_image

        drift = read_drift(self.out / DRIFT_LOG)
        figure = plot({"loss": read_loss(self.out / "loss.jsonl")}, {"mean drift": drift}, self.title)
        return save_image(figure, self.out / PLOT)
