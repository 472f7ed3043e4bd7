"""Reading training images and masks, and writing sample grids."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def min_side(resolution: int) -> int:
    """The smallest image side accepted for a training resolution: upscaling more than 4x only
    teaches blur."""
    return max(16, resolution // 4)


def _open(path: str | Path, what: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{what} {path} cannot be read as an image ({e})") from None
    return ImageOps.exif_transpose(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16-bit and float greyscale rescaled, alpha composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.round().astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return img.convert("RGB")


def centre_crop(img: Image.Image, resolution: int, resample=Image.BICUBIC) -> Image.Image:
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    return img.crop((left, top, left + side, top + side)).resize((resolution, resolution), resample)


def load_image(path: str | Path, resolution: int) -> torch.Tensor:
    """A training image as a (1, 3, R, R) float tensor in [-1, 1], centre-cropped to R."""
    img = _open(path, "image")
    if min(img.size) < min_side(resolution):
        raise ValueError(f"image {path} is {img.width}x{img.height}; at resolution {resolution} its shorter "
                         f"side must be at least {min_side(resolution)} px")
    img = centre_crop(to_rgb(img), resolution)
    a = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    return a.unsqueeze(0)


def load_mask(path: str | Path, size: int) -> torch.Tensor:
    """A subject mask as a (1, 1, size, size) tensor of 0/1 (white = subject), centre-cropped like the image."""
    img = _open(path, "mask")
    img = centre_crop(to_rgb(img).convert("L"), size, Image.NEAREST)
    m = torch.from_numpy((np.asarray(img) >= 128).astype(np.float32))
    if m.sum() == 0:
        raise ValueError(f"mask {path} is empty: white pixels mark the subject")
    return m[None, None]


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"image folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile images (all the same size) into one picture, row-major."""
    if not images:
        raise ValueError("no images to tile")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    out = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        out.paste(img.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return out
