"""Writing a file so that readers see the old one or the whole new one, never a part.

Every file tlora writes goes through the native writer (src/format.rs): a temporary file in the
same folder, flushed to disk, renamed over the target, and the folder synced. Adapter files use
it through `_native.save_file`; everything else (JSON, Markdown, PNG) through `write_atomic`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from . import _native


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `path` atomically; returns the path."""
    path = Path(path)
    _native.write_atomic(str(path), data.encode() if isinstance(data, str) else bytes(data))
    return path


def save_image(image: Any, path: str | os.PathLike, **options: Any) -> Path:
    """Save a PIL image atomically, in the format its suffix names (`options` go to PIL)."""
    buffer = io.BytesIO()
    image.save(buffer, format=_image_format(path), **options)
    return write_atomic(path, buffer.getvalue())


def _image_format(path: str | os.PathLike) -> str:
    from PIL import Image

    suffix = Path(path).suffix.lower()
    try:
        return Image.registered_extensions()[suffix]
    except KeyError:
        raise ValueError(f"cannot tell an image format from {Path(path).name!r}: use .png or .jpg") from None
