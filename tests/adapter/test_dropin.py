"""tlora as a drop-in for a LoRA training script (issue 24): loading into an existing adapter in
place (optimizers keep training it), accelerate's save_state / load_state, an output folder that
diffusers' `load_lora_weights` reads, a peft.LoraConfig as inject's settings, the families' default
targets, and the public `tlora.export`.

The references: an uninterrupted run of the same steps (resumes must match it bit for bit),
diffusers' own loader and the adapter's own forward (the folder's static LoRA must reproduce it
at full rank), PEFT's own module selection for the same LoraConfig."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tiny_calls import denoiser_inputs, perturb

import tlora
from tlora.testing.tiny import tiny_denoiser, tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def _loss(model, kind: str, step: int) -> torch.Tensor:
    inputs = denoiser_inputs(kind, 2, seed=step)
    t = torch.tensor([100.0 + 300 * (step % 3), 900.0])
    if kind == "flux":
        t = t / 1000
    out = model(**inputs, timestep=t, return_dict=False)[0]
    return out.float().pow(2).mean()


def _steps(model, optimizer, kind: str, steps: range) -> None:
    for step in steps:
        optimizer.zero_grad()
        _loss(model, kind, step).backward()
        optimizer.step()


def _state(adapter) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter.state_dict().items()}


# ---- 1. loading into an existing adapter, in place ---------------------------------------------


@pytest.mark.parametrize("kind", ["sdxl", "flux"])
def test_an_optimizer_continues_exactly_after_an_in_place_load(kind, tmp_path):
    reference = tiny_denoiser(kind)
    adapter = tlora.inject(reference, rank=4)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    _steps(reference, opt, kind, range(4))
    expected = _state(adapter)

    model = tiny_denoiser(kind)
    adapter = tlora.inject(model, rank=4)
    params = adapter.parameters()
    opt = torch.optim.AdamW(params, lr=1e-2)
    _steps(model, opt, kind, range(2))
    tlora.save(model, tmp_path / "step2.safetensors")
    saved_opt = copy.deepcopy(opt.state_dict())
    _steps(model, opt, kind, range(2, 5))  # the steps a crash loses: trained on, then thrown away
    assert tlora.load(model, tmp_path / "step2.safetensors") is adapter
    opt.load_state_dict(saved_opt)
    assert all(a is b for a, b in zip(adapter.parameters(), params, strict=True))
    _steps(model, opt, kind, range(2, 4))
    got = _state(adapter)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_an_in_place_load_drops_the_inference_folds(tmp_path):
    model = tiny_denoiser("sdxl")
    adapter = tlora.inject(model, rank=4)
    perturb(adapter, seed=1)
    tlora.save(model, tmp_path / "one.safetensors")
    perturb(adapter, seed=2)
    name, layer = next(iter(adapter.layers.items()))
    x = torch.randn(4 * layer.out_features, layer.in_features)  # many rows: folding pays, the fold is kept
    fresh = tiny_denoiser("sdxl")
    reference = tlora.load(fresh, tmp_path / "one.safetensors").layers[name]
    with torch.no_grad(), adapter.rank(3):
        before = layer(x)
        assert adapter.state.fold_cache.folds_of(layer)
        tlora.load(model, tmp_path / "one.safetensors")
        after = layer(x)
        with tlora.adapter_of(fresh).rank(3):
            expected = reference(x)
    assert torch.equal(after, expected) and not torch.equal(before, after)


def test_a_file_of_other_settings_is_refused_and_the_model_untouched(tmp_path):
    src = tiny_denoiser("sdxl")
    tlora.inject(src, rank=4)
    tlora.save(src, tmp_path / "r4.safetensors")
    model = tiny_denoiser("sdxl")
    adapter = tlora.inject(model, rank=2)
    before = _state(adapter)
    with pytest.raises(tlora.ModelMismatchError, match=r"rank is 4 in the file, 2 here") as info:
        tlora.load(model, tmp_path / "r4.safetensors")
    assert "remove" not in str(info.value)  # no advice that would detach an optimizer
    assert all(torch.equal(v, before[k]) for k, v in adapter.state_dict().items())
    other = tiny_denoiser("sdxl")
    tlora.inject(other, rank=2, target_modules=["to_q"])
    with pytest.raises(tlora.ModelMismatchError, match=r"modules the adapter does not"):
        tlora.load(other, tmp_path / "r4.safetensors")


def test_load_state_dict_checks_everything_before_writing():
    model = tiny_denoiser("sdxl")
    adapter = tlora.inject(model, rank=4)
    good = {k: torch.randn_like(v) * 0.01 for k, v in adapter.state_dict().items()}
    before = _state(adapter)
    key = next(iter(good))
    for bad, fragment in [
        ({**good, key: torch.zeros(1)}, "has shape"),
        ({**good, key: torch.full_like(good[key], float("nan"))}, "non-finite"),
        ({k: v for k, v in good.items() if k != key}, "missing"),
        ({**good, "x.p": good[key]}, "unexpected x.p"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            adapter.load_state_dict(bad)
        assert all(torch.equal(v, before[k]) for k, v in adapter.state_dict().items())
    adapter.load_state_dict(good)
    assert all(torch.equal(v, good[k]) for k, v in adapter.state_dict().items())


# ---- 2. accelerate's save_state / load_state ---------------------------------------------------


def test_accelerate_save_and_load_state_resume_bit_exactly(tmp_path):
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    kind = "sdxl"

    def run(steps: range, resume_from=None, save_at=None):
        accelerator = Accelerator()
        model = tiny_denoiser(kind)
        tlora.register_accelerate_hooks(accelerator, tlora.inject(model, rank=4))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        sched = get_scheduler("linear", optimizer=opt, num_warmup_steps=1, num_training_steps=6)
        model, opt, sched = accelerator.prepare(model, opt, sched)
        if resume_from is not None:
            accelerator.load_state(resume_from)
        for step in steps:
            noise = torch.randn(())  # the RNG state is part of what a resume restores
            opt.zero_grad()
            accelerator.backward(_loss(model, kind, step) * (1 + noise))
            opt.step()
            sched.step()
            if step == save_at:
                accelerator.save_state(tmp_path / "checkpoint-2")
        return _state(tlora.adapter_of(accelerator.unwrap_model(model)))

    torch.manual_seed(0)
    expected = run(range(4))
    torch.manual_seed(0)
    run(range(3), save_at=1)  # saved after two steps, then one more that the resume throws away
    assert (tmp_path / "checkpoint-2" / "tlora_adapter.safetensors").is_file()
    assert not list((tmp_path / "checkpoint-2").glob("model*.safetensors"))  # not the whole UNet
    torch.manual_seed(123)  # whatever the RNG holds now: load_state restores it
    got = run(range(2, 4), resume_from=tmp_path / "checkpoint-2")
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


# ---- 3. an output folder for diffusers' loaders --------------------------------------------------


def test_save_pretrained_folder_loads_in_diffusers_and_in_tlora(tmp_path):
    pipe = tiny_pipeline("sdxl")
    adapter = tlora.inject(pipe.unet, rank=4)
    perturb(adapter, seed=3)
    with pytest.warns(UserWarning, match=r"static LoRA .* r\(t\) are lost"):
        layers = tlora.save_pretrained(pipe.unet, tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["pytorch_lora_weights.safetensors", "tlora_adapter.safetensors"]
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) and not k.startswith("unet.") for k in layers)

    inputs = denoiser_inputs("sdxl", 1)
    with torch.no_grad(), adapter.rank(4):  # full rank: what the static LoRA holds
        expected = pipe.unet(**inputs, timestep=torch.tensor([500.0])).sample

    static = tiny_pipeline("sdxl")
    static.load_lora_weights(tmp_path / "out")  # diffusers picks the static LoRA, not tlora's file
    with torch.no_grad():
        got = static.unet(**inputs, timestep=torch.tensor([500.0])).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    again = tiny_pipeline("sdxl")
    loaded = tlora.load(again.unet, tmp_path / "out")
    assert all(torch.equal(v, adapter.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_diffusers_refuses_a_tlora_file_alone_and_tlora_names_a_folder_without_one(tmp_path):
    pipe = tiny_pipeline("sdxl")
    tlora.inject(pipe.unet, rank=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tlora.save_pretrained(pipe.unet, tmp_path / "out")
    (tmp_path / "out" / "pytorch_lora_weights.safetensors").rename(tmp_path / "static.safetensors")
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):  # never loaded as a LoRA
        tiny_pipeline("sdxl").load_lora_weights(tmp_path / "out")
    (tmp_path / "lora").mkdir()
    (tmp_path / "static.safetensors").rename(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    with pytest.raises(tlora.AdapterFileError, match=r"is a folder without a tlora adapter .*pipe\.load_lora_weights"):
        tlora.load(tiny_denoiser("sdxl"), tmp_path / "lora")


def test_kohya_output_of_the_scripts_reads_the_static_lora(tmp_path):
    # what --output_kohya_format does with the folder's static LoRA, then diffusers reading it back
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    pipe = tiny_pipeline("sdxl")
    perturb(tlora.inject(pipe.unet, rank=4), seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tlora.save_pretrained(pipe.unet, tmp_path)
    kohya = convert_state_dict_to_kohya(
        convert_all_state_dict_to_peft(load_file(tmp_path / "pytorch_lora_weights.safetensors"))
    )
    save_file(kohya, tmp_path / "kohya.safetensors")
    a, b = tiny_pipeline("sdxl"), tiny_pipeline("sdxl")
    a.load_lora_weights(tmp_path / "kohya.safetensors")
    b.load_lora_weights(tmp_path, weight_name="pytorch_lora_weights.safetensors")
    inputs = denoiser_inputs("sdxl", 1)
    with torch.no_grad():
        torch.testing.assert_close(
            a.unet(**inputs, timestep=torch.tensor([10.0])).sample,
            b.unet(**inputs, timestep=torch.tensor([10.0])).sample,
            rtol=1e-5,
            atol=1e-6,
        )


# ---- 4. a peft.LoraConfig as the settings; the families' default targets ------------------------


def _peft_targets(model, config) -> list[str]:
    """The modules PEFT's own add_adapter adapts for `config`."""
    model.add_adapter(config)
    return sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))


@pytest.mark.parametrize(
    "kind,targets",
    [
        ("sdxl", ["to_k", "to_q", "to_v", "to_out.0"]),  # train_dreambooth_lora_sdxl.py's list
        # train_dreambooth_lora_flux.py's default list
        (
            "flux",
            [
                "attn.to_k",
                "attn.to_q",
                "attn.to_v",
                "attn.to_out.0",
                "attn.add_k_proj",
                "attn.add_q_proj",
                "attn.add_v_proj",
                "attn.to_add_out",
                "ff.net.0.proj",
                "ff.net.2",
                "ff_context.net.0.proj",
                "ff_context.net.2",
            ],
        ),
    ],
)
def test_a_lora_config_and_the_family_default_adapt_what_peft_adapts(kind, targets):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=targets)
    expected = _peft_targets(tiny_denoiser(kind), config)
    adapter = tlora.inject(tiny_denoiser(kind), config)
    assert sorted(adapter.layers) == expected
    assert (adapter.config.rank, adapter.config.scale) == (4, 2.0)  # alpha / r, as PEFT scales
    assert sorted(tlora.inject(tiny_denoiser(kind), rank=4).layers) == expected  # the default: the script's
    if kind == "flux":
        assert len(expected) == 15  # one double-stream block (12) and one single-stream block (3)


def test_lora_config_options_tlora_does_not_do_are_named_in_warnings():
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=4, lora_dropout=0.1, use_dora=True, target_modules=["to_q"])
    with pytest.warns(UserWarning) as record:
        adapter = tlora.inject(tiny_denoiser("sdxl"), config)
    text = " ".join(str(w.message) for w in record)
    assert "use_dora=True" in text and "lora_dropout=0.1" in text
    assert all(n.endswith("to_q") for n in adapter.layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scripts' own settings warn about nothing
        tlora.inject(tiny_denoiser("sdxl"), LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian"))
    with pytest.raises(tlora.ConfigError, match="given both"):
        tlora.inject(tiny_denoiser("sdxl"), config, target_modules=["to_k"])
    with pytest.raises(tlora.ConfigError, match="all-linear"):
        tlora.inject(tiny_denoiser("sdxl"), LoraConfig(r=4, target_modules="all-linear"))


# ---- 5. tlora.export ---------------------------------------------------------------------------


def test_tlora_export_is_the_public_export(tmp_path):
    from tlora.files.export import export

    model = tiny_denoiser("sdxl")
    perturb(tlora.inject(model, rank=4), seed=5)
    assert tlora.export is export
    result = tlora.export(model, tmp_path / "k.safetensors", format="kohya", rank=2)
    assert (result.rank, result.lora_rank) == (2, 4) and "r(t)" in result.note
