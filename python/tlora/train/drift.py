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
"mean"}; `overfitting.png` plots the loss and the mean drift per step.
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


@dataclass
class DriftTracker:
    """The training image and the base model's validation samples (one per prompt, the seeds the
    validation uses); `record` turns a later validation's samples into drifts and logs them."""

    training_image: Image.Image
    base_samples: Sequence[Image.Image]
    log: Path | None = None
    history: list[tuple[int, list[float]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._base = [similarity(s, self.training_image) for s in self.base_samples]

    def drifts(self, samples: Sequence[Image.Image]) -> list[float]:
        if len(samples) != len(self._base):
            raise ValueError(f"{len(samples)} validation samples for {len(self._base)} base samples")
        return [similarity(s, self.training_image) - b for s, b in zip(samples, self._base)]

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
