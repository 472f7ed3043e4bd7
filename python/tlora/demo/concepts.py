"""Novel concepts for single-image customisation: patterned, two-colour sprites.

Pretraining only ever shows plain, one-colour shapes, so a striped circle or a checkered square
is genuinely new to the model; its class word (the plain shape) is known. Each concept has ONE
training image (the sprite in the centre of a fixed background) and is evaluated on prompts that
move it elsewhere and change the background, which is exactly where an overfitted adapter fails
(it copies the training background/position) and a healthy one keeps the sprite but obeys the
prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .world import PALETTE, POSITIONS, SIZE, describe, shape_mask

SPRITE = 12  # sprite side in pixels

Pattern = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (x, y) pixel grids -> bool "colour b"


def _stripes(x, y):  # horizontal bands, 2 px thick
    return (y // 2) % 2 == 1


def _checks(x, y):  # 3x3 checkerboard over the square's 10 px (cells of 3, 4, 3 px)
    def cell(v):
        return np.floor((v - 0.5) * 3 / 10).astype(int)

    return (cell(x) + cell(y)) % 2 == 1


def _dots(x, y):  # three 2x2 dots arranged like the triangle itself
    dots = ((5, 4), (3, 8), (7, 8))  # top-left pixel of each dot
    return np.any([(x >= dx) & (x <= dx + 1) & (y >= dy) & (y <= dy + 1) for dx, dy in dots], axis=0)


def _rings(x, y):  # concentric diamond bands, 2 px wide, around the sprite centre
    c = (SPRITE - 1) / 2
    return (np.floor(np.abs(x - c) + np.abs(y - c)).astype(int) // 2) % 2 == 1


def _halves(x, y):  # left half colour a, right half colour b
    return x >= SPRITE // 2


@dataclass(frozen=True)
class Concept:
    """A patterned sprite: `shape` filled with colour `a`, pattern cells in colour `b`."""

    name: str
    token: str
    class_word: str
    colours: tuple[str, str]
    pattern: Pattern
    train_position: str = "centre"
    train_background: str = "white"

    @property
    def phrase(self) -> str:
        """What replaces "{}" in prompts: "sks circle"."""
        return f"{self.token} {self.class_word}"

    @property
    def prompt_for_training(self) -> str:
        return f"a photo of {self.phrase}"

    def sprite(self) -> tuple[np.ndarray, np.ndarray]:
        """(rgb uint8 (12, 12, 3), alpha bool (12, 12)); rgb is 0 outside alpha."""
        y, x = np.mgrid[0:SPRITE, 0:SPRITE]
        c = (SPRITE - 1) / 2
        alpha = shape_mask(self.class_word, x - c, y - c, SPRITE / 2)
        use_b = self.pattern(x, y)
        a, b = (np.asarray(PALETTE[k], np.uint8) for k in self.colours)
        rgb = np.where(use_b[..., None], b, a).astype(np.uint8)
        rgb[~alpha] = 0
        return rgb, alpha

    def training_image(self) -> np.ndarray:
        """The single image the adapter is trained on."""
        return render_concept(self, self.train_position, self.train_background)


CONCEPTS: dict[str, Concept] = {
    c.name: c
    for c in (
        Concept("striped_circle", "sks", "circle", ("red", "yellow"), _stripes, train_background="blue"),
        Concept("checkered_square", "zwx", "square", ("blue", "white"), _checks, train_background="orange"),
        Concept("dotted_triangle", "qly", "triangle", ("green", "purple"), _dots, train_background="white"),
        Concept("ringed_diamond", "vrn", "diamond", ("orange", "black"), _rings, train_background="cyan"),
        Concept("split_cross", "bxt", "cross", ("cyan", "red"), _halves, train_background="yellow"),
    )
}


def concept(name: str) -> Concept:
    """Look a concept up by name."""
    try:
        return CONCEPTS[name]
    except KeyError:
        raise ValueError(f"unknown concept {name!r}; known: {', '.join(CONCEPTS)}") from None


def render_concept(c: Concept, position: str, background: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """The sprite pasted at `position` on a plain `background` (32x32 uint8).

    With `rng` the sprite moves by up to +-2 px (kept inside the image), mirroring the jitter of
    the pretraining scenes; the sprite itself is never resampled, so it stays pixel-exact.
    """
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}; known: {', '.join(POSITIONS)}")
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:] = PALETTE[background]
    rgb, alpha = c.sprite()
    cx, cy = POSITIONS[position]
    x0, y0 = int(round(cx - SPRITE / 2)), int(round(cy - SPRITE / 2))
    if rng is not None:
        x0 += int(rng.integers(-2, 3))
        y0 += int(rng.integers(-2, 3))
    x0, y0 = min(max(x0, 0), SIZE - SPRITE), min(max(y0, 0), SIZE - SPRITE)
    window = img[y0 : y0 + SPRITE, x0 : x0 + SPRITE]
    window[alpha] = rgb[alpha]
    return img


@dataclass(frozen=True)
class EvalPrompt:
    """A prompt template ("{}" = "token class") and the scene it asks for."""

    template: str
    position: str
    background: str

    def text(self, c: Concept) -> str:
        return self.template.format(c.phrase)


def _eval(position: str, background: str) -> EvalPrompt:
    # Same grammar as the pretraining captions, so every prompt word is in VOCAB_WORDS.
    return EvalPrompt(describe("{}", position, background), position, background)


# Every position, mostly off-centre (the training images are all centred), and every
# background; each concept's own training background shows up in at most two prompts.
EVAL_PROMPTS: tuple[EvalPrompt, ...] = (
    _eval("left", "green"),
    _eval("right", "blue"),
    _eval("top", "white"),
    _eval("bottom", "black"),
    _eval("left", "purple"),
    _eval("right", "orange"),
    _eval("top", "cyan"),
    _eval("bottom", "red"),
    _eval("centre", "green"),
    _eval("centre", "black"),
    _eval("left", "yellow"),
    _eval("bottom", "white"),
)
