"""Pixel metrics for the toy world: prompt alignment, concept fidelity and sample diversity.

The paper measures text alignment with CLIP and concept fidelity with DINO/CLIP image
similarity; neither exists offline. In the toy world both questions have exact pixel answers:
the prompt asks for a background colour and a position, which can be read off the image, and
the concept is a known sprite, which can be searched for by template matching.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .concepts import Concept
from .concepts import concept as _concept_by_name
from .world import PALETTE, POSITIONS

_NAMES = tuple(PALETTE)
_RGB = np.array([PALETTE[n] for n in _NAMES], np.float32)
_CENTRES = np.array([POSITIONS[p] for p in POSITIONS], np.float32)
BORDER = 2  # the frame (px) read for the background; objects stay clear of it
OBJECT_THRESHOLD = 45.0  # RGB distance from the background that counts as "object"; palette gaps >= 90
MIN_OBJECT_PIXELS = 8


def _as_uint8(img) -> np.ndarray:
    """Accept uint8 HxWx3 or float HxWx3 in [0, 1] (e.g. a decoded pipeline output)."""
    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {a.shape}")
    return a


def _border(img: np.ndarray) -> np.ndarray:
    m = np.zeros(img.shape[:2], bool)
    m[:BORDER], m[-BORDER:], m[:, :BORDER], m[:, -BORDER:] = True, True, True, True
    return img[m].astype(np.float32)


def nearest_colour(rgb) -> str:
    """Name of the palette colour closest (RGB distance) to `rgb`."""
    d = np.linalg.norm(_RGB - np.asarray(rgb, np.float32), axis=-1)
    return _NAMES[int(np.argmin(d))]


def background_colour(img) -> str:
    """The palette colour most border pixels are closest to (a majority vote, so an object or
    noise touching the edge cannot flip it)."""
    px = _border(_as_uint8(img))
    votes = np.argmin(np.linalg.norm(px[:, None, :] - _RGB[None], axis=-1), axis=1)
    return _NAMES[int(np.bincount(votes, minlength=len(_NAMES)).argmax())]


def _box3(a: np.ndarray) -> np.ndarray:
    p = np.pad(a, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = a.shape[:2]
    return sum(p[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9.0


def object_position(img, background: str | Sequence[float] | None = None) -> str | None:
    """Nearest position (see world.POSITIONS) to the centroid of the non-background pixels.

    `background` is a palette name or an RGB triple; None uses the image's own median border
    colour, which tolerates the slightly-off backgrounds a generator produces. Returns None when
    fewer than MIN_OBJECT_PIXELS pixels differ from the background.
    """
    a = _as_uint8(img)
    if background is None:
        ref = np.median(_border(a), axis=0)
    elif isinstance(background, str):
        ref = np.asarray(PALETTE[background], np.float32)
    else:
        ref = np.asarray(background, np.float32)
    # A 3x3 box blur first: generated images carry pixel noise, which would otherwise scatter
    # "object" pixels over the whole image and drag the centroid to the centre.
    mask = np.linalg.norm(_box3(a.astype(np.float32)) - ref, axis=-1) > OBJECT_THRESHOLD
    if mask.sum() < MIN_OBJECT_PIXELS:
        return None
    ys, xs = np.nonzero(mask)
    centroid = np.array([xs.mean() + 0.5, ys.mean() + 0.5], np.float32)
    return tuple(POSITIONS)[int(np.argmin(np.linalg.norm(_CENTRES - centroid, axis=-1)))]


def alignment(img, position: str, background: str) -> float:
    """Prompt alignment in [0, 1]: mean of (background correct, object position correct)."""
    bg_ok = background_colour(img) == background
    pos_ok = object_position(img) == position
    return 0.5 * (float(bg_ok) + float(pos_ok))


def _resize_nearest(a: np.ndarray, size: int) -> np.ndarray:
    idx = np.minimum((np.arange(size) + 0.5) * a.shape[0] / size, a.shape[0] - 1).astype(int)
    return a[idx][:, idx]


def fidelity(img, sprite_rgb: np.ndarray, sprite_alpha: np.ndarray, scales=(0.8, 1.0, 1.2)) -> float:
    """Best normalised cross-correlation, in [-1, 1], of the sprite with any image patch.

    Only pixels under the sprite's alpha count, so the background does not matter. Both sides
    are centred on the *sprite's* mean colour (not each patch's own mean): a flat patch then
    scores exactly 0 whatever its colour, and a patch with the right pattern in the wrong colours
    scores low, because its colour offset inflates the patch norm. Searched over every position
    and the given scales (nearest-neighbour resized sprite).
    """
    a = _as_uint8(img).astype(np.float32)
    best = -1.0
    for s in scales:
        size = max(2, int(round(sprite_alpha.shape[0] * s)))
        if size > min(a.shape[:2]):
            continue
        alpha = _resize_nearest(np.asarray(sprite_alpha, bool), size)
        ref = _resize_nearest(np.asarray(sprite_rgb, np.float32), size)[alpha]  # (n, 3)
        mean = ref.mean(axis=0)
        ref = ref - mean
        ref_norm = np.sqrt((ref**2).sum())
        if ref_norm == 0:
            continue
        win = sliding_window_view(a, (size, size), axis=(0, 1))  # (H', W', 3, size, size)
        win = np.moveaxis(win, 2, -1)[:, :, alpha] - mean  # (H', W', n, 3)
        num = (win * ref).sum(axis=(2, 3))
        den = np.sqrt((win**2).sum(axis=(2, 3))) * ref_norm
        ncc = np.where(den > 0, num / np.maximum(den, 1e-12), 0.0)
        best = max(best, float(ncc.max()))
    return float(np.clip(best, -1.0, 1.0))


def diversity(images) -> float:
    """Mean pairwise RMS distance between images scaled to [0, 1] (so itself in [0, 1]);
    0 for identical samples. The paper's diversity complements fidelity: an overfitted adapter
    regenerates the same picture for every seed."""
    x = [(_as_uint8(i).astype(np.float64) / 255.0).ravel() for i in images]
    if len(x) < 2:
        return 0.0
    return float(np.mean([np.sqrt(np.mean((p - q) ** 2)) for p, q in combinations(x, 2)]))


def _target(prompt_target) -> tuple[str, str]:
    if isinstance(prompt_target, Mapping):
        return prompt_target["position"], prompt_target["background"]
    if hasattr(prompt_target, "position") and hasattr(prompt_target, "background"):
        return prompt_target.position, prompt_target.background
    position, background = prompt_target
    return position, background


def score(images, concept: Concept | str, prompt_target) -> dict[str, float]:
    """Metrics for the samples of one prompt.

    `prompt_target` is an EvalPrompt, a mapping with "position"/"background", or a
    (position, background) pair. Returns mean alignment, fidelity, the diversity of the set, and
    the two halves of alignment (background_accuracy, position_accuracy).
    """
    c = _concept_by_name(concept) if isinstance(concept, str) else concept
    position, background = _target(prompt_target)
    images = [_as_uint8(i) for i in images]
    if not images:
        raise ValueError("score needs at least one image")
    rgb, alpha = c.sprite()
    return {
        "alignment": float(np.mean([alignment(i, position, background) for i in images])),
        "fidelity": float(np.mean([fidelity(i, rgb, alpha) for i in images])),
        "diversity": diversity(images),
        "background_accuracy": float(np.mean([background_colour(i) == background for i in images])),
        "position_accuracy": float(np.mean([object_position(i) == position for i in images])),
    }
