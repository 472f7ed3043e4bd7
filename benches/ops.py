"""Kernel launches per adapted layer: the ATen ops one training forward + backward of an adapted
projection runs above the bare layer, for tlora and PEFT LoRA at the same rank, counted with
torch.profiler in one process.

An op counts when it does work: a leaf of the profiler's op tree (an op with no ATen op below it)
that is not a view, a shape query or an allocation. Per-layer counts are isolated from per-forward
work (tlora's timestep hook builds the rank mask once per model forward) by counting a stack of two
adapted layers and a stack of one and taking the difference, for the bare model likewise.

    python benches/ops.py            # the table (this machine: CPU)

`tests/test_ops.py` asserts the limits from the same functions.
"""

from __future__ import annotations

import argparse
import collections
import contextlib

import torch
from torch import nn

# Ops that launch no kernel: views, aliasing, metadata, allocation.
NO_WORK = {
    "aten::view",
    "aten::reshape",
    "aten::_unsafe_view",
    "aten::_reshape_alias",
    "aten::narrow",
    "aten::slice",
    "aten::select",
    "aten::t",
    "aten::transpose",
    "aten::as_strided",
    "aten::expand",
    "aten::expand_as",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::permute",
    "aten::detach",
    "aten::alias",
    "aten::lift_fresh",
    "aten::view_as",
    "aten::unflatten",
    "aten::flatten",
    "aten::split",
    "aten::chunk",
    "aten::unbind",
    "aten::contiguous",
    "aten::result_type",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
    "aten::size",
    "aten::stride",
    "aten::is_nonzero",
    "aten::_has_compatible_shallow_copy_type",
    "aten::set_",
    "aten::resize_",
    "aten::numpy_T",
    "aten::matrix_H",
    "aten::_to_copy_noop",
    "aten::to",  # `to` without a copy has no child; with one, its copy_ counts
    "aten::detach_",
    "aten::requires_grad_",
    "aten::_version",
    "aten::output_nr",
    "aten::_nested_tensor_size",
}

IN_F = OUT_F = 320
RANK, MIN_RANK = 64, 32
BATCH, TOKENS = 2, 256


class Stack(nn.Module):
    """`layers` attention-style projections in a row, called like a denoiser (x, timestep)."""

    def __init__(self, layers: int, dtype: torch.dtype):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.to_q = nn.Linear(IN_F, OUT_F)
            with torch.no_grad():
                block.to_q.weight.copy_(torch.randn(OUT_F, IN_F, generator=gen) / IN_F**0.5)
            self.blocks.append(block)
        self.to(dtype)

    def forward(self, x, timestep=None):
        for block in self.blocks:
            x = block.to_q(x)
        return x


def leaf_ops(fn) -> int:
    """Working ATen ops that `fn()` runs (forward and the autograd engine's backward)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(op_names(prof).values())


def _working(ev) -> bool:
    return ev.name.startswith("aten::") and ev.name not in NO_WORK


def _has_working_descendant(ev) -> bool:
    return any(_working(c) or _has_working_descendant(c) for c in ev.cpu_children)


def op_names(prof) -> collections.Counter[str]:
    """The working leaf ops of a profile, by name: working ops with no working op below them."""
    return collections.Counter(ev.name for ev in prof.events() if _working(ev) and not _has_working_descendant(ev))


def build(method: str, layers: int, dtype: torch.dtype, autocast: bool):
    model_dtype = torch.float32 if autocast else dtype
    model = Stack(layers, model_dtype)
    if method == "tlora":
        import tlora

        tlora.inject(model, rank=RANK, min_rank=MIN_RANK, target_modules=["to_q"])
    elif method == "peft":
        from peft import LoraConfig, inject_adapter_in_model

        model = inject_adapter_in_model(
            LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["to_q"], init_lora_weights=False), model
        )
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
            if "lora_" in n:
                p.data = p.data.float()  # as diffusers' training scripts keep LoRA weights (cast_training_params)
    elif method == "bare":
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def step_ops(method: str, layers: int, dtype: torch.dtype, timesteps: list[int], autocast: bool = False) -> int:
    torch.manual_seed(0)
    model = build(method, layers, dtype, autocast)
    x_dtype = torch.float32 if autocast else dtype
    x = torch.randn(BATCH, TOKENS, IN_F, dtype=x_dtype, requires_grad=True)
    t = torch.tensor(timesteps)
    g = torch.randn(BATCH, TOKENS, OUT_F, dtype=torch.bfloat16 if autocast else x_dtype)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def step():
        with ctx:
            out = model(x, timestep=t)
        out.backward(g.to(out.dtype))

    step()  # warm-up: first-call work (operand buffers, caches) is not per step
    return leaf_ops(step)


def per_layer(method: str, dtype: torch.dtype, timesteps: list[int], autocast: bool = False) -> int:
    """Working ops of one adapted layer above the bare layer, per training step."""
    two = step_ops(method, 2, dtype, timesteps, autocast) - step_ops("bare", 2, dtype, timesteps, autocast)
    one = step_ops(method, 1, dtype, timesteps, autocast) - step_ops("bare", 1, dtype, timesteps, autocast)
    return two - one


CASES = [
    ("fp32", torch.float32, False),
    ("fp16", torch.float16, False),
    ("bf16", torch.bfloat16, False),
    ("autocast bf16", torch.float32, True),
]
TIMESTEPS = {"one timestep": [500, 500], "two timesteps": [100, 900]}


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(
        f"ops per adapted {IN_F}->{OUT_F} projection above the bare layer, rank {RANK} (min {MIN_RANK}), "
        f"batch {BATCH} x {TOKENS} tokens, training forward + backward, torch {torch.__version__}"
    )
    print("| dtype | timesteps | PEFT LoRA | tlora | tlora - PEFT |")
    print("|---|---|---|---|---|")
    for name, dtype, autocast in CASES:
        for label, ts in TIMESTEPS.items():
            peft = per_layer("peft", dtype, ts, autocast)
            ours = per_layer("tlora", dtype, ts, autocast)
            print(f"| {name} | {label} | {peft} | {ours} | {ours - peft:+d} |", flush=True)


if __name__ == "__main__":
    main()
