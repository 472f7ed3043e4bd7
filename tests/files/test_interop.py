"""Interop: tlora adapters exported as static LoRAs that stock loaders read (diffusers, PEFT, kohya
through diffusers' conversion), and T-LoRA checkpoints of the reference code and of LyCORIS read
back into tlora. Every comparison is of denoiser outputs on tiny offline models, in float32, with
the adapter's update moved off zero first.
"""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import tiny_calls
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_calls import denoiser_inputs
from torch import nn

import tlora
from tlora.adapter.inject import adapter_of
from tlora.files.export import EXPORT_METADATA_KEY, export, import_file
from tlora.testing.tiny import (
    denoiser,
    tiny_denoiser,
    tiny_pipeline,
)

TOL = 1e-5
R = 4
perturb = functools.partial(tiny_calls.perturb, std=0.3)


@torch.no_grad()
def run(kind: str, model, t) -> torch.Tensor:
    """The denoiser at timestep(s) t on the 0..1000 scale (FLUX takes t / 1000, as its pipeline)."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
    return model(**denoiser_inputs(kind, 2), timestep=t / 1000 if kind == "flux" else t, return_dict=False)[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def adapted(model, tmp_path, variant: str = "tlora", lora_alpha: float | None = 3.0, **kw):
    """Inject + perturb; saves the adapter file. lora_alpha 3 with rank 4: scale 0.75, not 1."""
    if variant == "lora":
        adapter = tlora.inject(model, rank=R, variant="lora", lora_alpha=lora_alpha, **kw)
    else:
        adapter = tlora.inject(model, rank=R, variant=variant, lora_alpha=lora_alpha, **kw)
    perturb(adapter)
    path = tlora.save(model, tmp_path / "adapter.safetensors")
    return adapter, path


def reference_output(kind, model, adapter, k):
    """tlora's output with the ranks pinned to k, and the base model's output (adapter removed)."""
    with adapter.rank(k):
        ref = run(kind, model, 500)
    adapter.remove()
    base = run(kind, model, 500)
    assert rel(base, ref) > 100 * TOL  # the update is far from zero: a wrong export cannot pass
    return ref


# ---- export -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,variant", [("sd", "tlora"), ("sdxl", "tlora"), ("flux", "tlora"), ("sd", "vanilla"), ("sd", "lora")]
)
def test_diffusers_export_loads_with_load_lora_weights(kind, variant, tmp_path):
    pipe = tiny_pipeline(kind)
    model = denoiser(pipe)
    adapter, path = adapted(model, tmp_path, variant)
    k = R if variant == "lora" else 3
    ref = reference_output(kind, model, adapter, k)
    result = export(path, tmp_path / "lora.safetensors", format="diffusers", rank=None if variant == "lora" else k)
    assert result.lora_rank == (2 * k if variant == "tlora" else k)
    assert "per-timestep ranks" in result.note and (variant == "lora") == ("no per-timestep ranks" in result.note)
    keys = load_file(str(result.path))
    prefix = "transformer." if kind == "flux" else "unet."
    assert keys and all(k_.startswith(prefix) and k_.endswith((".lora_A.weight", ".lora_B.weight")) for k_ in keys)
    pipe.load_lora_weights(str(result.path))
    assert rel(run(kind, model, 500), ref) < TOL


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_peft_export_loads_with_peft(kind, tmp_path):
    from peft import LoraConfig, PeftModel, inject_adapter_in_model, set_peft_model_state_dict

    model = tiny_denoiser(kind)
    adapter, path = adapted(model, tmp_path)
    ref = reference_output(kind, model, adapter, 2)
    result = export(path, tmp_path / "peft", format="peft", rank=2)
    assert result.path.name == "adapter_model.safetensors" and result.config_path.name == "adapter_config.json"
    config = json.loads(result.config_path.read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4  # alpha / r = 1: the scale 0.75 is in lora_B

    peft_model = PeftModel.from_pretrained(model, str(tmp_path / "peft"))
    assert rel(run(kind, peft_model, 500), ref) < TOL

    # The other PEFT route: inject the config into a bare model, then set the state dict.
    fresh = tiny_denoiser(kind)
    inject_adapter_in_model(LoraConfig.from_pretrained(str(tmp_path / "peft")), fresh)
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(str(result.path)).items()}
    outcome = set_peft_model_state_dict(fresh, state)
    assert not outcome.unexpected_keys
    assert rel(run(kind, fresh, 500), ref) < TOL


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_kohya_export_loads_through_diffusers_conversion(kind, tmp_path):
    pipe = tiny_pipeline(kind)
    model = pipe.unet
    adapter, path = adapted(model, tmp_path)
    names = list(adapter.layers)
    ref = reference_output(kind, model, adapter, 3)
    result = export(path, tmp_path / "kohya.safetensors", format="kohya", rank=3)
    keys = load_file(str(result.path))
    assert len(keys) == 3 * len(names)
    for name in names:
        stem = "lora_unet_" + name.replace(".", "_")
        assert keys[f"{stem}.lora_down.weight"].shape[0] == 6
        assert keys[f"{stem}.alpha"].item() == 6.0  # alpha / rank = 1, the scale is in lora_up
    pipe.load_lora_weights(str(result.path))
    assert rel(run(kind, model, 500), ref) < TOL


def test_kohya_refuses_a_transformer(tmp_path):
    model = tiny_denoiser("flux")
    adapter, _ = adapted(model, tmp_path)
    with pytest.raises(ValueError, match=r"kohya format names UNet modules.*format='diffusers'"):
        export(adapter, tmp_path / "k.safetensors", format="kohya")
    assert not (tmp_path / "k.safetensors").exists()


@pytest.mark.parametrize("variant", ["tlora", "vanilla", "lora"])
@pytest.mark.parametrize("lora_alpha", [None, 2.0])
def test_exported_factors_are_the_update_times_the_scale(variant, lora_alpha, tmp_path):
    """B @ A of every exported module equals the dense update of the kernels, scale included."""
    model = tiny_denoiser("sd")
    adapter, path = adapted(model, tmp_path, variant, lora_alpha=lora_alpha)
    k = R if variant == "lora" else 3
    result = export(path, tmp_path / "x.safetensors", rank=None if variant == "lora" else k)
    keys = load_file(str(result.path))
    scale = 1.0 if lora_alpha is None else lora_alpha / R
    for name, layer in adapter.layers.items():
        expected = tlora._native.dense_update(layer.factors(), k if variant != "lora" else None, scale)
        got = keys[f"unet.{name}.lora_B.weight"] @ keys[f"unet.{name}.lora_A.weight"]
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), name
        assert expected.abs().max() > 1e-3


def test_export_at_a_timestep_uses_r_of_t(tmp_path):
    pipe = tiny_pipeline("sd")
    model = pipe.unet
    adapter = tlora.inject(model, rank=8, min_rank=2, lora_alpha=6.0)
    perturb(adapter)
    path = tlora.save(model, tmp_path / "adapter.safetensors")
    t = 600
    k = int(tlora.rank_schedule(torch.tensor([t]), 8, 2)[0])
    assert k == 4  # floor(0.4 * 6) + 2: neither the full rank nor the minimum
    with adapter.timestep(t):
        ref = run("sd", model, t)
    with adapter.rank(8):
        full = run("sd", model, t)
    assert rel(full, ref) > 100 * TOL
    adapter.remove()
    result = export(path, tmp_path / "t.safetensors", timestep=t)
    assert result.rank == k and result.lora_rank == 2 * k
    same = export(path, tmp_path / "r.safetensors", rank=k)
    a, b = load_file(str(result.path)), load_file(str(same.path))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    pipe.load_lora_weights(str(result.path))
    assert rel(run("sd", model, t), ref) < TOL


def test_export_default_is_full_rank_and_note_is_in_the_file(tmp_path):
    model = tiny_denoiser("sd")
    _, path = adapted(model, tmp_path)
    result = export(path, tmp_path / "x.safetensors")
    assert result.rank == R and result.lora_rank == 2 * R
    with safe_open(str(result.path), "pt") as f:
        info = json.loads(f.metadata()[EXPORT_METADATA_KEY])
    assert info["rank"] == R and "per-timestep ranks r(t) are lost" in info["note"]
    with pytest.raises(ValueError, match="timestep or rank, not both"):
        export(path, tmp_path / "y.safetensors", timestep=10, rank=2)
    with pytest.raises(ValueError, match=r"rank 5 is outside 1\.\.4"):
        export(path, tmp_path / "y.safetensors", rank=5)


def test_cli_export(tmp_path, capsys):
    from tlora.cli import main

    model = tiny_denoiser("sd")
    adapter, path = adapted(model, tmp_path)
    out = tmp_path / "cli.safetensors"
    assert main(["export", "--adapter", str(path), "--format", "kohya", "--timestep", "999", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "per-timestep ranks" in printed and "rank 4" in printed  # r(999) = r_min = 2: a LoRA of rank 4
    # why rank 2k: the difference form, said in the output line and in the help
    assert "kohya LoRA of rank 4 (2 x rank 2: [Q; Q - Q0] and [P L - P0 L0, P0 L0], exact)" in printed, printed
    assert main(["export", "--help"]) == 0
    assert "rank-k T-LoRA becomes a rank-2k LoRA" in " ".join(capsys.readouterr().out.split())
    assert (
        load_file(str(out))[f"lora_unet_{next(iter(adapter.layers)).replace('.', '_')}.lora_down.weight"].shape[0] == 4
    )
    assert main(["export", "--adapter", str(path), "--format", "kohya", "--rank", "9", "--out", str(out)]) == 2
    assert "rank 9 is outside 1..4" in capsys.readouterr().err


# ---- import -----------------------------------------------------------------------------------

_REF_PROJ = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}


def reference_layout(adapter) -> dict[str, torch.Tensor]:
    """The adapter's factors under the reference code's attention-processor keys."""
    out = {}
    for name, layer in adapter.layers.items():
        attn, proj = next((name[: -len(s) - 1], p) for s, p in _REF_PROJ.items() if name.endswith("." + s))
        stem = f"{attn}.processor.{proj}"
        if adapter.config.variant == "tlora":
            out.update(
                {
                    f"{stem}.q_layer.weight": layer.q,
                    f"{stem}.p_layer.weight": layer.p,
                    f"{stem}.lambda_layer": layer.lam[None],
                    f"{stem}.base_q.weight": layer.q0,
                    f"{stem}.base_p.weight": layer.p0,
                    f"{stem}.base_lambda": layer.lam0[None],
                }
            )
        else:
            out.update({f"{stem}.down.weight": layer.down, f"{stem}.up.weight": layer.up})
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


@pytest.mark.parametrize("variant", ["tlora", "vanilla"])
def test_import_reference_code_layout(variant, tmp_path):
    source = tiny_denoiser("sdxl")
    adapter = tlora.inject(source, rank=R, variant=variant)  # min_rank r // 2, the import's default
    perturb(adapter)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(reference_layout(adapter), str(path))
    target = tiny_denoiser("sdxl")
    with pytest.warns(UserWarning, match=r"r_min = r // 2 = 2"):
        imported = tlora.load(target, path)
    assert imported.config.variant == variant and imported.config.rank == R and imported.config.min_rank == 2
    assert set(imported.layers) == set(adapter.layers)
    for t in ([0], [999], [100, 900]):  # full rank, minimum rank, one rank per sample
        assert rel(run("sdxl", target, t), run("sdxl", source, t)) < TOL
    assert rel(run("sdxl", target, 999), run("sdxl", target, 0)) > 100 * TOL


def test_import_reads_rank_settings_from_metadata(tmp_path):
    source = tiny_denoiser("sdxl")
    adapter = tlora.inject(source, rank=R, min_rank=1, rank_exponent=2.0)
    perturb(adapter)
    path = tmp_path / "ref.safetensors"
    save_file(reference_layout(adapter), str(path), metadata={"min_rank": "1", "rank_exponent": "2.0"})
    target = tiny_denoiser("sdxl")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        imported = tlora.load(target, path)
    assert (imported.config.min_rank, imported.config.rank_exponent) == (1, 2.0)
    assert rel(run("sdxl", target, [999, 600]), run("sdxl", source, [999, 600])) < TOL


def test_import_reads_schedule_options_under_tlora_names(tmp_path):
    """A foreign file naming the schedule's shape and scaling (tlora's keys) imports with them; an
    unknown value is refused naming it; without them, the paper's power law and no rank scaling."""
    source = tiny_denoiser("sdxl")
    adapter = tlora.inject(source, rank=R, min_rank=1, rank_schedule="step", rank_boundary=0.5, rank_scaling="rank")
    perturb(adapter)
    path = tmp_path / "ref.safetensors"
    meta = {"min_rank": "1", "rank_schedule": "step", "rank_boundary": "0.5", "rank_scaling": "rank"}
    save_file(reference_layout(adapter), str(path), metadata=meta)
    target = tiny_denoiser("sdxl")
    imported = tlora.load(target, path)
    c = imported.config
    assert (c.rank_schedule, c.rank_boundary, c.rank_scaling) == ("step", 0.5, "rank")
    assert rel(run("sdxl", target, [999, 100]), run("sdxl", source, [999, 100])) < TOL
    save_file(reference_layout(adapter), str(path), metadata={**meta, "rank_schedule": "linear"})
    with pytest.raises(tlora.AdapterFileError, match="unknown rank_schedule 'linear'"):
        tlora.load(tiny_denoiser("sdxl"), path)
    save_file(reference_layout(adapter), str(path), metadata={"min_rank": "1"})
    c = tlora.load(tiny_denoiser("sdxl"), path).config
    assert (c.rank_schedule, c.rank_scaling) == ("power", "none")


def test_import_reads_or_refuses_sd_scripts_network_args(tmp_path):
    """sd-scripts keeps the settings in the JSON `ss_network_args`; one Python cannot parse (an
    integer of 5000 digits, nesting too deep) raised a bare ValueError / RecursionError."""
    source = tiny_denoiser("sdxl")
    adapter = tlora.inject(source, rank=R, min_rank=1, rank_exponent=2.0)
    layout = reference_layout(adapter)
    path = tmp_path / "ref.safetensors"
    save_file(layout, str(path), metadata={"ss_network_args": json.dumps({"min_rank": 1, "rank_exponent": 2.0})})
    assert (tlora.load(tiny_denoiser("sdxl"), path).config.rank_exponent) == 2.0
    for args in ('{"min_rank": ' + "1" * 5000 + "}", "[" * 100_000):
        save_file(layout, str(path), metadata={"ss_network_args": args})
        target = tiny_denoiser("sdxl")
        with pytest.raises(tlora.AdapterFileError, match=r"ss_network_args: cannot be read as JSON") as e:
            tlora.load(target, path)
        assert e.value.path == str(path) and e.value.field == "ss_network_args" and adapter_of(target) is None
        # Given as arguments, the settings it may hold are not needed.
        imported = tlora.load(target, path, min_rank=1, rank_exponent=2.0, num_train_timesteps=1000)
        assert imported.config.min_rank == 1


def lycoris_modules(model, targets=("to_q", "to_k", "to_v", "to_out.0"), alpha: float = 2.0):
    """LyCORIS T-LoRA modules (its default init: SVD of the weight, principal triplets) on the
    model's attention projections, applied, with their trained factors moved off the init."""
    from lycoris.modules.tlora import TLoraModule

    mods = []
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and any(name.endswith("." + t) for t in targets):
            mods.append(TLoraModule("lycoris_" + name.replace(".", "_"), m, lora_dim=R, alpha=alpha))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for mod in mods:
            for p in (mod.q_layer.weight, mod.p_layer.weight, mod.lambda_layer):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    for mod in mods:
        mod.apply_to()
    return mods


@torch.no_grad()
def lycoris_run(kind, model, t: int, min_rank: int):
    from lycoris.modules.tlora import clear_timestep_mask, compute_timestep_mask, set_timestep_mask

    set_timestep_mask(compute_timestep_mask(t, 1000, R, min_rank))
    try:
        return run(kind, model, t)
    finally:
        clear_timestep_mask()


@pytest.fixture(scope="module")
def lycoris_source():
    """A tiny SD UNet patched by LyCORIS T-LoRA modules (built once: LyCORIS's init is slow)."""
    pytest.importorskip("lycoris.modules.tlora")
    source = tiny_denoiser("sd")
    return source, lycoris_modules(source)


def test_import_lycoris_tlora(lycoris_source, tmp_path):
    source, mods = lycoris_source
    state = {f"{m.lora_name}.{k}": v.detach().clone() for m in mods for k, v in nn.Module.state_dict(m).items()}
    assert any(k.endswith(".base_q") for k in state) and any(k.endswith(".alpha") for k in state)
    path = tmp_path / "lycoris.safetensors"
    save_file(state, str(path))
    target = tiny_denoiser("sd")
    with pytest.warns(UserWarning, match="r_min"):
        imported = tlora.load(target, path)
    assert imported.config.scale == 0.5  # LyCORIS: alpha / lora_dim = 2 / 4
    assert len(imported.layers) == len(mods)
    for t in (0, 600, 999):
        assert rel(run("sd", target, t), lycoris_run("sd", source, t, 2)) < TOL


def test_lycoris_file_without_base_copies(lycoris_source, tmp_path):
    source, mods = lycoris_source
    # LyCORIS's own state_dict (what save_weights writes): q, p, lambda and alpha only.
    state = {f"{m.lora_name}.{k}": v.detach().clone() for m in mods for k, v in m.state_dict().items()}
    assert not any("base_" in k for k in state)
    path = tmp_path / "lycoris.safetensors"
    save_file(state, str(path))
    target = tiny_denoiser("sd")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"no frozen base copies \(base_q, base_p, base_lambda\)"):
        tlora.load(target, path)
    assert adapter_of(target) is None
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    # Opt-in: rebuild them as LyCORIS's loader does (principal SVD triplets of the weight).
    with pytest.warns(UserWarning, match="r_min"):
        tlora.load(target, path, reconstruct_base=True)
    assert rel(run("sd", target, 600), lycoris_run("sd", source, 600, 2)) < TOL


@pytest.mark.parametrize("name", ["adapter.pt", "pytorch_lora_weights.bin"])
def test_pickle_is_refused_by_import(tmp_path, name):
    path = tmp_path / name
    torch.save({"w": torch.zeros(2)}, path)
    model = tiny_denoiser("sd")
    for call in (tlora.load, tlora.files.export.import_file):
        with pytest.raises(ValueError, match=r"pickle-based checkpoint, which tlora never loads") as e:
            call(model, path) if call is tlora.load else call(path, model, tmp_path / "out.safetensors")
        assert "safetensors.torch.save_file" in str(e.value)
    assert adapter_of(model) is None


def test_static_lora_is_not_imported(tmp_path):
    model = tiny_denoiser("sd")
    adapter, path = adapted(model, tmp_path)
    adapter.remove()
    result = export(path, tmp_path / "static.safetensors")
    with pytest.raises(ValueError, match=r"static LoRA .* pipe\.load_lora_weights"):
        tlora.load(model, result.path)
    assert adapter_of(model) is None


def test_cli_import_writes_a_tlora_file(tmp_path, capsys):
    from tlora.cli import main
    from tlora.testing.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline("sdxl", tmp_path / "model")  # its UNet is tiny_denoiser("sdxl")
    source = tiny_denoiser("sdxl")
    adapter = tlora.inject(source, rank=R, min_rank=1)
    perturb(adapter)
    ref = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(reference_layout(adapter), str(ref))
    out = tmp_path / "imported.safetensors"
    assert main(["import", "--adapter", str(ref), "--model", str(folder), "--out", str(out), "--min-rank", "1"]) == 0
    printed = capsys.readouterr().out
    assert (
        "tlora adapter of rank 4 (min rank 1" in printed and "reference T-LoRA code" in printed and str(out) in printed
    )
    tensors, meta = tlora.read(out)  # tlora's own format now
    assert meta["base_model"] == "UNet2DConditionModel" and meta["config"]["min_rank"] == 1
    assert set(meta["modules"]) == set(adapter.layers)
    target = tiny_denoiser("sdxl")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tlora file: no guessing of r_min
        tlora.load(target, out)
    for t in ([0], [999], [100, 900]):
        assert rel(run("sdxl", target, t), run("sdxl", source, t)) < TOL

    # Errors are reported like the other subcommands': exit status 2, one line, nothing written.
    adapter.remove()
    static = export(out, tmp_path / "static.safetensors")
    bad = tmp_path / "bad.safetensors"
    assert main(["import", "--adapter", str(static.path), "--model", str(folder), "--out", str(bad)]) == 2
    assert "static LoRA" in capsys.readouterr().err and not bad.exists()


def test_import_file_from_lycoris(lycoris_source, tmp_path):
    source, mods = lycoris_source
    state = {f"{m.lora_name}.{k}": v.detach().clone() for m in mods for k, v in nn.Module.state_dict(m).items()}
    path = tmp_path / "lycoris.safetensors"
    save_file(state, str(path))
    adapter, out = import_file(path, tiny_denoiser("sd"), tmp_path / "tlora.safetensors", min_rank=2)
    assert out.exists() and adapter.config.scale == 0.5
    target = tiny_denoiser("sd")
    tlora.load(target, out)
    assert rel(run("sd", target, 600), lycoris_run("sd", source, 600, 2)) < TOL


# ---- half precision: the export must not cancel ------------------------------------------------


class _OneProjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(320, 640)

    def forward(self, x, timestep=None):
        return self.to_q(x)


@pytest.mark.parametrize("drift", [1e-2, 1e-3, 1e-4])
def test_export_survives_half_precision_loaders(drift, tmp_path):
    """After training moves P, lam, Q by `drift` from their frozen copies, the exported factors cast
    to float16 / bfloat16 (as a loader casts them) still give the update: relative error <= 1e-2 /
    3e-2 against the float64 update from the file's tensors. The plain form [Q; Q0], [P lam, -P0 lam0]
    cancels and fails the same bound (computed here from the same tensors)."""
    model = _OneProjection()
    adapter = tlora.inject(model, rank=16, lora_alpha=8.0, target_modules=["to_q"])
    layer = adapter.layers["to_q"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (layer.p, layer.lam, layer.q):
            p.add_(drift * p.abs().mean() * torch.randn(p.shape, generator=g))
    path = tlora.save(model, tmp_path / "a.safetensors")
    f = {k: v.double() for k, v in load_file(str(path)).items()}
    f = {k: f[f"to_q.{k}"] for k in ("p", "lam", "q", "p0", "lam0", "q0")}
    s = 8.0 / 16
    exact = s * (f["p"] * f["lam"] @ f["q"] - f["p0"] * f["lam0"] @ f["q0"])
    result = export(path, tmp_path / "x.safetensors")
    lora = load_file(str(result.path))
    a, b = lora["transformer.to_q.lora_A.weight"], lora["transformer.to_q.lora_B.weight"]
    assert a.dtype == b.dtype == torch.float32 and a.shape == (32, 320) and b.shape == (640, 32)
    assert rel(b.double() @ a.double(), exact) < 1e-5  # exact in float32
    plain_a = torch.cat([f["q"], f["q0"]]).float()
    plain_b = (s * torch.cat([f["p"] * f["lam"], -f["p0"] * f["lam0"]], dim=1)).float()
    for dtype, bound in ((torch.float16, 1e-2), (torch.bfloat16, 3e-2)):
        ours = rel(b.to(dtype).double() @ a.to(dtype).double(), exact)
        plain = rel(plain_b.to(dtype).double() @ plain_a.to(dtype).double(), exact)
        assert ours <= bound, (dtype, ours)
        assert plain > bound, (dtype, plain)  # the test can tell the forms apart


# ---- writing: never over the input, the PEFT folder whole ---------------------------------------


def one_projection_file(tmp_path, name: str = "adapter.safetensors"):
    model = _OneProjection()
    adapter = tlora.inject(model, rank=4, target_modules=["to_q"])
    perturb(adapter, std=0.01)
    return tlora.save(model, tmp_path / name)


def test_export_and_import_refuse_an_output_that_is_the_input(tmp_path, capsys):
    """`tlora export --adapter x --out x` replaced the adapter with a static LoRA (exit 0)."""
    import os

    from tlora.cli import main

    path = one_projection_file(tmp_path)
    original = path.read_bytes()
    (tmp_path / "link.safetensors").symlink_to(path)
    os.link(path, tmp_path / "hard.safetensors")
    (tmp_path / "peft").mkdir()
    inside = one_projection_file(tmp_path / "peft", "adapter_model.safetensors")
    for source, out, fmt in (
        (path, path, "diffusers"),
        (path, tmp_path / "link.safetensors", "kohya"),
        (tmp_path / "link.safetensors", path, "diffusers"),
        (path, tmp_path / "hard.safetensors", "diffusers"),
        (inside, tmp_path / "peft", "peft"),  # the folder replaced whole holds the input
    ):
        with pytest.raises(tlora.ConfigError, match=rf"the output {out}.* is the input {source}"):
            export(source, out, format=fmt)
    for out in (path, tmp_path / "hard.safetensors"):
        with pytest.raises(tlora.ConfigError, match=rf"the output {out} is the input {path} \(the same file\)"):
            import_file(path, _OneProjection(), out)
    assert main(["export", "--adapter", str(path), "--format", "diffusers", "--out", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the output {path} is the input {path}" in err
    assert main(["import", "--adapter", str(path), "--model", str(tmp_path), "--out", str(path)]) == 2
    assert f"the output {path} is the input {path}" in capsys.readouterr().err
    assert path.read_bytes() == original and tlora.read(inside)


def test_peft_export_is_written_as_one_folder(tmp_path):
    path = one_projection_file(tmp_path)
    out = tmp_path / "peft"
    export(path, out, format="peft", rank=4)
    first = json.loads((out / "adapter_config.json").read_text())
    result = export(path, out, format="peft", rank=1)  # an earlier export is replaced whole
    assert json.loads(result.config_path.read_text())["r"] == 2 != first["r"]
    assert load_file(str(result.path))["base_model.model.to_q.lora_A.weight"].shape[0] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "peft"]  # no temporaries
    (out / "notes.txt").write_text("mine")
    with pytest.raises(tlora.ConfigError, match=r"holds files that are not part of a peft export \(notes\.txt\)"):
        export(path, out, format="peft")
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(tlora.ConfigError, match=r"a peft export is a folder .*got the file name 'x\.safetensors'"):
        export(path, tmp_path / "x.safetensors", format="peft")
    for out in (tmp_path / "missing" / "peft", tmp_path / "missing" / "x.safetensors"):
        with pytest.raises(tlora.MissingFileError, match=f"folder {tmp_path / 'missing'} does not exist"):
            export(path, out, format="peft" if out.suffix == "" else "diffusers")


def test_a_peft_export_killed_between_its_two_files_keeps_the_old_pair(tmp_path):
    """A kill after the weights were written and before the config was: the folder still holds
    the previous export (weights and config of one rank), not rank-2 weights beside r=8."""
    import os
    import subprocess
    import sys
    import textwrap

    path = one_projection_file(tmp_path)
    out = tmp_path / "peft"
    export(path, out, format="peft", rank=4)
    code = textwrap.dedent(
        f"""
        import os, signal
        from tlora.files.export import export
        from tlora.files.export import peft

        def killed(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

        peft.write_atomic = killed  # the config, written after the weights
        export({str(path)!r}, {str(out)!r}, format="peft", rank=1)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.wait(timeout=300) == -9
    r = json.loads((out / "adapter_config.json").read_text())["r"]
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert r == 8 and weights["base_model.model.to_q.lora_A.weight"].shape[0] == r
    export(path, out, format="peft", rank=1)  # the next export removes the killed one's folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "peft"]


def test_export_arguments_of_the_wrong_type_are_config_errors(tmp_path):
    path = one_projection_file(tmp_path)
    for timestep in ("x", True, float("nan"), 1001):
        with pytest.raises(tlora.ConfigError, match=r"timestep \(on the training scale .*\) must be a finite number"):
            export(path, tmp_path / "y.safetensors", timestep=timestep)
    with pytest.raises(tlora.ConfigError, match=r"export reads a tlora file \(a path\).*got int"):
        export(5, tmp_path / "y.safetensors")
