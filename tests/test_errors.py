"""Bad input: each case raises the right error type with a message that names the problem, and
leaves the model exactly as it was (same tensors, same module types, same adapter, same hooks)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import tlora
from tlora.adapter.inject import adapter_of
from tlora.layer import lowrank_update


class Attn(nn.Module):
    def __init__(self, dim: int = 16, out: int | None = None):
        super().__init__()
        self.to_q = nn.Linear(dim, out or dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, 8)
        self.norm = nn.LayerNorm(dim)


class Model(nn.Module):
    """Two attention blocks under `blocks.*.attn`, called with (x, timestep) like a denoiser."""

    def __init__(self, dim: int = 16, out: int | None = None):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Module() for _ in range(2)])
        for b in self.blocks:
            b.attn = Attn(dim, out)
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x, timestep=None):
        h = x
        for b in self.blocks:
            h = b.attn.to_q(b.attn.norm(h)) if b.attn.to_q.out_features == h.shape[-1] else h
        return self.proj_out(h)


class OtherModel(Model):
    """Same layout, another class: an adapter file records the class it was made for."""


def snapshot(model: nn.Module) -> dict:
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "adapter": adapter_of(model),
        "pre_hooks": len(model._forward_pre_hooks),
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["adapter"] is before["adapter"]
    assert after["pre_hooks"] == before["pre_hooks"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), k


def raises_and_untouched(model, exc, fragment, fn, *args, **kwargs):
    before = snapshot(model)
    with pytest.raises(exc, match=fragment) as info:
        fn(*args, **kwargs)
    assert_untouched(model, before)
    return str(info.value)


# ---- inject ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(rank=0), r"rank must be an integer >= 1, got 0"),
        (dict(rank=-3), r"rank must be an integer >= 1"),
        (dict(rank=4, min_rank=5), r"min_rank must be an integer in 1\.\.rank \(4\), got 5"),
        (dict(rank=4, min_rank=0), r"min_rank must be an integer in 1\.\.rank"),
        (dict(variant="dora"), r"unknown variant 'dora': choose one of tlora, vanilla, lora"),
        (dict(init="first"), r"unknown init 'first': choose one of principal, middle, last"),
        (dict(init_from="noise"), r"unknown init_from 'noise'"),
        (dict(rank_exponent=0.0), r"rank_exponent must be > 0"),
        (dict(rank_exponent=-1.0), r"rank_exponent must be > 0"),
        (dict(variant="lora", min_rank=2, rank=4), r"variant 'lora' has no timestep mask"),
        (dict(variant="vanilla", init="principal"), r"init/init_from apply to variant 'tlora' only"),
        (dict(lora_alpha=0.0), r"lora_alpha must be > 0"),
        (dict(num_train_timesteps=0), r"num_train_timesteps must be an integer >= 2"),
        (dict(timestep_scale=-1.0), r"timestep_scale must be > 0"),
    ],
)
def test_inject_bad_config(kwargs, fragment):
    model = Model()
    raises_and_untouched(model, ValueError, fragment, tlora.inject, model, **{"rank": 4, **kwargs})


def test_rank_larger_than_a_target_names_the_module():
    # to_v is 16 -> 8, so rank 12 fits to_q and to_k but not to_v; nothing may be swapped in.
    model = Model()
    msg = raises_and_untouched(
        model,
        ValueError,
        r"rank 12 is larger than module 'blocks\.0\.attn\.to_v' allows",
        tlora.inject,
        model,
        rank=12,
        target_modules=["to_q", "to_v"],
    )
    assert "8 x 16, at most 8" in msg


def test_target_matching_nothing_suggests_close_names():
    model = Model()
    msg = raises_and_untouched(
        model,
        tlora.ConfigError,
        r"target_modules \['to_qq'\] matches no nn\.Linear in Model",
        tlora.inject,
        model,
        rank=4,
        target_modules=["to_qq"],
    )
    assert "Close names:" in msg and "to_q" in msg.split("Close names:")[1]
    msg = raises_and_untouched(
        model, tlora.ConfigError, r"matches no nn\.Linear", tlora.inject, model, rank=4, target_modules=r".*\.to_z"
    )
    assert "proj_out" in msg  # lists what the Linear layers are called


def test_target_that_is_not_linear():
    model = Model()
    raises_and_untouched(
        model,
        tlora.ConfigError,
        r"not nn\.Linear.*blocks\.0\.attn\.norm \(LayerNorm\)",
        tlora.inject,
        model,
        rank=4,
        target_modules=["norm"],
    )


def test_empty_target_list():
    model = Model()
    raises_and_untouched(
        model, tlora.ConfigError, r"target_modules is empty", tlora.inject, model, rank=4, target_modules=[]
    )


@pytest.mark.parametrize("regex", ["(", "to_q[", "*"])
def test_target_regex_that_does_not_compile(regex):
    """A regular expression that does not compile (re.error before) is a setting's error, named."""
    model = Model()
    msg = raises_and_untouched(
        model,
        tlora.ConfigError,
        r"target_modules .* is not a valid regular expression \(.*\).*list of module-name suffixes",
        tlora.inject,
        model,
        rank=4,
        target_modules=regex,
    )
    assert repr(regex) in msg
    with pytest.raises(tlora.ConfigError, match="not a valid regular expression"):
        tlora.AdapterConfig.from_dict({"rank": 4, "target_modules": regex})


def test_inject_twice():
    model = Model()
    first = tlora.inject(model, rank=4)
    msg = raises_and_untouched(
        model,
        tlora.ModelMismatchError,
        r"already has a tlora adapter \(tlora, rank 4\)",
        tlora.inject,
        model,
        rank=2,
        target_modules=["proj_out"],
    )
    assert "remove()" in msg
    assert adapter_of(model) is first
    first.remove()
    with pytest.raises(tlora.ModelMismatchError, match=r"this adapter was already removed from its Model"):
        first.remove()
    tlora.inject(model, rank=2)  # allowed again after remove


# ---- forward -----------------------------------------------------------------------------------


@pytest.fixture
def adapted():
    model = Model()
    tlora.inject(model, rank=4, target_modules=["to_q"])
    return model


@pytest.mark.parametrize(
    "timestep,exc,fragment",
    [
        (float("nan"), tlora.ConfigError, r"timestep is NaN"),
        (torch.tensor([10.0, float("nan"), 3.0]), tlora.ConfigError, r"NaN"),
        (-1, tlora.ConfigError, r"timestep -1 is outside \[0, 1000\]"),
        (torch.tensor([5, -2, 5]), tlora.ConfigError, r"outside \[0, 1000\]"),
        (1001, tlora.ConfigError, r"timestep 1001 is outside \[0, 1000\]"),
        (
            torch.tensor([2, 3]),
            tlora.ConfigError,
            r"got 2 timesteps for a batch of 3: pass one timestep, or one per sample",
        ),
        (torch.tensor([2, 3, 4, 5]), tlora.ConfigError, r"got 4 timesteps for a batch of 3"),
        (
            torch.zeros(3, 1, 1),
            tlora.ConfigError,
            r"timestep must be a number, a 1-D tensor or \(batch, tokens\), got shape \(3, 1, 1\)",
        ),
        ("500", tlora.ConfigError, r"a timestep is a number or a numeric tensor, got '500'"),
        (b"5", tlora.ConfigError, r"a timestep is a number or a numeric tensor, got b'5'"),
        ([[1], [2, 3]], tlora.ConfigError, r"a timestep is a number or a numeric tensor, got \[\[1\], \[2, 3\]\]"),
        (torch.tensor([True, False, True]), tlora.ConfigError, r"a timestep is a real number, got dtype torch\.bool"),
        (torch.tensor([1j, 2j, 3j]), tlora.ConfigError, r"a timestep is a real number, got dtype torch\.complex"),
        (torch.empty(0), tlora.ConfigError, r"Model got an empty timestep tensor"),
    ],
)
def test_bad_timestep(adapted, timestep, exc, fragment):
    x = torch.randn(3, 5, 16)
    raises_and_untouched(adapted, exc, fragment, adapted, x, timestep)
    # The failed call leaves the adapter usable.
    out = adapted(x, torch.tensor([0, 500, 1000]))
    assert out.shape == (3, 5, 16)


def test_forward_without_timestep(adapted):
    x = torch.randn(2, 5, 16)
    raises_and_untouched(
        adapted, tlora.ConfigError, r"Model\.forward was called without a timestep.*adapter\.timestep", adapted, x
    )
    with adapter_of(adapted).timestep(100):
        assert adapted(x).shape == (2, 5, 16)


@pytest.mark.parametrize(
    "ranks,fragment",
    [
        (5, r"rank 5 is outside 1\.\.4"),
        ([2, 0, 3], r"rank 0 is outside 1\.\.4"),
        (2.7, r"rank 2\.7 is not an integer: ranks are integers in 1\.\.4"),
        ("2", r"rank '2' is not an integer"),
        (True, r"rank True is not an integer"),
        ([2, 1.5], r"rank 1\.5 is not an integer"),
        ([], r"ranks must not be empty"),
    ],
)
def test_bad_rank_block(adapted, ranks, fragment):
    with pytest.raises(tlora.ConfigError, match=fragment):
        with adapter_of(adapted).rank(ranks):
            pass


@pytest.mark.parametrize(
    "bad,message",
    [
        (5, "rank 5 is outside 1..4"),
        (0, "rank 0 is outside 1..4"),
        (2.5, "rank 2.5 is not an integer: ranks are integers in 1..4"),
        (True, "rank True is not an integer: ranks are integers in 1..4"),
    ],
)
def test_one_rank_rule_at_every_door(adapted, tmp_path, bad, message):
    """A rank asked of an adapter is checked by one rule (config.check_rank), in the same words,
    wherever it is asked: adapter.rank, the kernels' functional form and export."""
    from tlora.files import export as interop

    adapter = adapter_of(adapted)
    layer = adapted.blocks[0].attn.to_q
    doors = [
        lambda: adapter.rank(bad).__enter__(),
        lambda: lowrank_update(torch.randn(2, 16), layer.factors(), [bad]),
        lambda: interop.export(adapter, tmp_path / "x.safetensors", rank=bad),
    ]
    for door in doors:
        with pytest.raises(tlora.ConfigError) as info:
            door()
        assert str(info.value) == message
    assert not (tmp_path / "x.safetensors").exists()


def test_one_compute_dtype_message():
    """The Python check (layer.ops.check_compute_dtype) and the native one (src/kernel) refuse a
    dtype in the same words, each naming the dtype as its side spells it."""
    from tlora import _native
    from tlora.layer.ops import check_compute_dtype

    tail = "is not supported: use float32, float16, bfloat16 or float64"
    with pytest.raises(tlora.ConfigError) as python:
        check_compute_dtype(torch.int64)
    assert str(python.value) == f"input dtype torch.int64 {tail}"
    with pytest.raises(tlora.ConfigError) as named:
        _native.lowrank_operands([torch.randn(2, 3), torch.randn(4, 2)], None, "int8")
    assert str(named.value) == f'compute dtype "int8" {tail}'
    down, up = torch.randn(2, 3), torch.randn(4, 2)
    d, u = _native.lowrank_operands([down, up], None, "float32")
    with pytest.raises(tlora.ConfigError) as native:
        _native.lowrank_forward(torch.ones(1, 3, dtype=torch.int64), d, u)
    assert str(native.value) == f"input dtype Int64 {tail}"


def _three_levels(a):
    """A correct user convention: the argument is 1000 - t."""
    return 1000 - a


# What a user's timestep convention returns for the argument tensor([900., 500., 100.]) (a batch of
# 3), and what the error says about it. Built lazily: the meta tensor and its shapes per case.
BAD_CONVENTION_OUTPUTS = {
    "float": (lambda a: 500.0, r"returned float 500\.0"),
    "0-d tensor": (lambda a: (1000 - a).mean(), r"returned a float64 tensor of shape \(\) on cpu"),
    "None": (lambda a: None, r"returned NoneType None"),
    "string": (lambda a: "t", r"returned str 't'"),
    "wrong shape": (lambda a: (1000 - a)[:2], r"returned a float64 tensor of shape \(2,\) on cpu"),
    "empty": (lambda a: a[:0], r"returned a float64 tensor of shape \(0,\) on cpu"),
    "(B, 1)": (lambda a: (1000 - a)[:, None], r"returned a float64 tensor of shape \(3, 1\) on cpu"),
    "meta": (lambda a: torch.empty(3, device="meta"), r"returned a float32 tensor of shape \(3,\) on meta"),
    "boolean": (lambda a: a > 0, r"returned a bool tensor of shape \(3,\) on cpu"),
    "complex": (lambda a: a * 1j, r"returned a complex128 tensor"),
    "numpy": (lambda a: (1000 - a).numpy(), r"returned ndarray"),
}


@pytest.mark.parametrize("how", ["inject", "registered"])
@pytest.mark.parametrize("case", sorted(BAD_CONVENTION_OUTPUTS))
def test_timestep_convention_output_is_checked(case, how):
    """A convention function's output is checked before it picks ranks: one ConfigError naming the
    convention, the function, what it returned and what was expected (raw TypeError / RuntimeError
    before, and an empty result ran every sample at full rank)."""
    fn, fragment = BAD_CONVENTION_OUTPUTS[case]
    model = Model()
    if how == "registered":
        tlora.timesteps.register("issue21_case", fn)
    try:
        convention = "issue21_case" if how == "registered" else fn
        tlora.inject(model, rank=4, min_rank=2, target_modules=["to_q"], timestep_convention=convention)
        x, t = torch.randn(3, 5, 16), torch.tensor([900.0, 500.0, 100.0])
        name = "issue21_case" if how == "registered" else "custom"
        msg = raises_and_untouched(model, tlora.ConfigError, fragment, model, x, t)
        assert f"timestep convention {name!r} (" in msg and "<lambda>" in msg
        assert "for the argument, a float64 tensor of shape (3,) on cpu" in msg
        assert "it must return a real tensor of shape (3,) on cpu" in msg
        # The hook's other entry points check the same way.
        with pytest.raises(tlora.ConfigError, match=fragment):
            adapter_of(model).ranks_for(t, batch=3)
    finally:
        tlora.timesteps._USER.pop("issue21_case", None)


def test_a_correct_convention_gives_per_sample_ranks():
    """The reference for the cases above: the same batch with a correct function gets one rank per
    sample, r(t) = floor((T - t) / T * (r - r_min)) + r_min at t = 100, 500, 900 and 0, 500, 1000."""
    model = Model()
    adapter = tlora.inject(model, rank=4, min_rank=2, target_modules=["to_q"], timestep_convention=_three_levels)
    for levels in ([100, 500, 900], [0, 500, 1000]):
        want = [(1000 - t) * 2 // 1000 + 2 for t in levels]
        assert adapter.ranks_for(1000 - torch.tensor(levels, dtype=torch.float32), batch=3) == want
        seen = []
        hook = model.blocks[0].attn.to_q.register_forward_pre_hook(lambda m, a: seen.append(list(adapter.state.ranks)))
        model(torch.randn(3, 5, 16), 1000 - torch.tensor(levels, dtype=torch.float32))
        hook.remove()
        assert seen == [want]


@pytest.mark.parametrize(
    "convention,fragment",
    [
        ("edm2", r"unknown timestep_convention 'edm2': one of timesteps, unit,"),
        (5, r"unknown timestep_convention 5"),
    ],
)
def test_unknown_timestep_convention(convention, fragment):
    model = Model()
    raises_and_untouched(
        model, tlora.ConfigError, fragment, tlora.inject, model, rank=4, timestep_convention=convention
    )


def test_unregistered_custom_convention_on_load(tmp_path):
    src = Model()
    tlora.inject(src, rank=4, timestep_convention=_three_levels)
    path = tlora.save(src, tmp_path / "c.safetensors")
    model = Model()
    msg = _load_fails(model, path, tlora.ConfigError, r"timestep convention 'custom' .* is not registered")
    assert "tlora.timesteps.register('custom', fn)" in msg


@pytest.mark.parametrize(
    "name,fn,fragment",
    [
        ("mine", 3, r"register\('mine', fn\): fn must be callable, got int"),
        ("unit", _three_levels, r"'unit' is a built-in timestep convention"),
        ("scale", _three_levels, r"'scale' is a built-in timestep convention"),
        ("", _three_levels, r"name must be a non-empty string, got ''"),
        (None, _three_levels, r"name must be a non-empty string, got None"),
    ],
)
def test_bad_registration(name, fn, fragment):
    with pytest.raises(tlora.ConfigError, match=fragment):
        tlora.timesteps.register(name, fn)
    assert name not in tlora.timesteps._USER


def test_convention_for_without_a_denoiser():
    with pytest.raises(tlora.ConfigError, match=r"convention_for\(scheduler\) needs the denoiser too"):
        tlora.timesteps.convention_for(object())


@pytest.mark.parametrize(
    "option,value,fragment",
    [
        ("fast_path", 1, r"fast_path must be True or False, got 1"),
        ("fold_cache_bytes", -1, r"fold_cache_bytes must be None or an integer >= 0, got -1"),
        ("fold_cache_bytes", True, r"fold_cache_bytes must be None or an integer >= 0, got True"),
        ("host_ranks", "cpu", r"host_ranks must be None, True or False, got 'cpu'"),
    ],
)
def test_bad_run_options_are_refused_before_the_model_is_touched(option, value, fragment):
    model = Model()
    raises_and_untouched(model, tlora.ConfigError, fragment, tlora.inject, model, rank=4, **{option: value})
    # The same check when set on an adapter later; the setting in effect stays.
    adapter = tlora.inject(model, rank=4, fast_path=False, fold_cache_bytes=0, host_ranks=True)
    with pytest.raises(tlora.ConfigError, match=fragment):
        setattr(adapter, option, value)
    assert (adapter.state.fast_path, adapter.state.fold_cache.budget, adapter.host_ranks) == (False, 0, True)


@pytest.mark.parametrize(
    "x,ranks,fragment",
    [
        (torch.randn(3, 5, 12), [4], r"input shape \[3, 5, 12\] does not end in in_features = 16"),
        (torch.randint(0, 3, (3, 5, 16)), [4], r"input dtype (Int64|torch.int64) is not supported"),
        (torch.randn(3, 5, 16), [5], r"rank 5 is outside 1\.\.4"),
        (torch.randn(3, 5, 16), [0], r"rank 0 is outside 1\.\.4"),
        (torch.randn(3, 5, 16), [], r"ranks must not be empty"),
        (torch.randn(3, 5, 16), [4, 2], r"got 2 per-sample ranks for an input of shape \[3, 5, 16\]"),
    ],
)
def test_kernel_rejects_bad_input(adapted, x, ranks, fragment):
    layer = adapted.blocks[0].attn.to_q
    before = snapshot(adapted)
    with pytest.raises(ValueError, match=fragment):
        lowrank_update(x, layer.factors(), ranks, 1.0)
    assert_untouched(adapted, before)


def test_kernel_rejects_mismatched_factors():
    p, lam, q = torch.randn(8, 4), torch.randn(4), torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"Q has 3 rows but P has 4 columns"):
        lowrank_update(torch.randn(2, 6), [p, lam, q[:3], p, lam, q[:3]])
    with pytest.raises(ValueError, match=r"lam0 must have shape \[4\]"):
        lowrank_update(torch.randn(2, 6), [p, lam, q, p, lam[:2], q])
    with pytest.raises(ValueError, match=r"expected 6 factors .* or 2 \(down, up\), got 3"):
        lowrank_update(torch.randn(2, 6), [p, lam, q])


# ---- adapter files -----------------------------------------------------------------------------


def _make_adapter_file(path, model=None):
    src = model if model is not None else Model()
    adapter = tlora.inject(src, rank=4, target_modules=["to_q", "to_k"])
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return tlora.save(src, path, extra={"token": "sks"})


@pytest.fixture
def saved(tmp_path):
    return _make_adapter_file(tmp_path / "a.safetensors")


def _load_fails(model, path, exc, fragment):
    return raises_and_untouched(model, exc, fragment, tlora.load, model, path)


def test_good_file_loads(tmp_path):
    # The baseline the failing cases differ from: the same layers, the same outputs.
    src = Model()
    model = copy.deepcopy(src)
    path = _make_adapter_file(tmp_path / "a.safetensors", src)
    adapter = tlora.load(model, path)
    assert sorted(adapter.layers) == [
        "blocks.0.attn.to_k",
        "blocks.0.attn.to_q",
        "blocks.1.attn.to_k",
        "blocks.1.attn.to_q",
    ]
    assert adapter.config.extra == {"token": "sks"}
    x, t = torch.randn(2, 3, 16), torch.tensor([100, 900])
    with torch.no_grad():
        assert not torch.equal(src(x, t), adapter.remove()(x, t))  # the adapter changes the output
        adapter = tlora.load(model, path)
        assert torch.equal(model(x, t), src(x, t))


def test_truncated_file(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) - 17])
    _load_fails(Model(), saved, ValueError, r"not a valid safetensors file \(truncated or another format\)")


def test_file_cut_inside_header(saved):
    saved.write_bytes(saved.read_bytes()[:20])
    _load_fails(Model(), saved, ValueError, r"not a valid safetensors file")


def test_not_safetensors(tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    _load_fails(Model(), path, ValueError, r"not a valid safetensors file")


@pytest.mark.parametrize("name", ["adapter.pt", "adapter.bin", "adapter.ckpt"])
def test_pickle_path_is_refused_without_reading(tmp_path, name):
    path = tmp_path / name
    torch.save({"w": torch.zeros(2)}, path)
    msg = _load_fails(Model(), path, ValueError, r"pickle-based checkpoint, which tlora never loads")
    assert "safetensors.torch.save_file" in msg


def test_missing_file(tmp_path):
    _load_fails(Model(), tmp_path / "nope.safetensors", FileNotFoundError, r"nope\.safetensors")


def test_safetensors_without_tlora_metadata(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "lora.safetensors"
    save_file({"blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 16)}, str(path))
    _load_fails(Model(), path, ValueError, r"no 'tlora' metadata: it is a safetensors file, but not a tlora adapter")


def _rewrite(path, edit_meta=None, edit_tensors=None, raw_meta=None):
    """Re-save an adapter file with its metadata or tensors changed (safetensors' own writer)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["tlora"])
    tensors = load_file(str(path))
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(path), metadata={"tlora": raw_meta if raw_meta is not None else json.dumps(meta)})


def test_unknown_format_version(saved):
    _rewrite(saved, edit_meta=lambda m: m.update(format_version=99))
    msg = _load_fails(Model(), saved, ValueError, r"adapter format version 99; this tlora reads version 1")
    assert "upgrade tlora" in msg


def test_metadata_not_json(saved):
    _rewrite(saved, raw_meta="{not json")
    _load_fails(Model(), saved, ValueError, r"'tlora' metadata is not valid JSON")


def test_made_for_another_model_class(saved):
    _load_fails(OtherModel(), saved, ValueError, r"was made for a Model, not a OtherModel")


def test_module_shape_mismatch(saved):
    msg = _load_fails(
        Model(out=24),
        saved,
        ValueError,
        r"made for a different model: module 'blocks\.0\.attn\.to_q' is 24 x 16 here but 16 x 16 in the file",
    )
    assert "to_k" not in msg


def test_module_missing_from_model(saved):
    _rewrite(saved, edit_meta=lambda m: m["modules"].update({"blocks.2.attn.to_q": [16, 16]}))
    _load_fails(
        Model(), saved, ValueError, r"adapts module 'blocks\.2\.attn\.to_q', which does not exist in this Model"
    )


def test_tensor_with_wrong_shape(saved):
    def shrink(t):
        t["blocks.1.attn.to_k.q"] = t["blocks.1.attn.to_k.q"][:3].contiguous()

    _rewrite(saved, edit_tensors=shrink)
    _load_fails(
        Model(), saved, ValueError, r"tensor blocks\.1\.attn\.to_k\.q is shape \(3, 16\), expected shape \(4, 16\)"
    )


def test_tensor_missing(saved):
    _rewrite(saved, edit_tensors=lambda t: t.pop("blocks.0.attn.to_q.lam0"))
    _load_fails(Model(), saved, ValueError, r"tensor blocks\.0\.attn\.to_q\.lam0 is missing")


def test_extra_tensor(saved):
    _rewrite(saved, edit_tensors=lambda t: t.update({"blocks.0.attn.to_v.q": torch.zeros(4, 16)}))
    _load_fails(Model(), saved, ValueError, r"tensors that belong to no adapted module: blocks\.0\.attn\.to_v\.q")


def test_load_into_model_that_already_has_an_adapter(saved):
    model = Model()
    tlora.inject(model, rank=2, target_modules=["proj_out"])
    _load_fails(model, saved, ValueError, r"already has a tlora adapter")


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match=r"Model has no tlora adapter to save"):
        tlora.save(Model(), tmp_path / "a.safetensors")
    model = Model()
    tlora.inject(model, rank=4)
    with pytest.raises(ValueError, match=r"adapter files are \.safetensors; got 'a\.pt'"):
        tlora.save(model, tmp_path / "a.pt")
    with pytest.raises(ValueError, match=r"cannot write .*: folder .*missing does not exist"):
        tlora.save(model, tmp_path / "missing" / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


# ---- issue 13: types, checksums, messages ------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(rank=True), r"rank must be an integer >= 1, got True"),
        (dict(rank=4, min_rank=True), r"min_rank must be an integer in 1\.\.rank \(4\), got True"),
        (dict(lora_alpha=float("inf")), r"lora_alpha must be > 0 and finite, got inf"),
        (dict(lora_alpha=float("nan")), r"lora_alpha must be > 0 and finite, got nan"),
        (dict(rank_exponent=float("inf")), r"rank_exponent must be > 0 and finite, got inf"),
        (dict(timestep_scale=float("inf")), r"timestep_scale must be > 0 and finite, got inf"),
        (dict(timestep_scale=True), r"timestep_scale must be > 0 and finite, got True"),
        (dict(seed=1.5), r"seed must be an integer"),
        (dict(seed="x"), r"seed must be an integer"),
        (dict(num_train_timesteps=True), r"num_train_timesteps must be an integer >= 2 .*, got True"),
    ],
)
def test_inject_refuses_bools_and_non_finite_values(kwargs, fragment):
    model = Model()
    msg = raises_and_untouched(model, tlora.ConfigError, fragment, tlora.inject, model, **{"rank": 4, **kwargs})
    assert msg


def test_error_types_are_value_errors_and_exported():
    for name in (
        "TloraError",
        "ConfigError",
        "AdapterFileError",
        "MissingFileError",
        "ModelMismatchError",
        "CheckpointError",
        "TrainingError",
        "InputError",
    ):
        cls = getattr(tlora, name)
        assert issubclass(cls, tlora.TloraError) and issubclass(cls, ValueError), name
    assert issubclass(tlora.MissingFileError, FileNotFoundError)


def test_inject_twice_names_a_function_that_exists():
    model = Model()
    tlora.inject(model, rank=4)
    msg = raises_and_untouched(
        model, tlora.ModelMismatchError, r"already has a tlora adapter", tlora.inject, model, rank=2
    )
    assert "tlora.remove(model)" in msg
    tlora.remove(model)  # it exists and removes the adapter
    assert adapter_of(model) is None and all(type(m) is not tlora.layer.TLoraLinear for m in model.modules())
    with pytest.raises(tlora.ModelMismatchError, match="Model has no tlora adapter to remove"):
        tlora.remove(model)


def test_load_into_a_model_with_an_adapter_says_so(saved):
    # The file's very settings and modules load in place (issue 24, tests/adapter/test_dropin.py);
    # other settings are refused naming each difference, never advising a removal that would
    # leave an optimizer holding the old adapter's parameters.
    model = Model()
    tlora.inject(model, rank=2, target_modules=["to_q", "to_k"])  # the very modules the file adapts
    msg = _load_fails(model, saved, tlora.ModelMismatchError, r"already has a tlora adapter \(tlora, rank 2\)")
    assert "is a TLoraLinear" not in msg and "a.safetensors" in msg and "rank is 4 in the file, 2 here" in msg
    assert "remove" not in msg
    same = Model()
    adapter = tlora.inject(same, rank=4, target_modules=["to_q", "to_k"])
    assert tlora.load(same, saved) is adapter


def test_checksum_is_written_and_a_flipped_data_byte_is_refused(saved):
    from safetensors import safe_open

    with safe_open(str(saved), "pt") as f:
        meta = json.loads(f.metadata()["tlora"])
    assert meta["checksum"].startswith("sha256:") and len(meta["checksum"]) == 7 + 64
    data = bytearray(saved.read_bytes())
    data[-3] ^= 0x01  # the last tensor's data: a valid float, altered
    saved.write_bytes(bytes(data))
    _load_fails(Model(), saved, tlora.AdapterFileError, r"a\.safetensors: checksum: .*do not match the file's checksum")


def test_file_without_checksum_loads_with_a_note(saved):
    src = copy.deepcopy(Model())
    _rewrite(saved, edit_meta=lambda m: m.pop("checksum"))
    with pytest.warns(UserWarning, match=r"has no checksum"):
        adapter = tlora.load(src, saved)
    assert len(adapter.layers) == 4


@pytest.mark.parametrize(
    "edit,fragment",
    [
        (
            lambda m: m["modules"].update({"blocks.0.attn.to_q": [32]}),
            r"modules\['blocks\.0\.attn\.to_q'\]: must be \[out_features, in_features\]",
        ),
        (lambda m: m["modules"].update({"blocks.0.attn.to_q": None}), r"modules\['blocks\.0\.attn\.to_q'\]: must be"),
        (lambda m: m.update(format_version=True), r"format_version: must be an integer, got True"),
        (lambda m: m["config"].update(seed="x"), r"config: seed must be an integer"),
        (lambda m: m["config"].update(rank=True), r"config: rank must be an integer >= 1, got True"),
        (lambda m: m.update(scale=3.0), r"scale: 3\.0 disagrees with the config"),
        (lambda m: m.pop("modules"), r"modules: missing"),
        (lambda m: m.update(config=[1]), r"config: must be a JSON object, got a list"),
    ],
)
def test_malformed_description_names_file_and_field(saved, edit, fragment):
    _rewrite(saved, edit_meta=edit)
    msg = _load_fails(Model(), saved, tlora.AdapterFileError, fragment)
    assert str(saved) in msg


def test_metadata_that_is_not_an_object_or_too_deep(saved):
    _rewrite(saved, raw_meta="[1, 2]")
    _load_fails(Model(), saved, tlora.AdapterFileError, r"metadata must be a JSON object, got a list")
    _rewrite_raw = "[" * 100_000 + "]" * 100_000
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(saved)), str(saved), metadata={"tlora": _rewrite_raw})
    _load_fails(Model(), saved, tlora.AdapterFileError, r"nested too deeply")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_other_float_dtypes_convert_with_a_warning_and_ints_are_refused(saved, dtype):
    def cast(t):
        t["blocks.0.attn.to_q.q"] = t["blocks.0.attn.to_q.q"].to(dtype)

    _rewrite(saved, edit_tensors=cast, edit_meta=lambda m: m.pop("checksum"))
    with pytest.warns(UserWarning, match=rf"tensor blocks\.0\.attn\.to_q\.q is {str(dtype)[6:]}, converted to float32"):
        tlora.load(Model(), saved)
    _rewrite(saved, edit_tensors=lambda t: t.update({"blocks.0.attn.to_q.q": t["blocks.0.attn.to_q.q"].long()}))
    _load_fails(Model(), saved, tlora.AdapterFileError, r"tensor blocks\.0\.attn\.to_q\.q has dtype int64")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e38])
def test_non_finite_or_huge_factors_are_refused_on_load_and_save(saved, value, tmp_path):
    def poison(t):
        t["blocks.1.attn.to_k.lam"][1] = value

    _rewrite(saved, edit_tensors=poison, edit_meta=lambda m: m.pop("checksum"))
    _load_fails(Model(), saved, tlora.AdapterFileError, r"tensor blocks\.1\.attn\.to_k\.lam has")
    model = Model()
    adapter = tlora.inject(model, rank=4)
    with torch.no_grad():
        adapter.layers["blocks.0.attn.to_q"].lam[0] = value
    with pytest.raises(tlora.TloraError, match=r"adapter factor blocks\.0\.attn\.to_q\.lam has"):
        tlora.save(model, tmp_path / "b.safetensors")
    assert not (tmp_path / "b.safetensors").exists()
