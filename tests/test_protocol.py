"""`tlora evaluate --adapter ... --prompt-set paper-live`: the paper's protocol in one command on
the tiny SD pipeline and the tiny CLIP / DINO. What it must do, each checked against a second
route: every prompt of the set with the paper's image counts (15 / 5 / 5), the images `tlora
generate` makes for the same prompt and seed, scores equal to `evaluate` on those folders with the
token dropped and the reference painted by hand, CLIP-T by hand on "a photo of dog", and a stopped
run resumed without sampling again what is there."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tlora.cli import main
from tlora.evaluate import evaluate
from tlora.prompt_sets import PROMPT_SETS
from tlora.testing.tiny import save_tiny_clip, save_tiny_dino

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorers")
    return save_tiny_clip(root / "clip"), save_tiny_dino(root / "dino")


def _mask(image, tmp_path):
    mask = np.zeros(Image.open(image).size[::-1], np.uint8)
    mask[3:13, 3:13] = 255
    path = tmp_path / "mask.png"
    Image.fromarray(mask).save(path)
    painted = np.asarray(Image.open(image).convert("RGB")).copy()
    painted[mask == 0] = 255
    by_hand = tmp_path / "painted.png"
    Image.fromarray(painted).save(by_hand)
    return path, by_hand


def test_the_papers_protocol_in_one_command(models, trained, image, scorers, tmp_path, capsys):
    clip, dino = scorers
    adapter = trained / "adapter.safetensors"
    mask, painted = _mask(image, tmp_path)
    out = tmp_path / "eval"
    argv = ["evaluate", "--adapter", str(adapter), "--model", str(models["sd"]), "--prompt-set", "paper-live"]
    argv += ["--reference", str(image), "--mask", str(mask), "--clip", str(clip), "--dino", str(dino)]
    argv += ["--steps", "1", "--seed", "3", "--out", str(out)]
    assert main(argv) == 0
    assert "| **all** | | 170 |" in capsys.readouterr().out

    report = json.loads((out / "protocol.json").read_text())
    chosen = PROMPT_SETS["paper-live"]
    assert report["overall"]["images"] == 170 == chosen.images
    assert [(g["group"], g["prompts"], g["images"]) for g in report["groups"]] == [
        ("base", 1, 15),
        ("context", 25, 125),
        ("complex", 6, 30),
    ]
    # every prompt of the paper's list, "sks dog" for V* (the trained run's token and class)
    assert [r["prompt"] for r in report["per_prompt"]] == [t.replace("{}", "sks dog") for t in chosen.templates]
    assert report["drop_words"] == ["sks"]
    assert (out / "generated" / "base" / "grid.png").is_file()

    # the same scores from evaluate itself on each folder, the token dropped, the reference painted by hand
    rows = []
    for g in chosen.groups:
        rep = evaluate(out / "generated" / g.name, [painted], clip=str(clip), dino=str(dino), drop_words=["sks"])
        rows += rep["per_image"]
    assert len(rows) == 170
    for mine, theirs in zip(report["per_image"], rows):
        assert mine["prompt"] == theirs["prompt"]
        for k in ("clip_i", "clip_t", "dino"):
            assert mine[k] == pytest.approx(theirs[k], abs=1e-9), k
    for k in ("clip_i", "clip_t", "dino"):
        assert report["overall"][k] == pytest.approx(np.mean([r[k] for r in rows]), abs=1e-12)

    # CLIP-T of the first image by hand: the prompt without the token, "a photo of dog"
    from transformers import CLIPModel, CLIPProcessor

    model, proc = CLIPModel.from_pretrained(clip).eval(), CLIPProcessor.from_pretrained(clip)
    first = Image.open(out / "generated" / "base" / "00-0.png").convert("RGB")
    with torch.no_grad():
        im = model.get_image_features(**proc(images=[first], return_tensors="pt"))
        tx = model.get_text_features(**proc(text=["a photo of dog"], return_tensors="pt"))
    im, tx = (x if torch.is_tensor(x) else x.pooler_output for x in (im, tx))
    by_hand = float(torch.nn.functional.cosine_similarity(im.double(), tx.double()))
    assert report["per_image"][0]["clip_t"] == pytest.approx(by_hand, abs=1e-5)

    # the images are tlora generate's for the same prompt and seed (prompt i of the set: seed + i)
    gen = tmp_path / "generate"
    assert (
        main(
            ["generate", "--model", str(models["sd"]), "--adapter", str(adapter), "--prompt", "a {} swimming"]
            + ["-n", "5", "--steps", "1", "--seed", str(3 + 19), "--out", str(gen)]
        )
        == 0
    )
    swimming = chosen.templates.index("a {} swimming")
    assert swimming == 19 and chosen.groups[1].templates.index("a {} swimming") == 18
    for j in range(5):
        a = np.asarray(Image.open(gen / f"00-{j}.png"))
        b = np.asarray(Image.open(out / "generated" / "context" / f"18-{j}.png"))
        assert np.array_equal(a, b), j

    # stopped and run again: what is there is kept, a group with an image missing is sampled again
    kept = {p: p.stat().st_mtime_ns for p in (out / "generated").rglob("*.png")}
    (out / "generated" / "complex" / "05-4.png").unlink()
    assert main(argv) == 0
    capsys.readouterr()
    for p, t in kept.items():
        if p.parent.name != "complex":
            assert p.stat().st_mtime_ns == t, p
    assert (out / "generated" / "complex" / "05-4.png").is_file()
    again = json.loads((out / "protocol.json").read_text())
    assert again["per_image"] == report["per_image"]


def test_protocol_settings_are_checked(models, trained, image, scorers, tmp_path, capsys):
    clip, _ = scorers
    base = ["evaluate", "--reference", str(image), "--clip", str(clip), "--out", str(tmp_path / "o")]
    adapter = ["--adapter", str(trained / "adapter.safetensors")]
    cases = [
        (base, "give --generated (a folder of images to score) or --adapter"),
        (base + adapter + ["--prompt-set", "paper-live"], "give --model (the base model) and --prompt-set"),
        (base + adapter + ["--model", str(models["sd"])], "give --model (the base model) and --prompt-set"),
        (base + adapter + ["--model", "m", "--prompt-set", "live", "--generated", "g"], "not both"),
        (base + adapter + ["--model", "m", "--prompt-set", "live", "--concept", "dog"], "--concept is read from"),
        (base + adapter + ["--model", "m", "--prompt-set", "live", "--drop-word", "sks"], "leave --drop-word out"),
        (base + ["--generated", "g", "--steps", "3"], "--steps samples images: it needs --adapter"),
    ]
    for argv, fragment in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert fragment in err, (argv, err)
    assert not (tmp_path / "o").exists()  # refused before anything was written
