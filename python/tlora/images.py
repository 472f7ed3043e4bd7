"""Reading training images and masks, and writing sample grids."""

from __future__ import annotations

import math
import os
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path

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


def check_input_file(path: str | Path, what: str, kind: str = "an image file") -> Path:
    """`path` if it is an existing regular file; folders, FIFOs and devices are refused before
    they are opened (a FIFO would block the read forever). `kind` says what is expected there."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise MissingFileError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise InputError(f"{what} {path} cannot be read ({e.strerror})") from None
    if stat.S_ISDIR(mode):
        hint = " (for a folder of photos use --image-dir)" if what == "image" else ""
        raise InputError(f"{what} {path} is a folder, not {kind}{hint}")
    if not stat.S_ISREG(mode):
        raise InputError(f"{what} {path} is not a regular file (a pipe, device or socket): give {kind}")
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
            raise InputError(
                f"{what} {path} is {w}x{h} pixels, more than the {MAX_PIXELS:,}-pixel limit: "
                "downscale it first (or it is a decompression bomb)"
            )
        img.load()
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"{what} {path} is refused as a decompression bomb ({e})") from None
    except Exception as e:  # PIL's decoders raise many types (OSError, SyntaxError, ValueError...) for bad files
        raise InputError(f"{what} {path} cannot be read as an image ({type(e).__name__}: {e})") from None
    # Float images (32-bit TIFF, mode "F") can hold NaN or infinity, which no conversion to pixels
    # can mean: refuse them rather than train on (or score) the black image they would become.
    if img.mode == "F":
        a = np.asarray(img)
        bad = int(a.size - np.isfinite(a).sum())
        if bad:
            raise InputError(
                f"{what} {path} has {bad} non-finite pixel value(s) (NaN or infinity) out of {a.size}: "
                "fix or re-export the image (a float TIFF with missing data?)"
            )
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
        raise InputError(
            f"image {path} is {img.width}x{img.height}; at resolution {resolution} its shorter "
            f"side must be at least {min_side(resolution)} px"
        )
    img = centre_crop(to_rgb(img), resolution)
    a = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    return a.unsqueeze(0)


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)


def subject_mask(mask: Image.Image, where: str) -> np.ndarray:
    """A mask's subject pixels (bool, height x width), the one rule for train and evaluate masks:
    a mask with transparency (a cut-out) marks the subject by its opaque pixels (alpha >= 128);
    otherwise white marks it (grey level >= 128). A mask without subject pixels is refused."""
    if _has_alpha(mask):
        alpha = np.asarray(mask.convert("RGBA"))[..., 3]
        if alpha.min() < 255:  # a fully opaque RGBA file is a plain black-and-white mask
            subject = alpha >= 128
            if not subject.any():
                raise InputError(
                    f"mask {where} is transparent everywhere (no alpha >= 128): a cut-out's opaque pixels mark "
                    "the subject, and it has none"
                )
            return subject
    subject = np.asarray(to_rgb(mask).convert("L")) >= 128
    if not subject.any():
        raise InputError(f"mask {where} is empty: white pixels (or opaque ones, in a cut-out) mark the subject")
    return subject


def load_mask(path: str | Path, size: int, images: Sequence[str | Path] = ()) -> torch.Tensor:
    """A subject mask as a (1, 1, size, size) tensor of 0/1 (see `subject_mask`), centre-cropped
    like the image. It must have the size of every one of `images` (the training photos it
    masks): a mask of another size would be cropped out of alignment with them."""
    img = _open(path, "mask")
    for image in images:
        w, h = _open(image, "image").size
        if img.size != (w, h):
            raise InputError(
                f"mask {path} is {img.width}x{img.height} but image {image} is {w}x{h}: give a mask of the image's size"
            )
    subject = Image.fromarray(subject_mask(img, str(path)).astype(np.uint8) * 255, "L")
    m = torch.from_numpy((np.asarray(centre_crop(subject, size, Image.NEAREST)) >= 128).astype(np.float32))
    if m.sum() == 0:
        raise InputError(
            f"mask {path}: no subject pixel is left after centre-cropping and scaling it to {size}x{size} "
            "(the subject is outside the square centre crop, or smaller than one latent pixel): "
            "nothing to train on"
        )
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


MIN_LABELLED_TILE = 96  # px: narrower samples are enlarged in a labelled grid, or their labels would not fit


def label_font(size: int):
    """Pillow's bundled font (no font files needed) at `size` px."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def wrap(text: str, font, width: int) -> list[str]:
    """Break `text` into lines no wider than `width` px: at spaces, a word too long on its own at characters;
    explicit newlines are kept."""
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split():
            while font.getlength(word) > width and len(word) > 1:  # a word wider than the column
                cut = 1
                while cut < len(word) and font.getlength(word[: cut + 1]) <= width:
                    cut += 1
                if line:
                    lines.append(line)
                    line = ""
                lines.append(word[:cut])
                word = word[cut:]
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def text_block(text: str, width: int, font, pad: int) -> Image.Image:
    """`text` wrapped to `width` - 2 `pad` px, drawn black on white."""
    from PIL import ImageDraw

    lines = wrap(text, font, max(1, width - 2 * pad)) if text else []
    step = round(font.size * 1.25)
    img = Image.new("RGB", (width, 2 * pad + step * len(lines)), "white")
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((pad, pad + i * step), line, fill="black", font=font)
    return img


def grid(
    images: Sequence[Image.Image],
    cols: int | None = None,
    col_labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    font_size: int | None = None,
    caption: str | None = None,
) -> Image.Image:
    """Tile images (all the same size) into one picture, row-major. With `col_labels` (one per column:
    method, rank, step...) a header row names the columns; with `row_labels` (one per row: the prompt)
    a left margin names the rows, text wrapped to fit. `font_size` defaults to a size that reads at
    the tiles' scale; tiles narrower than MIN_LABELLED_TILE px are enlarged by a whole factor. `caption`
    (with labels): a note under the grid, wrapped to its width."""
    if not images:
        raise ValueError("no images to tile")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    if col_labels is None and row_labels is None:
        out = Image.new("RGB", (cols * w, rows * h), "white")
        for i, img in enumerate(images):
            out.paste(img.convert("RGB"), ((i % cols) * w, (i // cols) * h))
        return out
    if w < MIN_LABELLED_TILE:  # enlarge small samples (NEAREST, whole factor) so a label fits above each
        k = -(-MIN_LABELLED_TILE // w)
        images = [img.resize((img.width * k, img.height * k), Image.NEAREST) for img in images]
        w, h = w * k, h * k
    if col_labels is not None and len(col_labels) != cols:
        raise ValueError(f"{len(col_labels)} column labels for {cols} columns")
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
    font = label_font(font_size or max(11, w // 14))
    pad = max(2, font.size // 3)
    heads = [text_block(t, w, font, pad) for t in col_labels] if col_labels is not None else []
    head_h = max((b.height for b in heads), default=0)
    side_w = max(w, 12 * font.size) if row_labels is not None else 0
    sides = [text_block(t, side_w, font, pad) for t in row_labels] if row_labels is not None else []
    row_h = [max(h, sides[r].height if sides else 0) for r in range(rows)]
    tops = [head_h + sum(row_h[:r]) for r in range(rows)]
    out = Image.new("RGB", (side_w + cols * w, head_h + sum(row_h)), "white")
    for c, block in enumerate(heads):
        out.paste(block, (side_w + c * w, 0))
    for r, block in enumerate(sides):
        out.paste(block, (0, tops[r]))
    for i, img in enumerate(images):
        out.paste(img.convert("RGB"), (side_w + (i % cols) * w, tops[i // cols]))
    if caption:
        note = text_block(caption, out.width, font, pad)
        framed = Image.new("RGB", (out.width, out.height + note.height), "white")
        framed.paste(out, (0, 0))
        framed.paste(note, (0, out.height))
        out = framed
    return out


CHART_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f")


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values (1, 2 or 5 times a power of ten apart) covering lo..hi."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        raise ValueError(f"cannot place ticks on {lo}..{hi}")
    if hi <= lo:
        lo, hi = lo - 0.5, lo + 0.5
    raw = (hi - lo) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    ticks = []
    k = 0
    while first + k * step <= hi + step * 1e-9:
        ticks.append(round(first + k * step, 12))
        k += 1
    if ticks[-1] < hi:
        ticks.append(round(first + k * step, 12))
    return ticks


def line_chart(
    series: dict[str, Sequence[tuple[float, float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    size: tuple[int, int] = (720, 360),
    zero_line: bool = False,
) -> Image.Image:
    """A line chart (Pillow only): one coloured line with dots per named series of (x, y) points, axes
    with round ticks and labels, a title and a legend. `zero_line` draws y = 0 dashed."""
    from PIL import ImageDraw

    points = [p for pts in series.values() for p in pts]
    if not points:
        raise ValueError(f"nothing to plot in {title!r}")
    font = label_font(13)
    width, height = size
    left, right, top, bottom = 70, 20, 30, 45
    legend_h = 18 * len(series)
    xt = nice_ticks(min(x for x, _ in points), max(x for x, _ in points))
    ys = [y for _, y in points] + ([0.0] if zero_line else [])
    yt = nice_ticks(min(ys), max(ys))
    img = Image.new("RGB", (width, height + legend_h), "white")
    draw = ImageDraw.Draw(img)
    x0, x1, y0, y1 = left, width - right, height - bottom, top

    def at(x: float, y: float) -> tuple[float, float]:
        fx = (x - xt[0]) / (xt[-1] - xt[0])
        fy = (y - yt[0]) / (yt[-1] - yt[0])
        return x0 + fx * (x1 - x0), y0 + fy * (y1 - y0)

    draw.rectangle((x0, y1, x1, y0), outline="black")
    for t in xt:
        px, _ = at(t, yt[0])
        draw.line((px, y0, px, y0 + 4), fill="black")
        draw.text((px, y0 + 6), f"{t:g}", fill="black", font=font, anchor="ma")
    for t in yt:
        _, py = at(xt[0], t)
        draw.line((x0 - 4, py, x0, py), fill="black")
        draw.line((x0 + 1, py, x1 - 1, py), fill="#e6e6e6")
        draw.text((x0 - 6, py), f"{t:.3g}", fill="black", font=font, anchor="rm")
    if zero_line and yt[0] < 0 < yt[-1]:
        _, pz = at(xt[0], 0.0)
        for sx in range(int(x0), int(x1), 8):
            draw.line((sx, pz, min(sx + 4, x1), pz), fill="black")
    draw.text(((x0 + x1) / 2, 6), title, fill="black", font=font, anchor="ma")
    draw.text(((x0 + x1) / 2, height - 18), xlabel, fill="black", font=font, anchor="ma")
    label = Image.new("RGB", (height, 16), "white")
    ImageDraw.Draw(label).text((height / 2, 0), ylabel, fill="black", font=font, anchor="ma")
    img.paste(label.rotate(90, expand=True), (4, 0))
    for i, (name, pts) in enumerate(series.items()):
        colour = CHART_COLOURS[i % len(CHART_COLOURS)]
        xy = [at(x, y) for x, y in sorted(pts)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for px, py in xy if len(xy) <= 60 else ():
            draw.ellipse((px - 2.5, py - 2.5, px + 2.5, py + 2.5), fill=colour)
        ly = height + 18 * i + 2
        draw.line((x0, ly + 7, x0 + 24, ly + 7), fill=colour, width=3)
        draw.text((x0 + 30, ly), name, fill="black", font=font)
    return img


def stack(images: Sequence[Image.Image]) -> Image.Image:
    """Images one above the other, left-aligned, on white."""
    out = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    y = 0
    for img in images:
        out.paste(img.convert("RGB"), (0, y))
        y += img.height
    return out
