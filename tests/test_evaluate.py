"""`tlora evaluate` (CLIP-I, CLIP-T, DINO) on tiny random CLIP / DINOv2 models saved from configs,
and the labelled grids. Scores of random models mean nothing; what is tested is that the tool
computes the documented cosines: against the models' own feature functions, cosine by hand in float64."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import load_file, save_file

from tlora.cli import main
from tlora.errors import InputError, MissingFileError
from tlora.evaluate import Encoders, evaluate, markdown, parse_colour, prompt_templates
from tlora.images import MIN_LABELLED_TILE, grid, label_font
from tlora.prompt_sets import PROMPT_SETS
from tlora.testing.tiny import save_tiny_clip, save_tiny_dino


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    """The tiny CLIP and DINOv2 folders `tlora evaluate` scores with: (clip, dino)."""
    root = tmp_path_factory.mktemp("scorers")
    return save_tiny_clip(root / "clip"), save_tiny_dino(root / "dino")


def _noise(seed: int, size: int = 40) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _save(img: Image.Image, path, prompt: str | None = None):
    info = None
    if prompt is not None:
        info = PngInfo()
        info.add_text("prompt", prompt)
    img.save(path, pnginfo=info)
    return path


def _cos64(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float((a @ b) / (a.norm() * b.norm()))


def _features(out):
    return out if torch.is_tensor(out) else out.pooler_output


def test_identical_images_score_one(scorers, tmp_path):
    clip, dino = scorers
    img = _noise(0)
    ref = _save(img, tmp_path / "ref.png")
    gen = tmp_path / "gen"
    gen.mkdir()
    _save(img, gen / "00-0.png", "a photo of a dog")
    _save(img, gen / "00-1.png", "a photo of a dog")
    rep = evaluate(gen, [ref], clip=str(clip), dino=str(dino))
    assert rep["overall"]["images"] == 2
    assert rep["overall"]["clip_i"] == pytest.approx(1.0, abs=1e-6)
    assert rep["overall"]["dino"] == pytest.approx(1.0, abs=1e-6)
    assert rep["per_prompt"][0]["prompt"] == "a photo of a dog" and rep["per_prompt"][0]["images"] == 2


def test_scores_equal_hand_computation(scorers, tmp_path):
    """CLIP-I, CLIP-T and DINO of a pair, recomputed from the models' own feature functions
    (get_image_features / get_text_features / CLS of last_hidden_state) and cosines in float64."""
    from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

    clip_dir, dino_dir = scorers
    refs = [_noise(1), _noise(2)]
    ref_paths = [_save(r, tmp_path / f"ref{i}.png") for i, r in enumerate(refs)]
    gen = tmp_path / "gen"
    gen.mkdir()
    prompts = ["a photo of sks dog in the snow", "a red cat"]
    gens = [_noise(3), _noise(4, size=56)]
    for i, (g, p) in enumerate(zip(gens, prompts)):
        _save(g, gen / f"{i:02d}-0.png", p)
    (gen / "grid.png").write_bytes(b"skipped")  # tlora generate's overview is not scored
    rep = evaluate(gen, ref_paths, clip=str(clip_dir), dino=str(dino_dir), drop_words=["sks"])

    clip, proc = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    dino, dproc = AutoModel.from_pretrained(dino_dir).eval(), AutoImageProcessor.from_pretrained(dino_dir)
    with torch.no_grad():
        img_f = lambda im: _features(clip.get_image_features(**proc(images=[im], return_tensors="pt")))[0]  # noqa: E731
        txt_f = lambda t: _features(clip.get_text_features(**proc(text=[t], return_tensors="pt")))[0]  # noqa: E731
        cls_f = lambda im: dino(**dproc(images=[im], return_tensors="pt")).last_hidden_state[0, 0]  # noqa: E731
        for row, g, text in zip(rep["per_image"], gens, ["a photo of dog in the snow", "a red cat"]):
            assert row["clip_i"] == pytest.approx(np.mean([_cos64(img_f(g), img_f(r)) for r in refs]), abs=1e-5)
            assert row["clip_t"] == pytest.approx(_cos64(img_f(g), txt_f(text)), abs=1e-5)
            assert row["dino"] == pytest.approx(np.mean([_cos64(cls_f(g), cls_f(r)) for r in refs]), abs=1e-5)
    assert [r["file"] for r in rep["per_image"]] == ["00-0.png", "01-0.png"]
    # Random models still give different images different scores: the check above can fail.
    assert rep["per_image"][0]["clip_i"] != pytest.approx(rep["per_image"][1]["clip_i"], abs=1e-4)
    assert rep["overall"]["clip_t"] == pytest.approx(np.mean([r["clip_t"] for r in rep["per_image"]]))


def test_mask_fills_reference_background(scorers, tmp_path):
    """With a mask, CLIP-I and DINO see the reference with its background (mask black) replaced by
    the fill colour: the same scores as an unmasked reference painted that way by hand."""
    clip, dino = scorers
    ref = _noise(5)
    mask = np.zeros((40, 40), np.uint8)
    mask[10:30, 12:28] = 255
    painted = np.asarray(ref).copy()
    painted[mask == 0] = (0, 128, 255)
    gen = tmp_path / "gen"
    gen.mkdir()
    _save(_noise(6), gen / "00-0.png", "a dog")
    _save(Image.fromarray(painted), gen / "01-0.png", "a dog")
    enc = Encoders.load(str(clip), str(dino))
    ref_p, mask_p = _save(ref, tmp_path / "ref.png"), _save(Image.fromarray(mask), tmp_path / "mask.png")
    masked = evaluate(gen, [ref_p], masks=[mask_p], mask_fill=(0, 128, 255), encoders=enc)
    by_hand = evaluate(gen, [_save(Image.fromarray(painted), tmp_path / "painted.png")], encoders=enc)
    plain = evaluate(gen, [ref_p], encoders=enc)
    for k in ("clip_i", "dino"):
        for a, b, c in zip(masked["per_image"], by_hand["per_image"], plain["per_image"]):
            assert a[k] == pytest.approx(b[k], abs=1e-9)
            assert abs(a[k] - c[k]) > 1e-4
        assert masked["per_image"][1][k] == pytest.approx(1.0, abs=1e-6)  # generated == masked reference
    assert [r["clip_t"] for r in masked["per_image"]] == [r["clip_t"] for r in plain["per_image"]]  # text: no mask
    # A cut-out (alpha = the subject, colours white everywhere) masks the same pixels.
    cutout = np.full((40, 40, 4), 255, np.uint8)
    cutout[..., 3] = mask
    cut = evaluate(
        gen,
        [ref_p],
        masks=[_save(Image.fromarray(cutout), tmp_path / "cut.png")],
        mask_fill=(0, 128, 255),
        encoders=enc,
    )
    assert cut["per_image"] == masked["per_image"]


def test_prompt_sources(scorers, tmp_path):
    clip, _ = scorers
    gen = tmp_path / "gen"
    gen.mkdir()
    for i in (0, 2):
        _save(_noise(i), gen / f"{i:02d}-0.png")  # no prompt chunk
    ref = _save(_noise(9), tmp_path / "ref.png")
    enc = Encoders.load(str(clip))
    rep = evaluate(gen, [ref], prompt_set="live", concept="dog", encoders=enc)
    assert [r["prompt"] for r in rep["per_image"]] == ["a dog in the jungle", "a dog on the beach"]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"file": "00-0.png", "prompt": "x one"}\n{"file": "02-0.png", "prompt": "x two"}\n')
    rep = evaluate(gen, [ref], prompts=manifest, encoders=enc)
    assert [r["prompt"] for r in rep["per_image"]] == ["x one", "x two"]
    assert len(prompt_templates("object")) == len(prompt_templates("live")) == 25
    assert (
        len(set(prompt_templates("object")) | set(prompt_templates("live"))) == 35
    )  # 15 shared (10 scenes, 5 recolourings) + 10 + 10
    # the paper's sets (Appendix A): the base prompt, 25 context and 6 complex prompts; 170 images
    for name in ("paper-object", "paper-live"):
        groups = {g.name: (len(g.templates), g.images) for g in PROMPT_SETS[name].groups}
        assert groups == {"base": (1, 15), "context": (25, 5), "complex": (6, 5)}
        assert PROMPT_SETS[name].images == 170 and len(set(prompt_templates(name))) == 32
        assert prompt_templates(name)[0] == "a photo of {}" and all("{}" in t for t in prompt_templates(name))
    rep = evaluate(gen, [ref], prompt_set="paper-live", concept="dog", encoders=enc)
    assert [r["prompt"] for r in rep["per_image"]] == ["a photo of dog", "a red dog"]
    assert "| a dog in the jungle | 1 |" in markdown(
        evaluate(gen, [ref], prompt_set="live", concept="dog", encoders=enc)
    )


def test_cli_writes_json_and_markdown(scorers, tmp_path, capsys):
    clip, dino = scorers
    gen = tmp_path / "gen"
    gen.mkdir()
    for i in range(2):
        for j in range(2):
            _save(_noise(10 * i + j), gen / f"{i:02d}-{j}.png", f"prompt {i}")
    ref = _save(_noise(99), tmp_path / "ref.png")
    assert (
        main(
            [
                "evaluate",
                "--generated",
                str(gen),
                "--reference",
                str(ref),
                "--clip",
                str(clip),
                "--dino",
                str(dino),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    rep = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert [p["prompt"] for p in rep["per_prompt"]] == ["prompt 0", "prompt 1"]
    assert rep["overall"]["images"] == 4 and set(rep["metrics"]) == {"clip_i", "clip_t", "dino"}
    md = (tmp_path / "out" / "evaluation.md").read_text()
    assert md.startswith("| prompt | images | CLIP-I | CLIP-T | DINO |") and "mean over all images" in md
    assert f"{rep['overall']['dino']:.4f}" in md and "| prompt 1 | 2 |" in capsys.readouterr().out


def _err(capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_inputs_refused(scorers, tmp_path, capsys):
    clip, dino = scorers
    gen, empty = tmp_path / "gen", tmp_path / "empty"
    gen.mkdir()
    empty.mkdir()
    _save(_noise(0), gen / "00-0.png", "a dog")
    ref = _save(_noise(1), tmp_path / "ref.png")
    base = ["evaluate", "--reference", str(ref), "--out", str(tmp_path / "o")]
    e = _err(capsys, base + ["--generated", str(empty), "--clip", str(clip)])
    assert "has no images" in e and str(empty) in e
    e = _err(capsys, base + ["--generated", str(tmp_path / "nope"), "--clip", str(clip)])
    assert "does not exist" in e
    e = _err(capsys, base + ["--generated", str(gen), "--clip", str(dino)])
    assert "--clip" in e and "'dinov2'" in e and "openai/clip" in e
    e = _err(capsys, base + ["--generated", str(gen), "--dino", str(clip)])
    assert "--dino" in e and "'clip'" in e
    e = _err(capsys, base + ["--generated", str(gen), "--clip", str(tmp_path / "no-model")])
    assert "no such model folder" in e
    e = _err(capsys, base + ["--generated", str(gen), "--clip", str(empty)])
    assert "no config.json" in e
    (empty / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))  # a diffusers folder
    e = _err(capsys, base + ["--generated", str(gen), "--dino", str(empty)])
    assert "not a transformers model's" in e
    (empty / "config.json").unlink()
    bare = tmp_path / "bare-clip"  # the model without its processor files
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((clip / name).read_bytes())
    e = _err(capsys, base + ["--generated", str(gen), "--clip", str(bare)])
    assert "CLIPProcessor" in e and "processor.save_pretrained" in e
    e = _err(capsys, base + ["--generated", str(gen)])
    assert "--clip" in e and "--dino" in e
    mask = _save(Image.new("L", (40, 40), 255), tmp_path / "mask.png")
    e = _err(capsys, base + ["--generated", str(gen), "--clip", str(clip), "--mask", str(mask), "--mask", str(mask)])
    assert "2 mask(s) for 1 reference" in e
    small = _save(Image.new("L", (20, 20), 255), tmp_path / "small.png")
    e = _err(capsys, base + ["--generated", str(gen), "--clip", str(clip), "--mask", str(small)])
    assert "20x20" in e and "40x40" in e
    (gen / "01-0.png").write_text("not an image")
    e = _err(capsys, base + ["--generated", str(gen), "--clip", str(clip)])
    assert "01-0.png" in e and "cannot be read as an image" in e
    (gen / "01-0.png").unlink()
    _save(_noise(3), gen / "01-0.png")  # no prompt anywhere
    e = _err(capsys, base + ["--generated", str(gen), "--clip", str(clip)])
    assert "no prompt for 1 generated image" in e and "01-0.png" in e
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"00-0.png": "a", "01-0.png": "b", "02-0.png": "c"}))
    e = _err(capsys, base + ["--generated", str(gen), "--clip", str(clip), "--prompts", str(manifest)])
    assert "not in the folder" in e and "02-0.png" in e
    e = _err(capsys, base + ["--generated", str(gen), "--clip", str(clip), "--prompt-set", "live"])
    assert "--concept" in e
    e = _err(capsys, base + ["--generated", str(gen), "--clip", str(clip), "--mask-fill", "1,2"])
    assert "R,G,B" in e


# ---- labelled grids ---------------------------------------------------------------------------


def _ink_box(img: Image.Image):
    """Bounding box of the non-white pixels."""
    a = np.asarray(img.convert("L")) < 250
    ys, xs = np.nonzero(a)
    return (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) if len(xs) else None


def test_grid_labels_are_drawn():
    tiles = [Image.new("RGB", (100, 100), c) for c in ("red", "green", "blue", "gray")]
    plain = grid(tiles, cols=2)
    assert plain.size == (200, 200)
    cols, rows = ["LoRA", "T-LoRA"], ["a photo of sks dog on the beach at sunset", "a dog"]
    labelled = grid(tiles, cols=2, col_labels=cols, row_labels=rows, font_size=12)
    lw, lh = labelled.size
    assert lw > 200 and lh > 200
    side, head = lw - 200, lh - 200  # the tiles keep their size (the labels fit a 100 px row): margins are the rest
    a = np.asarray(labelled)
    # The tiles sit right of the row labels and under the column labels, unchanged.
    assert (a[head : head + 100, side : side + 100] == (255, 0, 0)).all()
    assert (a[-100:, -100:] == np.asarray(Image.new("RGB", (1, 1), "gray"))[0, 0]).all()
    # Each header cell holds exactly its label as Pillow draws it alone.
    font = label_font(12)
    for c, text in enumerate(cols):
        cell = labelled.crop((side + 100 * c, 0, side + 100 * (c + 1), head))
        alone = Image.new("RGB", (200, 40), "white")
        ImageDraw.Draw(alone).text((5, 5), text, fill="black", font=font)
        got, want = cell.crop(_ink_box(cell)), alone.crop(_ink_box(alone))
        assert got.size == want.size and np.array_equal(np.asarray(got), np.asarray(want))
    # The long prompt is wrapped onto several lines in the left margin; the short one is drawn as it is.
    margin = labelled.crop((0, head, side, head + 100))
    ink_rows = np.nonzero((np.asarray(margin.convert("L")) < 250).any(1))[0]
    assert (np.diff(ink_rows) > 1).sum() >= 1  # two or more lines of ink, with white between
    margin2 = labelled.crop((0, head + 100, side, head + 200))
    alone = Image.new("RGB", (200, 40), "white")
    ImageDraw.Draw(alone).text((5, 5), "a dog", fill="black", font=font)
    got, want = margin2.crop(_ink_box(margin2)), alone.crop(_ink_box(alone))
    assert got.size == want.size and np.array_equal(np.asarray(got), np.asarray(want))
    # Another label changes the rendered text region; no labels gives back the plain grid.
    other = grid(tiles, cols=2, col_labels=["DoRA", "T-LoRA"], row_labels=rows, font_size=12)
    assert other.size == labelled.size and not np.array_equal(np.asarray(other)[:head], a[:head])
    assert np.array_equal(np.asarray(other)[head:], a[head:])
    with pytest.raises(ValueError, match="3 column labels for 2 columns"):
        grid(tiles, cols=2, col_labels=["a", "b", "c"])
    # Samples narrower than MIN_LABELLED_TILE are enlarged by a whole factor (NEAREST) so labels fit.
    small = [_noise(k, size=16) for k in range(2)]
    g = np.asarray(grid(small, cols=2, col_labels=["a", "b"]))
    k = -(-MIN_LABELLED_TILE // 16)
    assert (
        g.shape[1] == 2 * 16 * k and (g[-16 * k :, -16 * k :] == np.asarray(small[1]).repeat(k, 0).repeat(k, 1)).all()
    )


def test_demo_comparison_grid_is_labelled(tmp_path, monkeypatch, capsys):
    """`tlora demo`'s grid code on stand-in runs (no training): labelled columns (the base model's among
    them) and prompt rows, samples enlarged by whole pixels, a note under the grid on what to look at."""
    import argparse

    import tlora.demo.evaluate as toy
    from tlora.demo.concepts import EVAL_PROMPTS, concept
    from tlora.demo.run import ENLARGE, LOOK_AT, run
    from tlora.images import label_font, text_block

    n = 2
    scores = dict(fidelity=0.0, alignment=0.0, background_accuracy=0.0, position_accuracy=0.0, diversity=0.0)

    def fake(method, seed):
        return toy.Run(
            method, scores, [[_noise(seed + i * n + j, 32) for j in range(n)] for i in range(len(EVAL_PROMPTS))], 0.0
        )

    monkeypatch.setattr(toy, "sample_base", lambda c, n, seed: fake("base model", 0))
    monkeypatch.setattr(toy, "finetune", lambda c, method, out, **kw: fake(method, 100 if method == "LoRA" else 200))
    monkeypatch.setattr(toy, "autoencoder_ceiling", lambda c: 0.9)
    run(argparse.Namespace(concept="split_cross", out=str(tmp_path), steps=800, rank=16, n=n, seed=0, threads=None))
    printed = capsys.readouterr().out
    assert "base model | LoRA | T-LoRA" in printed
    img = Image.open(tmp_path / "comparison.png")
    t = 32 * ENLARGE
    cols, rows = 1 + 3 * (n + 1), len(EVAL_PROMPTS)  # training image, then base / LoRA / T-LoRA and a blank each
    side = img.width - cols * t
    assert side > 0
    a = np.asarray(img)

    def tile(sample):  # a 32 px sample as the grid shows it: each pixel a t/32 block of equal pixels
        return np.asarray(sample).repeat(ENLARGE, 0).repeat(ENLARGE, 1)

    # The grid's top: where the training image's first tile is; each row is one tile high.
    first = tile(Image.fromarray(concept("split_cross").training_image()))
    head = next(y for y in range(img.height - t) if np.array_equal(a[y : y + t, side : side + t], first))
    bottom = head + rows * t
    for r, seed in ((0, 0), (rows - 1, 0), (rows - 1, 200)):  # base model (first prompt, last), T-LoRA's last
        for k in range(n):
            col = 1 + k if seed == 0 else 1 + 2 * (n + 1) + k
            x, y = side + col * t, head + r * t
            assert np.array_equal(a[y : y + t, x : x + t], tile(_noise(seed + r * n + k, 32))), (r, seed, k)
    assert (a[bottom - t : bottom, side + (cols - 1) * t :] == 255).all()  # the blank separator
    # The base model's columns are labelled as such, exactly as Pillow draws the label alone.
    font = label_font(max(11, t // 14))
    pad = max(2, font.size // 3)
    want = text_block("base model\nno adapter\nsample 1", t, font, pad)
    assert np.array_equal(a[: want.height, side + t : side + 2 * t], np.asarray(want))
    # Under the grid: the note on what to look at (the training layout the LoRA rows copy).
    c = concept("split_cross")
    note = text_block(LOOK_AT.format(position=c.train_position, background=c.train_background), img.width, font, pad)
    assert img.height == bottom + note.height and np.array_equal(a[bottom:], np.asarray(note))
    assert "LoRA tends to copy the training layout" in LOOK_AT


# ---- issue 21: devices, broken scorer folders, wrong kinds of paths, non-finite scores --------


def _inputs(tmp_path):
    gen = tmp_path / "gen"
    gen.mkdir()
    _save(_noise(0), gen / "00-0.png", "a dog")
    ref = _save(_noise(1), tmp_path / "ref.png")
    return gen, ref, ["evaluate", "--generated", str(gen), "--reference", str(ref), "--out", str(tmp_path / "o")]


def test_the_api_names_settings_not_flags(tmp_path):
    # evaluate's errors name its arguments (the CLI shows them as flags: test_bad_inputs_refused).
    gen, ref, _ = _inputs(tmp_path)
    cases = [
        (lambda: Encoders.load(), ("clip", "dino"), "no model given: pass clip (CLIP-I, CLIP-T) and/or dino (DINO)"),
        (lambda: evaluate(gen, [ref], prompt_set="live"), ("concept", "prompt_set"), "prompt_set needs concept, "),
        (lambda: evaluate(gen, [ref], masks=[ref, ref]), ("masks", "references"), "2 mask(s) for 1 reference image(s)"),
        (lambda: evaluate(gen, [ref], clip=str(tmp_path / "nope")), ("clip",), f"clip {tmp_path / 'nope'}: no such"),
        (lambda: parse_colour("1,2"), ("mask_fill",), "mask_fill '1,2': give R,G,B"),
    ]
    for call, fields, start in cases:
        with pytest.raises((InputError, MissingFileError)) as info:
            call()
        assert info.value.fields == fields and str(info.value).startswith(start), str(info.value)
        assert "--" not in str(info.value)


def _one_line(capsys, argv) -> str:
    """The refusal of `tlora ARGV`: exit 2, nothing on stdout, one line on stderr after any progress bars."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err, (out, err)
    lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith("tlora evaluate: error:"), err
    return lines[0]


@pytest.mark.parametrize(
    "device,fragment",
    [
        ("foo", "--device 'foo' is unknown: use auto, cpu, cuda or cuda:N"),
        ("meta", "--device 'meta' is not supported"),
        pytest.param(
            "cuda",
            "--device 'cuda' is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU"),
        ),
    ],
)
def test_devices_are_checked_as_train_and_generate_check_them(device, fragment, scorers, tmp_path):
    gen, ref, base = _inputs(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "tlora.cli", *base, "--clip", str(scorers[0]), "--device", device],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert fragment in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not (tmp_path / "o").exists()


def _broken_copy(src, dst, case: str):
    shutil.copytree(src, dst)
    if case == "truncated weights":
        data = (dst / "model.safetensors").read_bytes()
        (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif case in ("wider config", "deeper config"):
        config = json.loads((dst / "config.json").read_text())
        vision = config.get("vision_config", config)  # CLIP's image tower, or DINO's config
        if case == "wider config":
            vision["hidden_size"] *= 2
        else:
            vision["num_hidden_layers"] += 1
        (dst / "config.json").write_text(json.dumps(config))
    else:  # NaN weights
        tensors = load_file(str(dst / "model.safetensors"))
        for t in tensors.values():
            if t.is_floating_point():
                t.fill_(float("nan"))
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    "flag,case,fragment",
    [
        ("--clip", "truncated weights", "its weights cannot be loaded (SafetensorError"),
        ("--dino", "truncated weights", "its weights cannot be loaded (SafetensorError"),
        ("--dino", "wider config", "its weights do not fit its config.json"),
        ("--clip", "wider config", "its weights do not fit its config.json"),
        ("--dino", "deeper config", "its weights lack"),
        ("--clip", "NaN weights", "holds non-finite values (NaN or infinity)"),
        ("--dino", "NaN weights", "holds non-finite values (NaN or infinity)"),
    ],
)
def test_broken_scorer_folders_are_refused_in_one_line(flag, case, fragment, scorers, tmp_path, capsys):
    source = scorers[0] if flag == "--clip" else scorers[1]
    broken = _broken_copy(source, tmp_path / "broken", case)
    gen, ref, base = _inputs(tmp_path)
    message = _one_line(capsys, [*base, flag, str(broken)])
    assert f"{flag} {broken}: " in message and fragment in message, message
    assert not (tmp_path / "o").exists()  # a NaN model wrote "NaN" into evaluation.json (not JSON)


def test_wrong_kinds_of_paths_are_named(scorers, tmp_path, capsys):
    gen, ref, base = _inputs(tmp_path)
    clip = ["--clip", str(scorers[0])]
    args = [*base, *clip]
    args[args.index("--generated") + 1] = str(ref)
    message = _one_line(capsys, args)
    assert f"generated-image folder {ref} is a file, not a folder" in message, message
    message = _one_line(capsys, [*base, *clip, "--prompts", str(gen)])
    assert f"prompt manifest {gen} is a folder, not a JSON or JSONL file" in message, message
    binary = tmp_path / "prompts.json"
    binary.write_bytes(b"\xff\xfe\x00\x81 not text")
    message = _one_line(capsys, [*base, *clip, "--prompts", str(binary)])
    assert f"prompt manifest {binary} is not UTF-8 text (byte 0 is 0xff)" in message, message
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"file": "00-0.png", "prompt": "a dog"}\n{oops\n')
    message = _one_line(capsys, [*base, *clip, "--prompts", str(jsonl)])
    assert f"prompt manifest {jsonl} is neither JSON nor JSONL (line 2:" in message, message
    nan = tmp_path / "ref.tif"
    Image.fromarray(np.full((40, 40), np.nan, np.float32), "F").save(nan)
    args = [*base, *clip]
    args[args.index("--reference") + 1] = str(nan)
    message = _one_line(capsys, args)
    assert f"reference image {nan} has 1600 non-finite pixel value(s)" in message, message


def test_non_finite_scores_are_refused(scorers, tmp_path):
    """A scorer that gives a zero embedding (cosine 0/0) is refused, naming the metric and image."""
    gen, ref, _ = _inputs(tmp_path)
    enc = Encoders.load(clip=str(scorers[0]))
    clip_images = enc.clip_images
    enc.clip_images = lambda images: clip_images(images) * 0
    with pytest.raises(InputError, match=r"CLIP-I is not finite for 1 image\(s\) \(e.g. 00-0.png\)"):
        evaluate(gen, [ref], encoders=enc)
