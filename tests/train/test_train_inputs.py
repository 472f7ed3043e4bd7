"""What `tlora train` and `tlora generate` accept and refuse as input. Each refusal is one clear
line (exit status 2, no traceback) naming the problem and writes nothing: missing, unreadable,
tiny, oversized (decompression bombs), non-regular and non-finite images; masks that cannot mask
their image; broken model folders; numeric arguments out of range; a device or half precision the
machine cannot run. Greyscale, RGBA and 16-bit photos and RGBA cut-out masks are accepted.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_runs import cli_outcome as _cli
from train_runs import log_entries, written_files

from tlora import cli
from tlora.config import MAX_RANK
from tlora.errors import ConfigError
from tlora.generate import generate
from tlora.images import load_image, load_mask
from tlora.testing.train_inputs import (
    break_model_index,
    disc,
    set_flag,
    train_args,
    write_array,
    write_bomb,
    write_photo,
)
from tlora.train.loop import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- images ----------------------------------------------------------------------------------------


def _tiny_image(folder: Path) -> Path:
    path = folder / "tiny.png"
    Image.new("RGB", (3, 3), "red").save(path)
    return path


def _text_as_png(folder: Path) -> Path:
    path = folder / "notes.png"
    path.write_text("this is not an image\n")
    return path


def test_train_prints_the_resolved_settings_before_training(models, image, tmp_path, capsys):
    """One line of what the run does, resolved: the min rank (rank // 2), the family, the device
    (auto -> the CPU here) and the weights' dtype, printed before the progress bar."""
    assert cli.main(train_args(models["sd"], image, tmp_path / "run", 1, 1, "--device", "auto")) == 0
    out = capsys.readouterr().out
    line = (
        "training tlora rank 4 (r_min 2) for 1 steps on sd at 16x16, timesteps uniform; device cpu, "
        "weights float32 (mixed precision no)"
    )
    assert line in out, out
    assert out.index(line) < out.index("adapter written to")


@pytest.mark.parametrize(
    "case",
    [
        "missing image",
        "unreadable image",
        "tiny image",
        "missing vae",
        "prompt without {}",
        "zero steps",
        "out under a file",
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(case, models, image, tmp_path, capsys):
    out = tmp_path / "run"
    model, img, extra = models["sd"], image, []
    if case == "missing image":
        img = tmp_path / "nope.png"
        fragments = [str(img), "does not exist"]
    elif case == "unreadable image":
        img = _text_as_png(tmp_path)
        fragments = [str(img), "cannot be read as an image"]
    elif case == "tiny image":
        img = _tiny_image(tmp_path)
        fragments = ["3x3", "at least 16 px"]
    elif case == "missing vae":
        model = tmp_path / "model"
        shutil.copytree(models["sd"], model)
        shutil.rmtree(model / "vae")
        fragments = ["missing component 'vae'"]
    elif case == "prompt without {}":
        extra = ["--validation-prompts", "a {} on a beach#a dog in the snow"]
        fragments = ["'a dog in the snow' has no {}"]
    elif case == "zero steps":
        fragments = ["argument --steps: must be an integer in 1..10000000, got 0"]
    else:  # the output folder's parent is a regular file
        blocker = tmp_path / "blocker"
        blocker.write_text("keep me")
        out = blocker / "run"
        fragments = [str(out), "not writable"]
    args = train_args(model, img, out, 1, 1, *extra)
    if case == "zero steps":
        args[args.index("--steps") + 1] = "0"

    rc = cli.main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]  # the last line, after any progress bars
    assert message.startswith("tlora train: error:"), err
    for fragment in fragments:
        assert fragment in message, message
    assert written_files(out) == []
    if case == "out under a file":
        assert (tmp_path / "blocker").read_text() == "keep me"


def _write_mode(folder: Path, mode: str) -> Path:
    y, x = np.mgrid[0:16, 0:16]
    path = folder / f"photo-{mode.replace(';', '')}.png"
    if mode == "L":
        img = Image.fromarray((x * 16).astype(np.uint8), "L")
    elif mode == "RGBA":
        a = np.zeros((16, 16, 4), np.uint8)
        a[..., 0], a[..., 3] = 200, (y * 16).astype(np.uint8)  # half-transparent red
        img = Image.fromarray(a, "RGBA")
    else:
        img = Image.fromarray((x * 4000 + y * 10).astype(np.uint16))
    img.save(path)
    assert Image.open(path).mode == mode
    return path


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_greyscale_rgba_and_16bit_images_are_accepted(mode, models, tmp_path, capsys):
    path = _write_mode(tmp_path, mode)
    pixels = load_image(path, 16)
    assert pixels.shape == (1, 3, 16, 16) and pixels.min() >= -1 and pixels.max() <= 1
    if mode in ("L", "I;16"):  # the left-to-right gradient survives conversion (16 bits rescaled, not clipped)
        assert bool((pixels[0].mean(dim=(0, 1)).diff() > 0).all())
    if mode == "I;16":  # rescaled to the full 8-bit range
        assert pixels.max() - pixels.min() > 1.9
    if mode == "RGBA":  # transparent pixels on white
        assert torch.allclose(pixels[0, :, 0, 0], torch.ones(3), atol=1 / 127.5)

    out = tmp_path / "run"
    rc = cli.main(train_args(models["sd"], path, out, 1, 1))
    assert rc == 0, capsys.readouterr().err
    assert [e["step"] for e in log_entries(out)] == [1]
    assert (out / "adapter.safetensors").is_file() and (out / "checkpoint-1" / "state.json").is_file()


@pytest.mark.parametrize(
    "side,fragment", [(9000, "more than the 67,108,864-pixel limit"), (14000, "decompression bomb")]
)
def test_decompression_bombs_are_refused(side, fragment, models, image, tmp_path, capsys):
    bomb = write_bomb(tmp_path / "bomb.png", side)
    rc, message = _cli(train_args(models["sd"], bomb, tmp_path / "run", 1, 1), capsys)
    assert rc == 2 and str(bomb) in message and fragment in message, message
    prior = tmp_path / "prior"
    prior.mkdir()
    write_bomb(prior / "a.png", side)
    rc, message = _cli(train_args(models["sd"], image, tmp_path / "run", 1, 1, "--prior-dir", str(prior)), capsys)
    assert rc == 2 and str(prior / "a.png") in message and fragment in message, message


def test_non_regular_inputs_are_refused(models, image, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    rc, message = _cli(train_args(models["sd"], folder, tmp_path / "run", 1, 1), capsys)
    assert (
        rc == 2 and f"image {folder} is a folder, not an image file (for a folder of photos use --image-dir)" in message
    )
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    rc, message = _cli(train_args(models["sd"], fifo, tmp_path / "run", 1, 1), capsys)
    assert rc == 2 and "is not a regular file" in message, message
    adapter_fifo = tmp_path / "a.safetensors"
    os.mkfifo(adapter_fifo)
    gen = ["generate", "--model", str(models["sd"]), "--prompt", "a {}", "--out", str(tmp_path / "g")]
    for adapter, fragment in ((adapter_fifo, "named pipe (FIFO)"), (Path("/dev/zero"), "character device")):
        rc, message = _cli([*gen, "--adapter", str(adapter)], capsys)
        assert rc == 2 and fragment in message, message


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_float_images_are_refused(bad, models, tmp_path, capsys):
    a = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    ok = write_array(tmp_path / "ok.tif", a, "F")
    assert load_image(ok, 16).shape == (1, 3, 16, 16)  # a finite float TIFF trains
    a = a.copy()
    a[3, 4] = bad
    if bad != bad:  # NaN: the whole image, as a float TIFF with missing data
        a[:] = bad
    tiff = write_array(tmp_path / "bad.tif", a, "F")
    out = tmp_path / "run"
    rc, message = _cli(train_args(models["sd"], tiff, out, 1, 1), capsys)
    count = 256 if bad != bad else 1
    assert rc == 2 and f"image {tiff} has {count} non-finite pixel value(s) (NaN or infinity)" in message, message
    assert written_files(out) == []


# ---- masks -----------------------------------------------------------------------------------------


def _photo64(folder: Path) -> Path:
    return write_array(folder / "photo64.png", np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "case",
    ["smaller mask", "wider mask", "transparent cut-out", "black mask", "subject outside the crop"],
)
def test_masks_that_cannot_mask_the_image_are_refused(case, models, tmp_path, capsys):
    image = _photo64(tmp_path)
    mask = tmp_path / "mask.png"
    if case == "smaller mask":  # was cropped out of alignment with the image
        write_array(mask, np.full((16, 32), 255, np.uint8))
        fragments = [f"mask {mask} is 32x16 but image {image} is 64x64", "of the image's size"]
    elif case == "wider mask":
        write_array(mask, np.full((64, 80), 255, np.uint8))
        fragments = [f"mask {mask} is 80x64 but image {image} is 64x64"]
    elif case == "transparent cut-out":  # was composited on white: "all subject"
        write_array(mask, np.zeros((64, 64, 4), np.uint8))
        fragments = [f"mask {mask} is transparent everywhere"]
    elif case == "black mask":
        write_array(mask, np.zeros((64, 64), np.uint8))
        fragments = [f"mask {mask} is empty", "white pixels"]
    else:  # a 64x32 photo whose subject is in its left quarter: the centre crop keeps none of it
        image = write_array(tmp_path / "wide.png", np.zeros((32, 64, 3), np.uint8))
        a = np.zeros((32, 64), np.uint8)
        a[:, :12] = 255
        write_array(mask, a)
        fragments = [f"mask {mask}: no subject pixel is left after centre-cropping", "nothing to train on"]
    out = tmp_path / "run"
    rc, message = _cli(train_args(models["sd"], image, out, 1, 1, "--mask", str(mask)), capsys)
    assert rc == 2 and message.startswith("tlora train: error:"), message
    for fragment in fragments:
        assert fragment in message, message
    assert written_files(out) == []


def test_cutout_mask_marks_its_opaque_pixels(models, tmp_path, capsys):
    """An RGBA cut-out's subject is its alpha (>= 128), whatever its colours; a fully opaque RGBA
    mask is read by its grey levels like any other."""
    subject = disc(16, 5)
    cutout = np.zeros((16, 16, 4), np.uint8)
    cutout[..., :3] = 255  # white everywhere: read as grey levels this was "all subject"
    cutout[..., 3] = np.where(subject, 255, 0)
    path = write_array(tmp_path / "cutout.png", cutout)
    expected = torch.from_numpy(subject.astype(np.float32))[None, None]
    assert torch.equal(load_mask(path, 16), expected)
    opaque = np.zeros((16, 16, 4), np.uint8)
    opaque[..., :3] = np.where(subject, 255, 0)[..., None]
    opaque[..., 3] = 255
    assert torch.equal(load_mask(write_array(tmp_path / "opaque.png", opaque), 16), expected)
    photo = write_photo(tmp_path / "dog.png")  # 16x16, the mask's size
    assert cli.main(train_args(models["sd"], photo, tmp_path / "run", 1, 1, "--mask", str(path))) == 0, (
        capsys.readouterr().err
    )


# ---- model folders, arguments, devices -------------------------------------------------------------


@pytest.mark.parametrize(
    "case,fragment",
    [
        ("index is a list", "must be a JSON object with _class_name and components, got a list"),
        (
            "class name is a list",
            "_class_name must be a pipeline class name (a string), got ['StableDiffusionPipeline']",
        ),
        ("sd labelled sdxl", "says StableDiffusionXLPipeline but lists no text_encoder_2, tokenizer_2"),
        ("index not json", "model_index.json is not valid JSON"),
    ],
)
def test_broken_model_index_is_refused_clearly(case, fragment, models, image, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(models["sd"], model)
    break_model_index(model, case)
    rc, message = _cli(train_args(model, image, tmp_path / "run", 1, 1), capsys)
    assert rc == 2 and fragment in message, message


@pytest.mark.parametrize(
    "flag,value,fragment",
    [
        ("--lr", "inf", "argument --lr: must be a finite number > 0"),
        ("--lr", "nan", "argument --lr: must be a finite number"),
        ("--lr", "0", "argument --lr: must be a finite number > 0"),
        ("--steps", "-3", "argument --steps: must be an integer in 1..10000000, got -3"),
        ("--resolution", "0", "argument --resolution: must be an integer in 8..4096, got 0"),
        ("--resolution", "20", "argument --resolution: 20 is not a multiple of 8"),
        ("--rank", "0", f"argument --rank: must be an integer in 1..{MAX_RANK}, got 0"),
        ("--seed", "-1", "argument --seed: must be an integer in 0..4294967295"),
        ("--checkpoint-every", "0", "argument --checkpoint-every: must be an integer >= 1"),
        ("--rank-exponent", "inf", "argument --rank-exponent: must be a finite number > 0"),
        ("--prior-weight", "nan", "argument --prior-weight: must be a finite number"),
    ],
)
def test_train_numeric_arguments_are_range_checked(flag, value, fragment, models, image, tmp_path, capsys):
    args = set_flag(train_args(models["sd"], image, tmp_path / "run", 1, 1), flag, value)
    rc, message = _cli(args, capsys)
    assert rc == 2 and fragment in message, message
    assert written_files(tmp_path / "run") == []


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["-n", "0"], "argument -n: must be an integer in 1..256, got 0"),
        (["-n", "-1"], "argument -n: must be an integer in 1..256, got -1"),
        (["--height", "100000"], "argument --height: must be an integer in 8..4096, got 100000"),
        (["--height", "0"], "argument --height: must be an integer in 8..4096, got 0"),
        (["--steps", "0"], "argument --steps: must be an integer in 1..1000, got 0"),
        (["--guidance", "nan"], "argument --guidance: must be a finite number >= 0 and <= 100, got nan"),
        (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    ],
)
def test_generate_numeric_arguments_are_range_checked(extra, fragment, models, tmp_path, capsys):
    rc, message = _cli(
        [
            "generate",
            "--model",
            str(models["sd"]),
            "--adapter",
            str(tmp_path / "a.safetensors"),
            "--prompt",
            "a {}",
            "--out",
            str(tmp_path / "out"),
            *extra,
        ],
        capsys,
    )
    assert rc == 2 and fragment in message, message


@pytest.mark.parametrize(
    "settings,fields,message",
    [
        ({"steps": 0}, ("steps",), "steps must be an integer in 1..10000000, got 0"),
        ({"lr": 2.0}, ("lr",), "lr must be a finite number > 0 and <= 1, got 2.0"),
        ({"resolution": 20}, ("resolution",), "resolution must be a multiple of 8 (the autoencoder's stride), got 20"),
        ({"validation_steps": 0}, ("validation_steps",), "validation_steps must be an integer in 1..1000, got 0"),
        (
            {"image": None},
            ("image", "image_dir"),
            "give exactly one of image (one photo, the paper's setting) or image_dir",
        ),
        ({"token": " "}, ("token", "class_name"), "token and class_name must not be empty"),
        ({"quantize": "fp8"}, ("quantize",), "quantize must be one of int8, int4, nf4, got 'fp8'"),
        ({"mixed_precision": "fp8"}, ("mixed_precision",), "mixed_precision must be one of no, fp16, bf16, got 'fp8'"),
    ],
)
def test_train_config_names_fields_not_flags(settings, fields, message, tmp_path):
    # The library speaks in field names (the CLI shows flags: test_cli_shows_flags_for_fields).
    base = dict(model="m", image="photo.png", token="sks", class_name="dog", out=str(tmp_path / "run"))
    with pytest.raises(ConfigError) as info:
        TrainConfig(**{**base, **settings})
    assert str(info.value) == message and info.value.fields == fields and info.value.field == fields[0]


def test_generate_names_fields_not_flags(tmp_path):
    for settings, field, message in [
        ({"n": 0}, "n", "n must be an integer in 1..256, got 0"),
        ({"steps": 0}, "steps", "steps must be an integer in 1..1000, got 0"),
        ({"guidance": -1.0}, "guidance", "guidance must be a finite number >= 0 and <= 100, got -1.0"),
        ({"width": 20}, "width", "width must be a multiple of 8 (the autoencoder's stride), got 20"),
    ]:
        with pytest.raises(ConfigError) as info:
            generate("m", str(tmp_path / "a.safetensors"), ["a {}"], str(tmp_path / "out"), **settings)
        assert str(info.value) == message and info.value.field == field


def test_cli_shows_flags_for_fields(models, image, tmp_path, capsys):
    # A library error about a field, through the CLI: the flag the user typed.
    args = set_flag(train_args(models["sd"], image, tmp_path / "run", 1, 1), "--token", " ")
    rc, message = _cli(args, capsys)
    assert rc == 2 and message == "tlora train: error: --token and --class-name must not be empty", message
    assert written_files(tmp_path / "run") == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without a GPU")
def test_device_and_half_precision_refused_clearly_on_the_cpu(models, image, trained, tmp_path, capsys):
    args = train_args(models["sd"], image, tmp_path / "run", 1, 1)
    rc, message = _cli([*args, "--mixed-precision", "fp16"], capsys)
    assert rc == 2 and "--mixed-precision fp16 needs a CUDA GPU" in message and "use bf16 or no" in message, message
    rc, message = _cli([*args, "--device", "cuda"], capsys)
    assert rc == 2 and "--device 'cuda' is not available" in message, message
    rc, message = _cli([*args, "--device", "tpu9"], capsys)
    assert rc == 2 and "--device 'tpu9' is unknown" in message, message
    gen = [
        "generate",
        "--model",
        str(models["sd"]),
        "--adapter",
        str(trained / "adapter.safetensors"),
        "--prompt",
        "a {}",
        "-n",
        "1",
        "--steps",
        "2",
        "--height",
        "16",
        "--width",
        "16",
        "--out",
        str(tmp_path / "g"),
    ]
    rc, message = _cli([*gen, "--dtype", "fp16"], capsys)
    assert rc == 2 and "--dtype fp16 needs a CUDA GPU" in message, message
    rc, message = _cli([*gen, "--device", "cuda:3"], capsys)
    assert rc == 2 and "--device 'cuda:3' is not available" in message, message
    assert written_files(tmp_path / "run") == [] and written_files(tmp_path / "g") == []
    # bf16 runs on the CPU: sampling and training.
    assert cli.main([*gen, "--dtype", "bf16"]) == 0
    assert cli.main([*args, "--mixed-precision", "bf16"]) == 0
