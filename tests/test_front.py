"""The torch-free front: `import tlora`, the `tlora` parser, `--help` and argument errors import no
torch, no native module, no diffusers and no quantization backend; `tlora`'s names load lazily and
all still work; the parser's choices and limits are the library's (`tlora.options`, `tlora.config`);
errors about settings are shown by the CLI with the flags the user typed."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tlora import cli, config, options
from tlora.errors import AdapterFileError, ConfigError, InputError, MissingFileError, about

PYTHON_DIR = Path(__file__).resolve().parent.parent / "python"
# What the front must not import: torch and what imports it.
HEAVY = ("torch", "tlora._native", "diffusers", "transformers", "accelerate", "optimum", "bitsandbytes", "torchao")

# Run as `python -c`: refuses (ImportError) any HEAVY import, runs the given code, then checks
# sys.modules (an import that was caught and swallowed still shows there).
GUARD = textwrap.dedent(
    """
    import sys
    HEAVY = {heavy!r}

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HEAVY or name in HEAVY:
                raise ImportError("the torch-free front imported " + name)

    sys.meta_path.insert(0, Refuse())
    try:
    {body}
    finally:
        loaded = sorted(m for m in sys.modules if m in HEAVY or m.split(".")[0] in HEAVY)
        assert not loaded, loaded
    """
)


def run_guarded(body: str) -> subprocess.CompletedProcess:
    code = GUARD.format(heavy=HEAVY, body=textwrap.indent(textwrap.dedent(body), "    "))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PYTHON_DIR), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


COMMANDS = ("train", "generate", "info", "export", "import", "evaluate", "demo")


def test_import_and_help_load_no_torch():
    proc = run_guarded(
        f"""
        import contextlib, io
        import tlora, tlora.cli, tlora.errors, tlora.options, tlora.config
        tlora.ConfigError, tlora.__version__
        for argv in (["--help"], *[[c, "--help"] for c in {COMMANDS!r}]):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert tlora.cli.main(argv) == 0, argv
            assert "usage: tlora" in out.getvalue(), argv
        print("ok")
        """
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["train", "--rank", "0"], "argument --rank: must be an integer in 1..65536, got 0"),
        (["generate", "--height", "20"], "argument --height: 20 is not a multiple of 8"),
        (["export", "--format", "onnx"], "argument --format: invalid choice: 'onnx'"),
        (["train", "--quantize", "fp8"], "argument --quantize: invalid choice: 'fp8'"),
        (["nope"], "argument command: invalid choice: 'nope'"),
    ],
)
def test_argument_errors_load_no_torch(argv, fragment):
    # `python -m tlora.cli`, as the console script runs it.
    proc = run_guarded(
        f"""
        import runpy
        sys.argv = ["tlora", *{argv!r}]
        try:
            runpy.run_module("tlora.cli", run_name="__main__")
        except SystemExit as e:
            assert e.code == 2, e.code
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert fragment in proc.stderr, proc.stderr


def test_the_guard_catches_a_torch_import():
    # The checks above are only as good as the guard.
    proc = run_guarded("import tlora.files.io")
    assert proc.returncode != 0 and "the torch-free front imported torch" in proc.stderr, proc.stderr


def test_native_module_loads_after_torch():
    # The extension links libtorch_python: the package imports torch first, whichever module
    # asks for the native module first (tlora.files.atomic imports no torch of its own).
    code = "import sys, tlora.files.atomic; assert 'torch' in sys.modules; print(tlora.files.atomic._native.__name__)"
    env = dict(os.environ, PYTHONPATH=str(PYTHON_DIR))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "tlora._native", proc.stderr


def test_every_public_name_still_works():
    import tlora.adapter.inject
    import tlora.config
    import tlora.errors
    import tlora.files.accelerate_hooks
    import tlora.files.export
    import tlora.files.folder
    import tlora.files.io

    homes = {
        "adapter": tlora.adapter.inject,
        "config": tlora.config,
        "io": tlora.files.io,
        "errors": tlora.errors,
        "export": tlora.files.export,
        "folder": tlora.files.folder,
        "accelerate": tlora.files.accelerate_hooks,
    }
    for name in tlora.__all__:
        value = getattr(tlora, name)
        if name != "__version__":
            home = next(m for m in homes.values() if name in vars(m))
            assert value is getattr(home, name), name
    assert set(tlora.__all__) <= set(dir(tlora))
    # Submodules as attributes, as tests and users reach them.
    for sub in ("adapter", "layer", "files", "train", "testing", "demo", "timesteps", "config", "cli"):
        assert getattr(tlora, sub).__name__ == f"tlora.{sub}"
    assert tlora.files.io.load is tlora.load  # a room's module
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        tlora.nope  # noqa: B018


def test_parser_choices_and_limits_are_the_librarys():
    import tlora.adapter.quantized
    import tlora.evaluate
    import tlora.files.export
    import tlora.pipelines

    # One definition each; the library modules that check them agree with it.
    assert tlora.adapter.quantized.QUANTIZE_CHOICES is options.QUANTIZE
    assert tlora.files.export.FORMATS is options.EXPORT_FORMATS
    assert tuple(tlora.files.export.WRITERS) == options.EXPORT_FORMATS  # a writer for each choice, no other
    assert tuple(tlora.pipelines.DTYPES) == tuple(options.DTYPES)
    assert tuple(tlora.prompt_sets.PROMPT_SETS) == options.PROMPT_SETS
    assert set(options.PAPER_STEPS) == set(config.VARIANTS)
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    choices = {(cmd, a.dest): a.choices for cmd, p in sub.items() for a in p._actions if a.choices}
    assert choices[("train", "variant")] == config.VARIANTS
    assert choices[("train", "quantize")] == options.QUANTIZE
    assert choices[("train", "mixed_precision")] == options.MIXED_PRECISION
    assert list(choices[("generate", "dtype")]) == list(options.DTYPES)
    assert choices[("export", "format")] == options.EXPORT_FORMATS
    assert choices[("evaluate", "prompt_set")] == options.PROMPT_SETS
    base = ["train", "--model", "m", "--token", "t", "--class-name", "c", "--out", "o"]
    assert parser.parse_args([*base, "--rank", str(config.MAX_RANK)]).rank == config.MAX_RANK
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--rank", str(config.MAX_RANK + 1)])
    assert parser.parse_args([*base, "--resolution", str(options.MAX_SIDE)]).resolution == options.MAX_SIDE
    imp = ["import", "--adapter", "a", "--model", "m", "--out", "o", "--num-train-timesteps"]
    assert parser.parse_args([*imp, str(config.MAX_TIMESTEPS)]).num_train_timesteps == config.MAX_TIMESTEPS
    with pytest.raises(SystemExit):
        parser.parse_args([*imp, str(config.MIN_TIMESTEPS - 1)])


def _help_lines(command: str, monkeypatch, capsys) -> dict[str, str]:
    """`tlora COMMAND --help`, one line per option (wide columns; a long flag's help, on the next
    lines, joined to it), by the option's first flag."""
    monkeypatch.setenv("COLUMNS", "1000")
    assert cli.main([command, "--help"]) == 0
    lines: dict[str, str] = {}
    flag = None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")  # "--x, --no-x" (a boolean option): by "--x"
            lines[flag] = line
        elif flag is not None and line.startswith("   "):
            lines[flag] += " " + line.strip()
        else:
            flag = None
    return lines


@pytest.mark.parametrize(
    ("command", "flag", "shown"),
    [
        ("train", "--rank", "(default: 64)"),
        ("train", "--lr", "(default: 0.0001)"),
        ("train", "--checkpoint-every", "(default: 100)"),
        ("train", "--seed", "(default: 0)"),
        ("train", "--method", "(default: tlora)"),
        ("train", "--optimizer", "(default: adamw)"),
        ("train", "--lr-scheduler", "(default: constant)"),
        ("train", "--prodigy-decouple", "(default: True)"),
        ("train", "--steps", "default 800 (tlora), 500 (vanilla, lora)"),
        ("generate", "-n", "(default: 4)"),
        ("generate", "--dtype", "(default: fp32)"),
        ("generate", "--steps", "SD 1.x/2.x 25, SD-XL 25, FLUX 28"),
        ("generate", "--guidance", "SD 1.x/2.x 7.5, SD-XL 5.0, FLUX 3.5"),
        ("demo", "-n", "(default: 4)"),
    ],
)
def test_help_shows_the_defaults(command, flag, shown, monkeypatch, capsys):
    assert shown in _help_lines(command, monkeypatch, capsys)[flag]


def test_every_option_with_a_default_shows_it_in_the_help(monkeypatch, capsys):
    from tlora.train.families import FAMILIES

    # generate's family defaults are the recipes' (one definition, in options.py)
    for fam in FAMILIES.values():
        assert (fam.default_steps, fam.default_guidance) == options.SAMPLING_DEFAULTS[fam.name]
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices
    for command, p in sub.items():
        lines = _help_lines(command, monkeypatch, capsys)
        for a in p._actions:
            if a.option_strings and a.default not in (None, False, "", [], argparse.SUPPRESS):
                line = lines[a.option_strings[0]]
                # --mask-fill's help names its default (255,255,255) as "white"
                shown = "white" if a.dest == "mask_fill" else str(a.default)
                assert "default" in line and shown in line, (command, line)
    monkeypatch.setenv("COLUMNS", "1000")
    assert cli.main(["info", "--help"]) == 0
    assert "tlora adapter .safetensors file" in capsys.readouterr().out


def test_every_command_has_a_handler_and_dests_are_field_names():
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices
    assert set(sub) == set(COMMANDS)
    for name, p in sub.items():
        assert callable(p.get_default("func")), name
        assert p.get_default("flags")["help"] == "--help", name
    flags = sub["evaluate"].get_default("flags")
    assert (flags["references"], flags["masks"], flags["drop_words"]) == ("--reference", "--mask", "--drop-word")
    assert sub["generate"].get_default("flags")["prompts"] == "--prompt"
    assert sub["generate"].get_default("flags")["n"] == "-n"
    assert sub["train"].get_default("flags")["class_name"] == "--class-name"


@pytest.mark.parametrize(
    "error,shown",
    [
        (ConfigError("steps must be an integer in 1..1000, got 0", field="steps"), "--steps must be"),
        # each named setting, first use only: the model folder may be called "model"
        (InputError("model model is not a folder", field="model"), "--model model is not a folder"),
        (
            InputError("token and class_name must not be empty", field=("token", "class_name")),
            "--token and --class-name must not be empty",
        ),
        # names inside paths, flags, quotes and file names are left alone
        (
            MissingFileError("./clip/x, clip.png, 'clip', clip-vit, clip_i: no clip", field="clip"),
            "./clip/x, clip.png, 'clip', clip-vit, clip_i: no --clip",
        ),
        (ConfigError("--lr: lr", field="lr"), "--lr: --lr"),
        (ConfigError("n must be >= 1", field="n"), "-n must be >= 1"),
        # settings the command has no flag for, and errors without settings: as they are
        (ConfigError("batch_size must be >= 1", field="batch_size"), "batch_size must be >= 1"),
        (ConfigError("steps must be >= 1"), "steps must be >= 1"),
        # an adapter file's field is a field of the file, not a setting
        (AdapterFileError("a.safetensors", "bad", field="steps"), "a.safetensors: steps: bad"),
    ],
)
def test_cli_names_settings_by_flag(error, shown):
    flags = {"steps": "--steps", "model": "--model", "token": "--token", "class_name": "--class-name"}
    flags |= {"clip": "--clip", "lr": "--lr", "n": "-n"}
    assert cli.in_flags(error, flags).startswith(shown)


def test_about_names_the_setting_of_an_unnamed_error():
    with pytest.raises(ConfigError) as info, about("steps"):
        config.check_int("steps", 0, 1)
    assert info.value.fields == ("steps",) and info.value.field == "steps"
    with pytest.raises(InputError) as info, about("steps"):
        raise InputError("x", field="clip")  # its own fields win
    assert info.value.fields == ("clip",)
    err = MissingFileError("m", field="image")
    assert isinstance(err, FileNotFoundError) and str(err) == "m" and err.field == "image"


def test_commands_print_no_third_party_warnings(tmp_path):
    """`tlora info` imports diffusers, which imports torchao and bitsandbytes; what those log about
    themselves at import (cli.THIRD_PARTY_NOISE: torch's pytree deprecation for torchao's Enums,
    torchao's and bitsandbytes' fallbacks) is not shown. A warning of the user's own is kept."""
    import torch

    import tlora
    from tlora.testing.tiny import tiny_denoiser

    torch.manual_seed(0)
    path = tmp_path / "a.safetensors"
    tlora.save(tlora.inject(tiny_denoiser("sd"), rank=2), path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PYTHON_DIR), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "tlora.cli", "info", str(path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert "adapted modules" in proc.stdout
    for fragment in (*cli.THIRD_PARTY_NOISE.values(), "register_constant", "torchao", "gemm_4bit"):
        assert fragment not in proc.stderr, proc.stderr
    # the filters drop exactly those messages, not another warning on the same loggers
    import logging

    cli.quiet_third_party()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    log.addHandler(handler)
    try:
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: x")
        log.warning("something of the user's")
    finally:
        log.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["something of the user's"]


def test_loading_pipelines_prints_no_image_processor_fallbacks():
    """diffusers' pipeline modules name transformers' CLIP / Siglip image processors at import; without
    torchvision transformers warns that it falls back to the Pillow ones (tlora's pipelines use
    neither). The CLI drops exactly that message; without its filter the message is there."""
    import importlib.util

    script = (
        "import sys\n"
        "if sys.argv[1] == 'quiet':\n"
        "    from tlora.cli import quiet_third_party; quiet_third_party()\n"
        "from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, FluxPipeline, SanaPipeline\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PYTHON_DIR), os.environ.get("PYTHONPATH", "")]))

    def stderr(mode: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=300, env=env
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    fragment = cli.THIRD_PARTY_NOISE["transformers.utils.import_utils"]
    if importlib.util.find_spec("torchvision") is None:
        assert fragment in stderr("loud")  # what the filter is for
    assert fragment not in stderr("quiet")
