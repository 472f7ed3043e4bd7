"""The schedule shape and rank scaling in adapter files: saved in the config, read back by
tlora.load (absent keys: the paper's defaults, so older files read unchanged), an unknown value
refused naming the field, compared by in-place loads, shown by `tlora info`, and read from other
tools' metadata under tlora's names."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import tlora
from tlora import cli
from tlora.files.io import METADATA_KEY, adapter_checksum, read_raw, write_tensors


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(12, 12)
        self.to_k = nn.Linear(12, 12)

    def forward(self, x, timestep=None):
        return self.to_k(self.to_q(x))


def base() -> Net:
    """The same base weights every call."""
    torch.manual_seed(0)
    return Net()


def trained(**options) -> tuple[Net, tlora.Adapter]:
    model = base()
    adapter = tlora.inject(model, rank=8, min_rank=2, lora_alpha=4.0, **options)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model, adapter


def rewrite(path, change) -> None:
    """The file with its description changed by `change(meta)` and signed again."""
    tensors, strings = read_raw(path)
    meta = json.loads(strings[METADATA_KEY])
    change(meta)
    meta.pop("checksum")
    meta["checksum"] = adapter_checksum(tensors, meta)
    write_tensors(path, tensors, {METADATA_KEY: json.dumps(meta)})


OPTIONS = [
    dict(rank_schedule="cosine"),
    dict(rank_schedule="step", rank_boundary=0.6),
    dict(rank_scaling="rank"),
    dict(rank_schedule="power", rank_exponent=2.0, rank_scaling="rank"),
]


@pytest.mark.parametrize("options", OPTIONS, ids=[json.dumps(o) for o in OPTIONS])
def test_options_round_trip_through_a_file(tmp_path, options):
    model, adapter = trained(**options)
    path = tlora.save(adapter, tmp_path / "a.safetensors")
    config = json.loads(read_raw(path)[1][METADATA_KEY])["config"]
    for key, value in options.items():
        assert config[key] == value
    loaded = tlora.load(base(), path)
    for key in ("rank_schedule", "rank_boundary", "rank_scaling", "rank_exponent"):
        assert getattr(loaded.config, key) == getattr(adapter.config, key), key
    x = torch.randn(4, 3, 12)
    t = torch.tensor([0, 450, 700, 1000])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x, t), model(x, t), rtol=0, atol=0)
    # In place: a file with other schedule settings is refused, its own loads.
    tlora.load(model, path)
    other = tlora.save(trained()[1], tmp_path / "plain.safetensors")
    with pytest.raises(tlora.ModelMismatchError, match="rank_s"):
        tlora.load(model, other)


def test_files_without_the_keys_read_as_the_defaults(tmp_path):
    model, adapter = trained()
    path = tlora.save(adapter, tmp_path / "old.safetensors")
    rewrite(path, lambda m: [m["config"].pop(k) for k in ("rank_schedule", "rank_boundary", "rank_scaling")])
    loaded = tlora.load(base(), path)
    assert (loaded.config.rank_schedule, loaded.config.rank_boundary, loaded.config.rank_scaling) == (
        "power",
        0.875,
        "none",
    )
    x, t = torch.randn(2, 12), torch.tensor([100, 900])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x, t), model(x, t), rtol=0, atol=0)


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("rank_schedule", "linear", "unknown rank_schedule 'linear': choose one of power, cosine, step"),
        ("rank_scaling", "alpha", "unknown rank_scaling 'alpha': choose one of none, rank"),
        ("rank_boundary", 0, "rank_boundary"),
        ("rank_boundary", "0.5", "rank_boundary"),
    ],
)
def test_unknown_values_are_refused(tmp_path, key, value, fragment):
    path = tlora.save(trained()[1], tmp_path / "a.safetensors")
    rewrite(path, lambda m: m["config"].update({key: value}))
    model = Net()
    with pytest.raises(tlora.AdapterFileError, match=fragment) as e:
        tlora.load(model, path)
    assert e.value.field == "config" and tlora.adapter_of(model) is None


def test_info_shows_the_schedule(tmp_path, capsys):
    path = tlora.save(trained(rank_schedule="step", rank_scaling="rank")[1], tmp_path / "a.safetensors")
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "r(t): step (full rank for t < 0.875 T), rank 8 at t = 0 to 2 at t = 1000; rank scaling: rank" in out
    path = tlora.save(trained()[1], tmp_path / "b.safetensors")
    assert cli.main(["info", str(path)]) == 0
    assert "r(t): power (a = 1), rank 8 at t = 0 to 2 at t = 1000; rank scaling: none" in capsys.readouterr().out


def test_train_flags(tmp_path):
    """`tlora train`'s flags reach the TrainConfig and its adapter config; --help lists them."""
    from tlora.train.loop import TrainConfig

    parser = cli.build_parser()
    base = ["train", "--model", "m", "--image", "i.png", "--token", "sks", "--class-name", "dog", "--out", "o"]
    args = parser.parse_args([*base, "--rank-schedule", "step", "--rank-boundary", "0.5", "--rank-scaling", "rank"])
    opts = {f.name: getattr(args, f.name) for f in TrainConfig.__dataclass_fields__.values() if hasattr(args, f.name)}
    c = TrainConfig(**opts).adapter_config()
    assert (c.rank_schedule, c.rank_boundary, c.rank_scaling) == ("step", 0.5, "rank")
    defaults = parser.parse_args(base)
    assert (defaults.rank_schedule, defaults.rank_boundary, defaults.rank_scaling) == ("power", 0.875, "none")
    for bad in (["--rank-schedule", "linear"], ["--rank-boundary", "0"], ["--rank-scaling", "alpha"]):
        with pytest.raises(SystemExit):
            parser.parse_args([*base, *bad])
