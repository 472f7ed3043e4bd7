"""Overfitting in view: how far validation samples have drifted toward the training image.

A fine-tune on one photo overfits by copying it: prompts that ask for another place or background
come back with the photo's layout and background. That shows in pixels. For each validation
prompt the trainer samples with a fixed seed. The base model's sample of that prompt and seed is
the step-0 one (the adapter starts as an exact zero update); the drift of a later sample is how far
it has moved from the base sample toward the training image: the component of (sample - base)
along (photo - base), as an RMS pixel intensity (a fraction of full scale, both images at
COMPARE_SIDE px). It is 0 at the start and reaches the base sample's RMS distance from the photo
when the sample is the photo; changes in other directions (colours or details the photo does not
have, noise) count nothing, so the curve reads copying, not change.

`drift.jsonl` in the run folder holds one line per validation: {"step", "drift": [per prompt],
"mean"}; `overfitting.png` plots the loss and the mean drift per step. With several training
images a sample's drift is toward the one it moved toward most.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

COMPARE_SIDE = 64  # px: both images are compared at this size (layout and colour survive it)
DRIFT_LOG = "drift.jsonl"
PLOT = "overfitting.png"
BASE_SAMPLES = "samples-base"  # the step-0 validation (the adapter adds exactly zero: the base model)


def pixels(img: Image.Image) -> np.ndarray:
    """RGB at COMPARE_SIDE px, flattened, in 0..1."""
    small = img.convert("RGB").resize((COMPARE_SIDE, COMPARE_SIDE), Image.BICUBIC)
    return np.asarray(small, np.float64).ravel() / 255.0


def toward(sample: np.ndarray, base: np.ndarray, photo: np.ndarray) -> float:
    """The component of `sample` - `base` along `photo` - `base` (pixels() of each), as an RMS
    intensity: 0 for the base sample, rms(photo - base) for the photo, 0 for a change orthogonal to
    the way to the photo; 0 when the base sample already is the photo."""
    way = photo - base
    length = float(np.linalg.norm(way))
    if length == 0.0:
        return 0.0
    return float(np.dot(sample - base, way) / length / np.sqrt(way.size))


@dataclass
class DriftTracker:
    """The training images and the base model's validation samples (one per prompt, the seeds the
    validation uses); `record` turns a later validation's samples into drifts and logs them."""

    training_images: Sequence[Image.Image]
    base_samples: Sequence[Image.Image]
    log: Path | None = None

    def __post_init__(self) -> None:
        self._photos = [pixels(t) for t in self.training_images]
        self._base = [pixels(s) for s in self.base_samples]

    def drifts(self, samples: Sequence[Image.Image]) -> list[float]:
        if len(samples) != len(self._base):
            raise ValueError(f"{len(samples)} validation samples for {len(self._base)} base samples")
        return [max(toward(pixels(s), b, photo) for photo in self._photos) for s, b in zip(samples, self._base)]

    def record(self, step: int, samples: Sequence[Image.Image]) -> float:
        """The mean drift of `samples` (validation at `step`), appended to the log; returns it."""
        values = self.drifts(samples)
        mean = float(np.mean(values))
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
            ylabel="RMS move toward the photo",
            zero_line=True,
        )
    )
    return stack(panels)


def _sample_file(folder: Path, prompt: int) -> Path:
    """The first sample of prompt number `prompt` as generate.sample_grid names it."""
    return folder / f"{prompt:02d}-0.png"


def has_samples(folder: Path, count: int) -> bool:
    return all(_sample_file(folder, i).is_file() for i in range(count))


def read_samples(folder: Path, count: int) -> list[Image.Image]:
    """The first sample of each of `count` prompts that generate.sample_grid wrote into `folder`."""
    return [Image.open(_sample_file(folder, i)).convert("RGB") for i in range(count)]


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
