"""Writing a file so that readers see the old one or the whole new one, never a part.

Every file tlora writes goes through the native writer (src/format.rs): a temporary file in the
same folder, flushed to disk, renamed over the target, and the folder synced. Adapter files use
it through `_native.save_file` (tlora.files.io.write_tensors); everything else (JSON, Markdown, PNG)
through `write_atomic`. A set of files that belong together (a PEFT export) is written as one
folder with `write_folder`.

The temporary names are `.NAME.tmp-PID` beside the target. A writer that was killed leaves its
temporary behind; each write removes the stale ones of its own target (`remove_stale_temps`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import _native
from ..errors import ConfigError, MissingFileError


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `path` atomically; returns the path."""
    path = Path(path)
    prepare_target(path)
    _native.write_atomic(str(path), data.encode() if isinstance(data, str) else bytes(data))
    return path


def prepare_target(path: Path) -> None:
    """Before writing `path`: its folder must exist (MissingFileError naming it), and the
    temporaries that killed writers of `path` left are removed."""
    folder = path.parent
    if not folder.is_dir():
        raise MissingFileError(f"cannot write {path}: folder {folder} does not exist (create it first)")
    remove_stale_temps(path)


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID` (and `write_folder`'s `.NAME.old-PID`) beside `path` whose process
    is gone: what a writer killed mid-write leaves. Temporaries of live processes (this one
    included) are kept. Returns what was removed."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:tmp|old)-(\d+)")
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or _alive(int(m.group(1))):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (one of another user counts as alive)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def write_folder(folder: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Write a folder whole: `fill(tmp)` writes the files into a temporary folder beside `folder`
    (`.NAME.tmp-PID`), which then takes its place in one rename; an existing `folder` is swapped
    out in the same step (Linux renameat2 RENAME_EXCHANGE; elsewhere two renames) and removed.
    Readers see the old folder or the new one, never a mix of both. Deciding whether an existing
    folder may be replaced is the caller's. Returns the folder."""
    folder = Path(folder)
    prepare_target(folder)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        if not folder.exists():
            os.rename(tmp, folder)
        elif _exchange(tmp, folder):
            shutil.rmtree(tmp)  # now the old folder
        else:
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _sync_folder(folder.parent)
    return folder


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 with RENAME_EXCHANGE); False where it is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # no kernel or filesystem support
        return False
    raise OSError(err, f"cannot replace {b}: {os.strerror(err)}", str(b))


def _sync_folder(folder: Path) -> None:
    """Make renames in `folder` durable (as the native writer does)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
        raise ConfigError(f"cannot tell an image format from {Path(path).name!r}: use .png or .jpg") from None
