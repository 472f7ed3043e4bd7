"""tlora.files.atomic: the one atomic writer for JSON, Markdown and images (over the native one), the
whole-folder writer, and the removal of temporaries that killed writers leave."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import tlora
from tlora.files.atomic import remove_stale_temps, save_image, write_atomic, write_folder
from tlora.files.io import write_tensors


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


def test_a_missing_folder_is_a_missing_file_error_naming_it(tmp_path):
    folder = tmp_path / "no" / "such"
    model = torch.nn.Sequential()
    model.add_module("to_q", torch.nn.Linear(4, 4))
    tlora.inject(model, rank=2, target_modules=["to_q"])
    for write in (
        lambda: write_atomic(folder / "x.json", "{}"),
        lambda: write_tensors(folder / "x.safetensors", [("a", torch.zeros(1))], {}),
        lambda: tlora.save(model, folder / "a.safetensors"),
        lambda: write_folder(folder / "export", lambda tmp: None),
    ):
        with pytest.raises(tlora.MissingFileError, match=f"folder {folder} does not exist"):
            write()
    assert list(tmp_path.iterdir()) == []


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path):
    """A writer killed mid-write leaves `.NAME.tmp-PID` (4-92 MB for adapters); the next write of
    NAME removes those whose process is gone, and nothing else."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = dead_pid()
        stale = [tmp_path / f".a.safetensors.tmp-{dead}", tmp_path / f".report.json.tmp-{dead}"]
        kept = [
            tmp_path / f".a.safetensors.tmp-{live.pid}",  # another process still writing it
            tmp_path / f".b.safetensors.tmp-{os.getpid()}",  # this process's (another thread's)
            tmp_path / f".other.json.tmp-{dead}",  # another file's: removed when that one is written
            tmp_path / f".a.safetensors.tmp-{dead}x",  # not a name the writers use
        ]
        for p in stale + kept:
            p.write_bytes(b"partial")
        (tmp_path / f".export.tmp-{dead}").mkdir()  # write_folder's own, half filled
        (tmp_path / f".export.tmp-{dead}" / "adapter_model.safetensors").write_bytes(b"partial")

        model = torch.nn.Sequential()
        model.add_module("to_q", torch.nn.Linear(4, 4))
        tlora.inject(model, rank=2, target_modules=["to_q"])
        tlora.save(model, tmp_path / "a.safetensors")
        write_atomic(tmp_path / "report.json", "{}")
        write_folder(tmp_path / "export", lambda tmp: write_atomic(tmp / "x.json", "{}"))
        assert not any(p.exists() for p in stale) and not (tmp_path / f".export.tmp-{dead}").exists()
        assert all(p.read_bytes() == b"partial" for p in kept)
        assert remove_stale_temps(tmp_path / "other.json") == [tmp_path / f".other.json.tmp-{dead}"]
        assert remove_stale_temps(tmp_path / "b.safetensors") == []
    finally:
        live.kill()
        live.wait()


def test_write_folder_replaces_a_folder_whole(tmp_path, monkeypatch):
    out = tmp_path / "export"

    def fill(files):
        return lambda tmp: [write_atomic(tmp / name, text) for name, text in files.items()]

    write_folder(out, fill({"a": "1", "b": "1"}))
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a": "1", "b": "1"}
    write_folder(out, fill({"a": "2"}))  # an existing folder is swapped out, not merged into
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a": "2"}

    def fails(tmp):
        write_atomic(tmp / "a", "3")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder(out, fails)
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a": "2"}  # the old folder, untouched
    # Without renameat2 (other systems): two renames, same result.
    monkeypatch.setattr("tlora.files.atomic._exchange", lambda a, b: False)
    write_folder(out, fill({"c": "4"}))
    assert {p.name: p.read_text() for p in out.iterdir()} == {"c": "4"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_writer_killed_mid_folder_leaves_the_old_folder(tmp_path):
    """SIGKILL after the first of two files: the folder still holds the old pair, the partial one
    stays as .export.tmp-PID until the next write of the folder removes it."""
    out = tmp_path / "export"
    write_folder(out, lambda tmp: [write_atomic(tmp / n, "old") for n in ("weights", "config")])
    code = textwrap.dedent(
        f"""
        import os, signal
        from tlora.files.atomic import write_atomic, write_folder

        def fill(tmp):
            write_atomic(tmp / "weights", "new")
            os.kill(os.getpid(), signal.SIGKILL)

        write_folder({str(out)!r}, fill)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.wait(timeout=120) == -9
    assert {p.name: p.read_text() for p in out.iterdir()} == {"weights": "old", "config": "old"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [f".export.tmp-{proc.pid}"]
    write_folder(out, lambda tmp: [write_atomic(tmp / n, "new") for n in ("weights", "config")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert {p.name: p.read_text() for p in out.iterdir()} == {"weights": "new", "config": "new"}
