"""tlora.atomic: the one atomic writer for JSON, Markdown and images (over the native one)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tlora.atomic import save_image, write_atomic


def test_text_and_bytes_land_whole_and_replace_the_old_file(tmp_path):
    path = tmp_path / "report.json"
    write_atomic(path, json.dumps({"a": 1}))
    assert json.loads(path.read_text()) == {"a": 1}
    write_atomic(path, b"\x00\x01binary")
    assert path.read_bytes() == b"\x00\x01binary"
    write_atomic(path, "é")  # text is UTF-8
    assert path.read_bytes() == "é".encode()
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left behind


def test_a_failed_write_names_the_target_and_changes_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        write_atomic(tmp_path / "missing" / "x.json", "{}")
    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "inside.txt").write_text("kept")
    with pytest.raises(OSError, match="taken"):
        write_atomic(folder, "would replace a folder")
    assert (folder / "inside.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_images_are_saved_in_the_format_their_suffix_names(tmp_path):
    pixels = np.arange(8 * 6 * 3, dtype=np.uint8).reshape(8, 6, 3)
    path = save_image(Image.fromarray(pixels), tmp_path / "grid.png")
    with Image.open(path) as back:
        assert back.format == "PNG" and np.array_equal(np.asarray(back), pixels)
    with pytest.raises(ValueError, match=r"grid\.unknown"):
        save_image(Image.fromarray(pixels), tmp_path / "grid.unknown")
