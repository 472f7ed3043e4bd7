"""Seeded 32x32 scenes of coloured shapes with exact captions: the pretraining data.

The world is small on purpose: a handful of shapes, colours, positions and plain backgrounds,
so a tiny diffusion model can learn to obey every caption word, and the metrics can check from
pixels alone whether a generated image follows a prompt.

Held-out rule: a (shape, colour, background) combination is held out when
``(shape_index + 3 * colour_index + 4 * background_index) % 10 == 3`` (indices into SHAPES,
COLOURS, BACKGROUNDS). That is 44 of the 432 valid combos (~10%), spread so every shape, colour and
background still occurs in training. "train" samples never contain a held-out combo (neither
object); "heldout" samples contain only held-out combos.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 32
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring")

# Palette (RGB): pairwise distances are >= ~90, so "nearest palette colour" is unambiguous.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (250, 130, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "cyan": (40, 210, 220),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
BACKGROUNDS: tuple[str, ...] = tuple(PALETTE)

# Object centres (x, y) in continuous pixel coordinates (pixel i covers [i, i + 1)).
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (8.0, 16.0),
    "right": (24.0, 16.0),
    "top": (16.0, 8.0),
    "bottom": (16.0, 24.0),
    "centre": (16.0, 16.0),
}
PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
# A second object always sits opposite the first, so the two never overlap.
OPPOSITE: dict[str, str] = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
RADIUS = 5.5  # half the object size (objects are ~11 px across)
PLACEHOLDERS: tuple[str, ...] = ("sks", "zwx", "qly", "vrn", "bxt")


@dataclass(frozen=True)
class Scene:
    """One or two objects on a plain background; `second` is (shape, colour, position)."""

    shape: str
    colour: str
    position: str
    background: str
    second: tuple[str, str, str] | None = None

    def objects(self) -> list[tuple[str, str, str]]:
        first = [(self.shape, self.colour, self.position)]
        return first + ([tuple(self.second)] if self.second is not None else [])


def _is_heldout(shape: str, colour: str, background: str) -> bool:
    key = SHAPES.index(shape) + 3 * COLOURS.index(colour) + 4 * BACKGROUNDS.index(background)
    return key % 10 == 3


VALID_COMBOS: tuple[tuple[str, str, str], ...] = tuple(
    (s, c, b) for s in SHAPES for c in COLOURS for b in BACKGROUNDS if c != b
)
HELDOUT: frozenset[tuple[str, str, str]] = frozenset(k for k in VALID_COMBOS if _is_heldout(*k))
TRAIN_COMBOS: tuple[tuple[str, str, str], ...] = tuple(k for k in VALID_COMBOS if k not in HELDOUT)


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean inside-test for `shape` of half-size `r` at offsets (dx, dy) from its centre."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(ax, ay) <= 0.85 * r  # a bit smaller: a full square looks much heavier
    if shape == "triangle":  # apex up, base at 0.8 r below the centre
        return (dy >= -r) & (dy <= 0.8 * r) & (ax <= (dy + r) / 1.8)
    if shape == "diamond":
        return ax + ay <= r
    if shape == "cross":
        arm = 0.36 * r
        return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.5 * r) ** 2)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


_SS = 4  # supersampling factor: coverage from 4x4 subpixels gives cheap antialiasing
_SUB = (np.arange(SIZE * _SS) + 0.5) / _SS
_SUB_X, _SUB_Y = np.meshgrid(_SUB, _SUB)


def _coverage(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    inside = shape_mask(shape, _SUB_X - cx, _SUB_Y - cy, r).astype(np.float32)
    return inside.reshape(SIZE, _SS, SIZE, _SS).mean(axis=(1, 3))


def render(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw `scene` as a (32, 32, 3) uint8 image.

    With `rng`, each object is moved by up to +-2 px and scaled by up to +-15%, so a model
    trained on these images learns the words rather than exact pixels; `rng=None` is the
    canonical render.
    """
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = PALETTE[scene.background]
    for shape, colour, position in scene.objects():
        if colour == scene.background:
            raise ValueError(f"object colour equals the background ({colour})")
        cx, cy = POSITIONS[position]
        r = RADIUS
        if rng is not None:
            cx += rng.uniform(-2.0, 2.0)
            cy += rng.uniform(-2.0, 2.0)
            r *= rng.uniform(0.85, 1.15)
        a = _coverage(shape, cx, cy, r)[..., None]
        img = img * (1.0 - a) + np.asarray(PALETTE[colour], np.float32) * a
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(what: str, position: str, background: str) -> str:
    """Caption for a noun phrase `what` ("a red circle", "sks circle") at a position."""
    return f"a photo of {what} {PHRASES[position]} on {_article(background)} {background} background"


def caption(scene: Scene) -> str:
    """Exact caption, e.g. "a photo of a red circle on the left on a blue background" or,
    with a second object, "a photo of a red circle on the left and green square on the right
    on a blue background" (no article on the second object keeps every caption <= 19 words)."""
    shape, colour, position = scene.shape, scene.colour, scene.position
    what = f"{_article(colour)} {colour} {shape}"
    if scene.second is None:
        return describe(what, position, scene.background)
    shape2, colour2, position2 = scene.second
    what = f"{what} {PHRASES[position]} and {colour2} {shape2}"
    return describe(what, position2, scene.background)


_BASE_WORDS = ("a", "an", "photo", "of", "on", "the", "at", "in", "and", "background")
_POSITION_WORDS = ("left", "right", "top", "bottom", "centre")
VOCAB_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(_BASE_WORDS + _POSITION_WORDS + SHAPES + COLOURS + BACKGROUNDS + PLACEHOLDERS)
)


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def sample_scene(rng: np.random.Generator, split: str = "train", second_prob: float = 0.2) -> Scene:
    """A random scene from `split` ("train" or "heldout"; see the module docstring)."""
    if split == "train":
        combos = TRAIN_COMBOS
    elif split == "heldout":
        combos = tuple(sorted(HELDOUT))
    else:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    shape, colour, background = _pick(rng, combos)
    if rng.random() >= second_prob:
        return Scene(shape, colour, _pick(rng, tuple(POSITIONS)), background)
    position = _pick(rng, tuple(OPPOSITE))
    partners = [(s, c) for s, c, b in combos if b == background]
    shape2, colour2 = _pick(rng, partners)
    return Scene(shape, colour, position, background, (shape2, colour2, OPPOSITE[position]))
