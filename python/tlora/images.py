"""Reading training images and masks, and writing sample grids."""

from __future__ import annotations

import math
import os
import stat
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import InputError, MissingFileError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Largest image read (64 megapixels, e.g. 8192 x 8192): a training photo is cropped to at most a
# few megapixels, and a small file that claims more is a decompression bomb.
MAX_PIXELS = 64 * 2**20


def min_side(resolution: int) -> int:
    """The smallest image side accepted for a training resolution: upscaling more than 4x only
    teaches blur."""
    return max(16, resolution // 4)


def check_input_file(path: str | Path, what: str) -> Path:
    """`path` if it is an existing regular file; folders, FIFOs and devices are refused before
    they are opened (a FIFO would block the read forever)."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise MissingFileError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise InputError(f"{what} {path} cannot be read ({e.strerror})") from None
    if stat.S_ISDIR(mode):
        hint = " (for a folder of photos use --image-dir)" if what == "image" else ""
        raise InputError(f"{what} {path} is a folder, not an image file{hint}")
    if not stat.S_ISREG(mode):
        raise InputError(f"{what} {path} is not a regular file (a pipe, device or socket): give an image file")
    return path


def _open(path: str | Path, what: str) -> Image.Image:
    path = check_input_file(path, what)
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below is the one that applies; PIL's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise InputError(f"{what} {path} is {w}x{h} pixels, more than the {MAX_PIXELS:,}-pixel limit: "
                             "downscale it first (or it is a decompression bomb)")
        img.load()
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"{what} {path} is refused as a decompression bomb ({e})") from None
    except Exception as e:  # PIL's decoders raise many types (OSError, SyntaxError, ValueError...) for bad files
        raise InputError(f"{what} {path} cannot be read as an image ({type(e).__name__}: {e})") from None
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
        raise InputError(f"image {path} is {img.width}x{img.height}; at resolution {resolution} its shorter "
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
        raise InputError(f"mask {path} is empty: white pixels mark the subject")
    return m[None, None]


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.exists():
        raise MissingFileError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise InputError(f"image folder {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"image folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
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
