"""The timestep conventions themselves: each as a tensor op against plain formulas, and how one is
chosen (by class, by the forward's signature, a custom function, timestep_scale, files written
before conventions existed); the registry names real diffusers classes and classifies every one
with a time-like argument.
"""

from __future__ import annotations

import inspect

import diffusers as D
import pytest
import torch
from family_models import cosmos, sd3
from family_ranks import R_MIN, B, R, T, drive, inject, r_of, ranks_of_call

import tlora
from tlora import timesteps
from tlora.testing.tiny import tiny_flux_pipeline

# ---- the conventions as functions --------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(timesteps.CONVENTIONS))
def test_conventions_are_tensor_ops_on_any_device_and_dtype(name):
    """No host sync: a meta tensor (which has no values to read) maps without error; every input dtype
    and shape gives float32 of the same shape on the same device."""
    fn = timesteps.mapping(name, None, T)
    out = fn(torch.zeros(3, device="meta"))
    assert out.device.type == "meta" and out.dtype == torch.float32 and out.shape == (3,)
    for a in (
        torch.tensor(0.5),
        torch.tensor([0.25, 0.5], dtype=torch.float16),
        torch.tensor([0.5], dtype=torch.bfloat16),
        torch.tensor([0, 1], dtype=torch.int64),
        0.5,
    ):
        y = fn(a)
        assert y.dtype == torch.float32 and y.shape == torch.as_tensor(a).shape
        assert bool(((y >= 0) & (y <= T)).all())


def test_convention_values_against_plain_formulas():
    a = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    expect = {
        "timesteps": a,
        "unit": T * a,
        "reversed_unit": T * (1 - a),
        "reversed": (T - a).clamp(0, T),
        "t_minus_1": a + 1,
        "edm_flow": T * torch.exp(4 * a) / (1 + torch.exp(4 * a)),
    }
    for name, want in expect.items():
        got = timesteps.mapping(name, None, T)(a)
        assert torch.allclose(got.double(), want.clamp(0, T), rtol=1e-6, atol=1e-4), name
    # Rounding slack: t/1000 in bfloat16 may land just past the end; clamped, not refused.
    assert timesteps.mapping("unit", None, T)(torch.tensor(1.0002)).item() == T


# ---- choosing a convention ---------------------------------------------------------------------


def test_unknown_diffusers_class_refused_naming_class_and_option():
    temporal = D.TransformerTemporalModel(num_attention_heads=2, attention_head_dim=4, in_channels=8, norm_num_groups=4)
    with pytest.raises(tlora.ConfigError, match=r"TransformerTemporalModel \(a building block.*timestep_convention"):
        tlora.inject(temporal, rank=2)
    assert tlora.adapter_of(temporal) is None
    assert not any(type(m).__name__ == "TLoraLinear" for m in temporal.modules())
    # With a convention it goes through.
    adapter = tlora.inject(temporal, rank=2, timestep_convention="timesteps")
    assert adapter.config.timestep_convention == "timesteps"


def test_ambiguous_class_refused_without_a_choice():
    model, _ = cosmos()
    with pytest.raises(tlora.ConfigError, match=r"CosmosTransformer3DModel.*edm_flow.*timestep_convention"):
        tlora.inject(model, rank=2)
    with pytest.raises(tlora.ConfigError, match=r"unknown timestep_convention 'edm2'"):
        tlora.inject(model, rank=2, timestep_convention="edm2")


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = torch.nn.Linear(8, 8)

    def forward(self, x, t):
        return self.to_q(x)


class _Wrapper(_Net):
    def forward(self, *args, **kwargs):
        return self.to_q(args[0])


class _KeywordOnly(_Net):
    def forward(self, x, *, timestep_ratio):
        return self.to_q(x)


def test_timestep_argument_comes_from_the_signature():
    """The argument is found by name and position in the forward's signature (`t` here, as
    Z-Image's), keyword-only ones by keyword, and a forward(*args, **kwargs) by keyword."""
    assert timesteps.timestep_parameter(_Net()) == ("t", 1)
    assert timesteps.timestep_parameter(_Net) == ("t", 1)  # the class: `self` does not count
    assert timesteps.timestep_parameter(_KeywordOnly()) == ("timestep_ratio", None)
    assert timesteps.timestep_parameter(_Wrapper()) is None
    x = torch.randn(B, 8)
    for model, call in (
        (_Net(), lambda m, t: m(x, t)),
        (_Net(), lambda m, t: m(x, t=t)),
        (_KeywordOnly(), lambda m, t: m(x, timestep_ratio=t)),
        (_Wrapper(), lambda m, t: m(x, timestep=t)),
    ):
        adapter = inject(model)
        assert [ranks_of_call(adapter, lambda t=t: call(model, t)) for t in (900.0, 100.0)] == [
            (r_of(900.0),) * B,
            (r_of(100.0),) * B,
        ]
    with pytest.raises(tlora.ConfigError, match=r"_Wrapper\.forward was called without a timestep"):
        with torch.no_grad():
            model(x, torch.tensor(500.0))  # positional, into *args: no name to find it by


def test_custom_callable_and_reload(tmp_path):
    """A function is used as given; files store "custom" and loading asks for it to be registered."""
    torch.manual_seed(0)
    model, kwargs = sd3()
    fn = lambda a: T - a  # noqa: E731  (this model's "pipeline" counts the other way)
    adapter = inject(model, timestep_convention=fn)
    assert adapter.config.timestep_convention == "custom"
    ts = [torch.full((B,), 900.0), torch.full((B,), 100.0)]
    assert drive(model, kwargs, lambda a: a, ts, adapter) == [(r_of(100.0),) * B, (r_of(900.0),) * B]
    path = tlora.save(model, tmp_path / "a.safetensors")
    assert tlora.read(path)[1]["config"]["timestep_convention"] == "custom"

    torch.manual_seed(0)
    other, _ = sd3()
    with pytest.raises(ValueError, match=r"register\('custom', fn\)"):
        tlora.load(other, path)
    assert tlora.adapter_of(other) is None
    timesteps.register("custom", fn)
    try:
        again = tlora.load(other, path)
        assert drive(other, kwargs, lambda a: a, ts, again) == [(r_of(100.0),) * B, (r_of(900.0),) * B]
    finally:
        timesteps._USER.pop("custom", None)


def test_timestep_scale_still_multiplies_and_is_stored(tmp_path):
    torch.manual_seed(0)
    model, kwargs = sd3()
    adapter = inject(model, timestep_scale=500.0)
    assert adapter.config.timestep_convention == "scale" and adapter.timestep_scale == 500.0
    assert drive(model, kwargs, lambda a: a, [torch.full((B,), 1.5)], adapter) == [(r_of(750.0),) * B]
    meta = tlora.read(tlora.save(model, tmp_path / "s.safetensors"))[1]
    assert meta["timestep_scale"] == 500.0
    adapter.remove()
    with pytest.raises(ValueError, match=r"timestep_scale=500.0 is the 'scale' convention.*'unit'"):
        inject(model, timestep_scale=500.0, timestep_convention="unit")


def test_files_without_a_convention_use_the_class_default():
    """Adapter files written before conventions existed have no timestep_convention: FLUX still gets
    t/1000 read as T * argument."""
    from tlora.adapter.inject import inject_config

    model = tiny_flux_pipeline().transformer
    config = tlora.AdapterConfig.from_dict({"rank": R, "min_rank": R_MIN})
    assert config.timestep_convention is None
    adapter = inject_config(model, config)
    assert adapter.ranks_for(torch.tensor([0.25])) == [r_of(250.0)]
    assert adapter.timestep_scale == 1000.0


# Registered or refused classes that diffusers does not export at its top level, and their modules.
NOT_EXPORTED = {
    "MultiControlNetUnionModel": "diffusers.models.controlnets.multicontrolnet_union",
    "WuerstchenPrior": "diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_prior",
    "WuerstchenDiffNeXt": "diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_diffnext",
    "UTransformer2DModel": "diffusers.pipelines.deprecated.unidiffuser.modeling_uvit",
    "UNetFlatConditionModel": "diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet",
}


def diffusers_class(name: str):
    import importlib

    if name in NOT_EXPORTED:
        return getattr(importlib.import_module(NOT_EXPORTED[name]), name)
    return getattr(D, name, None)


def test_registry_names_real_classes():
    """Every registered class exists in this diffusers and its forward's signature shows the timestep
    argument; every refused one exists too."""
    for name in [*timesteps.BY_CLASS, *timesteps.AMBIGUOUS, *timesteps.REFUSED]:
        cls = diffusers_class(name)
        assert cls is not None, f"{name} is not a diffusers class"
        if name not in timesteps.REFUSED:
            assert timesteps.timestep_parameter(cls) is not None, name


def test_every_diffusers_class_with_a_timestep_is_classified_and_the_readme_lists_the_rest():
    """Each model class diffusers exports whose forward takes a time-like argument is registered,
    ambiguous (the pipeline decides) or refused with a reason, and the README names every class
    that is not simply registered."""
    from pathlib import Path

    import diffusers.models
    import diffusers.pipelines

    classified = {*timesteps.BY_CLASS, *timesteps.AMBIGUOUS, *timesteps.REFUSED}
    unclassified = []
    for package in (diffusers.models, diffusers.pipelines):
        for name in sorted({n for names in package._import_structure.values() for n in names}):
            cls = getattr(package, name, None)
            if not (isinstance(cls, type) and issubclass(cls, D.ModelMixin)):
                continue
            params = list(inspect.signature(cls.forward).parameters)[1:]
            if not any("time" in p or p in timesteps.TIMESTEP_ARGS for p in params):
                continue
            if not any(c.__name__ in classified for c in cls.__mro__):
                unclassified.append(f"{name}({', '.join(params[:4])}, ...)")
    assert not unclassified, unclassified
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Timestep conventions")[1].split("\n## ")[0]
    missing = [n for n in [*timesteps.AMBIGUOUS, *timesteps.REFUSED] if f"`{n}`" not in section]
    assert not missing, f"README's timestep section does not list {missing}"
