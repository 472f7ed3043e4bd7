"""Peak memory of a T-LoRA training step on a quantized frozen base, against the float32 base.

The SD-XL-structured small UNet of benches/speed_train.py (`sdxl_like_unet`) is saved once, then each
case runs in a fresh process: load the UNet (float32, or with its Linear layers quantized by
optimum-quanto int8/int4 or torchao int8 weight-only through diffusers' quantization configs, or
by bitsandbytes' own nf4 / LLM.int8 layers, since diffusers' BitsAndBytesConfig asks for a GPU),
inject T-LoRA (rank 16 on the attention projections, float32 factors), then run a few AdamW steps.
Reported per case (MiB): the resident size once torch, diffusers, tlora and the backend are
imported (import_rss), what loading the model and injecting adds (model_rss), the peak resident
memory of the steps (VmHWM, reset after setup via /proc/self/clear_refs) and that peak above the
setup (step_peak: activations, gradients, the optimizer, the backends' temporaries), the bytes the
UNet's Linear weights take with their scales, and ratios against the float32 case of the same run.

    python benches/quantized.py [--latent 64] [--steps 3] [--out bench-results]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import peak_rss_mb, reset_peak, status_mb  # noqa: E402
from speed_common import Cycle, machine_info  # noqa: E402
from speed_train import TARGETS, UNET, sdxl_like_unet, unet_inputs  # noqa: E402

CASES = ("float32", "quanto-int8", "quanto-int4", "torchao-int8", "bnb-nf4", "bnb-int8")


def load_unet(case: str, folder: str):
    from diffusers import UNet2DConditionModel

    if case.startswith("quanto"):
        from diffusers import QuantoConfig

        return UNet2DConditionModel.from_pretrained(
            folder, quantization_config=QuantoConfig(weights_dtype=case.split("-")[1])
        )
    if case == "torchao-int8":
        from diffusers import TorchAoConfig
        from torchao.quantization import Int8WeightOnlyConfig

        return UNet2DConditionModel.from_pretrained(
            folder, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), torch_dtype=torch.float32
        )
    unet = UNet2DConditionModel.from_pretrained(folder)
    if case.startswith("bnb"):
        import bitsandbytes as bnb

        for name, m in list(unet.named_modules()):
            if type(m) is not torch.nn.Linear:
                continue
            if case == "bnb-nf4":
                q = bnb.nn.Linear4bit(
                    m.in_features,
                    m.out_features,
                    bias=m.bias is not None,
                    compute_dtype=torch.float32,
                    quant_type="nf4",
                )
            else:
                q = bnb.nn.Linear8bitLt(
                    m.in_features, m.out_features, bias=m.bias is not None, has_fp16_weights=False, threshold=0.0
                )
            q.load_state_dict(m.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent) if parent else unet, child, q.to("cpu"))
            del m
    return unet


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor stores: a tensor subclass (torchao's) by its inner tensors, whose logical
    dtype is not its storage."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def linear_weight_bytes(unet) -> int:
    """Bytes held by the Linear layers' weights and their quantization scales."""
    total = 0
    for m in unet.modules():
        if isinstance(m, torch.nn.Linear):
            for t in m.state_dict().values():
                if isinstance(t, torch.Tensor):
                    total += tensor_bytes(t)
    return total


def release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so that what a backend
    loaded and freed while quantizing does not count as the model's."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def import_backend(case: str) -> None:
    """Import the case's quantization library first, so that its own resident size is measured
    apart from the model's."""
    import diffusers  # noqa: F401

    import tlora  # noqa: F401

    if case.startswith("quanto"):
        import optimum.quanto  # noqa: F401
    elif case.startswith("torchao"):
        import torchao.quantization  # noqa: F401
    elif case.startswith("bnb"):
        import bitsandbytes  # noqa: F401


def memory_case(case: str, folder: str, latent: int, steps: int) -> dict:
    import tlora

    import_backend(case)
    release_free_heap()
    import_mb = status_mb("VmRSS")
    unet = load_unet(case, folder)
    unet.requires_grad_(False)
    weights = linear_weight_bytes(unet)
    r = UNET["rank"]
    adapter = tlora.inject(unet, rank=r, min_rank=r // 2, target_modules=TARGETS)
    unet.train()
    inputs = unet_inputs(1, latent)
    noise = torch.randn(inputs["sample"].shape, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-4, weight_decay=1e-4)
    cyc = Cycle(1)
    gc.collect()
    release_free_heap()
    setup_mb = status_mb("VmRSS")
    reset = reset_peak()
    losses = []
    for _ in range(steps):
        pred = unet(
            inputs["sample"], cyc.next(), inputs["encoder_hidden_states"], added_cond_kwargs=inputs["added_cond_kwargs"]
        ).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    peak = peak_rss_mb(reset)
    return {
        "case": case,
        "latent": latent,
        "linear_weight_mb": weights / 2**20,
        "import_rss_mb": import_mb,
        "model_rss_mb": setup_mb - import_mb,
        "setup_rss_mb": setup_mb,
        "peak_rss_mb": peak,
        "step_peak_mb": peak - setup_mb,
        "hwm_reset": reset,
        "losses": losses,
    }


def md_table(rows: list[dict]) -> str:
    cols = [
        "case",
        "linear_weight_mb",
        "import_rss_mb",
        "model_rss_mb",
        "setup_rss_mb",
        "peak_rss_mb",
        "step_peak_mb",
        "peak_vs_float32",
        "model_vs_float32",
        "step_vs_float32",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append(
            "| "
            + " | ".join(f"{row[c]:.3g}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in cols)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(memory_case(args.case, args.folder, args.latent, args.steps)))
        return
    env = dict(os.environ)
    here = Path(sys.executable).parent
    if shutil.which("ninja") is None and (here / "ninja").exists():  # quanto builds its int4 CPU unpacker with ninja
        env["PATH"] = f"{here}{os.pathsep}{env.get('PATH', '')}"
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        sdxl_like_unet().save_pretrained(folder)
        for case in args.cases.split(","):
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--case",
                    case,
                    "--folder",
                    folder,
                    "--latent",
                    str(args.latent),
                    "--steps",
                    str(args.steps),
                ],
                capture_output=True,
                text=True,
                env=env,
            )
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{case}: failed ({tail})", flush=True)
                rows.append({"case": case, "error": tail})
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = next((r for r in rows if r["case"] == "float32" and "error" not in r), None)
    if base is not None:
        for row in rows:
            if "error" not in row:
                row["peak_vs_float32"] = row["peak_rss_mb"] / base["peak_rss_mb"]
                row["model_vs_float32"] = row["model_rss_mb"] / base["model_rss_mb"]
                row["step_vs_float32"] = row["step_peak_mb"] / base["step_peak_mb"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"info": machine_info(), "latent": args.latent, "steps": args.steps, "rank": UNET["rank"], "rows": rows}
    (out / "quantized.json").write_text(json.dumps(result, indent=1))
    (out / "quantized.md").write_text(md_table([r for r in rows if "error" not in r]) + "\n")
    print(md_table([r for r in rows if "error" not in r]))


if __name__ == "__main__":
    main()
