"""The toy world, its concepts and its pixel metrics.

The metrics stand in for CLIP/DINO in every T-LoRA experiment on the bundled toy model, so they
are checked against images whose answers are known: renders that follow a prompt must score
high, renders that contradict it low, and the concept detector must find the concept wherever
it is, and not mistake a plain shape or another concept for it.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tlora.demo import metrics, world
from tlora.demo.concepts import CONCEPTS, EVAL_PROMPTS, concept, render_concept
from tlora.demo.world import BACKGROUNDS, PLACEHOLDERS, POSITIONS, SHAPES, VOCAB_WORDS, Scene

BGS = ("blue", "white", "black", "yellow", "green", "purple")


def _colour_for(background: str, i: int) -> str:
    """A deterministic object colour different from the background."""
    choices = [c for c in world.COLOURS if c != background]
    return choices[i % len(choices)]


def _clean_scenes():
    for i, (shape, position, bg) in enumerate(itertools.product(SHAPES, POSITIONS, BGS)):
        yield Scene(shape, _colour_for(bg, i), position, bg)


@pytest.mark.parametrize("jitter", [False, True])
def test_renders_that_follow_the_prompt_are_aligned(jitter):
    rng = np.random.default_rng(1) if jitter else None
    scores = [metrics.alignment(world.render(s, rng), s.position, s.background) for s in _clean_scenes()]
    assert np.mean(scores) >= 0.95
    assert len(scores) == len(SHAPES) * len(POSITIONS) * len(BGS)


def test_alignment_tolerates_pixel_noise():
    # Generated images are never clean; the detector blurs before thresholding.
    rng = np.random.default_rng(11)
    scores = []
    for s in _clean_scenes():
        noisy = world.render(s, rng) + rng.normal(0, 20, (world.SIZE, world.SIZE, 3))
        scores.append(metrics.alignment(np.clip(noisy, 0, 255).astype(np.uint8), s.position, s.background))
    assert np.mean(scores) >= 0.95


def test_concept_renders_are_aligned_with_their_eval_prompts():
    rng = np.random.default_rng(2)
    scores = [
        metrics.alignment(render_concept(c, p.position, p.background, rng), p.position, p.background)
        for c in CONCEPTS.values()
        for p in EVAL_PROMPTS
    ]
    assert np.mean(scores) >= 0.95


def test_renders_that_contradict_the_prompt_score_low():
    scores = []
    for _i, s in enumerate(_clean_scenes()):
        wrong_bg = BGS[(BGS.index(s.background) + 1) % len(BGS)]
        wrong_pos = "centre" if s.position != "centre" else "left"
        scores.append(metrics.alignment(world.render(s), wrong_pos, wrong_bg))
    assert np.mean(scores) <= 0.1


def test_object_position_is_none_without_an_object():
    blank = np.empty((world.SIZE, world.SIZE, 3), np.uint8)
    blank[:] = world.PALETTE["green"]
    assert metrics.object_position(blank) is None
    assert metrics.background_colour(blank) == "green"
    assert metrics.alignment(blank, "left", "green") == 0.5


def test_fidelity_finds_the_concept_and_only_the_concept():
    rng = np.random.default_rng(3)
    for name, c in CONCEPTS.items():
        rgb, alpha = c.sprite()
        assert rgb.shape == (*alpha.shape, 3) and rgb.dtype == np.uint8 and alpha.dtype == bool
        own = [metrics.fidelity(render_concept(c, p.position, p.background, rng), rgb, alpha) for p in EVAL_PROMPTS]
        others = [
            metrics.fidelity(render_concept(o, "left", "black", rng), rgb, alpha)
            for o in CONCEPTS.values()
            if o is not c
        ]
        plains = [  # the class shape, plain, in each of the concept's own colours
            metrics.fidelity(world.render(Scene(c.class_word, colour, "right", bg)), rgb, alpha)
            for colour in c.colours
            for bg in ("white", "black")
            if colour != bg
        ]
        assert min(own) > 0.8, (name, own)
        assert max(others + plains) < min(own) - 0.4, (name, others, plains)


def test_fidelity_is_bounded():
    rgb, alpha = CONCEPTS["striped_circle"].sprite()
    noise = np.random.default_rng(4).integers(0, 256, (world.SIZE, world.SIZE, 3), dtype=np.uint8)
    assert -1.0 <= metrics.fidelity(noise, rgb, alpha) <= 1.0


def test_diversity():
    a = world.render(Scene("circle", "red", "left", "blue"))
    b = world.render(Scene("square", "green", "right", "white"))
    assert metrics.diversity([a, a, a]) == 0.0
    assert metrics.diversity([a]) == 0.0
    assert 0.0 < metrics.diversity([a, b]) <= 1.0
    jittered = [world.render(Scene("circle", "red", "left", "blue"), np.random.default_rng(i)) for i in range(4)]
    assert metrics.diversity(jittered) > 0.0


def test_score_reports_every_metric():
    c = CONCEPTS["checkered_square"]
    target = EVAL_PROMPTS[0]
    images = [render_concept(c, target.position, target.background, np.random.default_rng(i)) for i in range(3)]
    result = metrics.score(images, "checkered_square", target)
    assert result["alignment"] == 1.0 and result["fidelity"] > 0.99 and result["diversity"] > 0.0
    assert metrics.score(images, c, (target.position, target.background)) == result
    as_floats = [i.astype(np.float32) / 255.0 for i in images]
    assert metrics.score(as_floats, c, {"position": target.position, "background": target.background}) == result


def test_captions_are_deterministic_short_and_in_the_vocabulary():
    vocab = set(VOCAB_WORDS)
    assert len(VOCAB_WORDS) == len(vocab)
    rng = np.random.default_rng(5)
    for _ in range(500):
        s = world.sample_scene(rng, second_prob=0.5)
        text = world.caption(s)
        assert text == world.caption(Scene(s.shape, s.colour, s.position, s.background, s.second))
        words = text.split()
        assert set(words) <= vocab and len(words) < 20
        assert not set(words) & set(PLACEHOLDERS)
    assert (
        world.caption(Scene("circle", "red", "left", "blue"))
        == "a photo of a red circle on the left on a blue background"
    )
    assert world.caption(Scene("ring", "orange", "top", "white", ("cross", "green", "bottom"))) == (
        "a photo of an orange ring at the top and green cross at the bottom on a white background"
    )


def test_placeholders_are_in_the_vocabulary_and_concept_prompts_use_known_words():
    assert set(PLACEHOLDERS) <= set(VOCAB_WORDS) and len(PLACEHOLDERS) == 5
    assert {c.token for c in CONCEPTS.values()} <= set(PLACEHOLDERS)
    assert len(EVAL_PROMPTS) >= 10
    for c in CONCEPTS.values():
        assert c.class_word in SHAPES
        assert c.prompt_for_training == f"a photo of {c.token} {c.class_word}"
        for p in EVAL_PROMPTS:
            assert set(p.text(c).split()) <= set(VOCAB_WORDS)
        moved = [p for p in EVAL_PROMPTS if (p.position, p.background) != (c.train_position, c.train_background)]
        assert len(moved) == len(EVAL_PROMPTS)
        assert sum(p.background != c.train_background for p in EVAL_PROMPTS) >= len(EVAL_PROMPTS) - 2


def test_heldout_and_train_splits_never_overlap():
    assert 0.08 <= len(world.HELDOUT) / len(world.VALID_COMBOS) <= 0.12
    seen = {"train": set(), "heldout": set()}
    for split, rng in (("train", np.random.default_rng(6)), ("heldout", np.random.default_rng(7))):
        for _ in range(2000):
            s = world.sample_scene(rng, split=split)
            for shape, colour, _pos in s.objects():
                assert colour != s.background
                seen[split].add((shape, colour, s.background))
    assert seen["heldout"] <= world.HELDOUT
    assert not seen["train"] & world.HELDOUT
    # Held out combos only: every shape, colour and background is still trained on.
    assert {k[0] for k in seen["train"]} == set(SHAPES)
    assert {k[2] for k in seen["train"]} == set(BACKGROUNDS)


def test_render_is_deterministic_and_well_formed():
    s = Scene("triangle", "purple", "bottom", "cyan", ("diamond", "yellow", "top"))
    a = world.render(s, np.random.default_rng(8))
    assert a.shape == (world.SIZE, world.SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, world.render(s, np.random.default_rng(8)))
    assert np.array_equal(world.render(s), world.render(s))
    assert not np.array_equal(a, world.render(s, np.random.default_rng(9)))
    t = world.sample_scene(np.random.default_rng(10))
    assert t == world.sample_scene(np.random.default_rng(10))


def test_concept_lookup_and_training_image():
    with pytest.raises(ValueError, match="striped_circle"):
        concept("nope")
    c = concept("split_cross")
    img = c.training_image()
    assert img.shape == (world.SIZE, world.SIZE, 3) and img.dtype == np.uint8
    assert metrics.background_colour(img) == c.train_background
    assert metrics.object_position(img) == c.train_position
    assert len(CONCEPTS) >= 5
