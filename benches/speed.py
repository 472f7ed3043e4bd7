"""Speed and memory of tlora against PEFT LoRA, LyCORIS, the paper's equations and the bare model
(not in CI).

    python benches/speed.py [--quick] [--out bench-results] [--only layer,train,sample,memory,scaling]
                            [--layer-batch 2] [--train-rank 16] [--rewrite]

This file is the command: it runs the cases asked for and writes their results. Each case is a
file of its own (its setups, its timing, its table), sharing speed_common.py (timing, reporting):

a. layer (speed_layer.py): one adapted linear layer, forward + backward, SD-XL shapes (tokens 1024
   and 4096 per sample, in/out 640 and 1280, cross-attention in 2048), rank 64 (r_min 32), batch 2
   with per-sample timesteps uniform on [0, 1000): tlora T-LoRA, tlora LoRA, PEFT LoRA at the same
   rank, the paper's equations in plain PyTorch (two full-rank branches times the mask), LyCORIS's
   TLoraModule (default and bypass mode; it takes one mask per batch, so it gets the batch's
   largest rank) and the bare layer. Methods are timed round-robin (one step each per round,
   median of the rounds) with a dense upstream gradient. --layer-batch 1: one timestep.
   benches/kernels.rs (criterion) times the same case on the Rust kernels alone.
b. train (speed_train.py): a training step (forward, epsilon loss, backward, AdamW) of a small UNet
   with SD-XL's block structure (UNet2DConditionModel, text_time embedding, DownBlock2D then two
   cross-attention levels, transformer layers per block scaled down from SD-XL's (1, 2, 10)) at
   64x64 and 128x128 latents (SD-XL's token counts at 512 and 1024 pixels): tlora T-LoRA vs PEFT
   LoRA set up as diffusers' DreamBooth LoRA script does vs the reference implementation's way
   (attention processors adding full-rank branches times the mask, passed through
   cross_attention_kwargs, to q, k, v and out, with a materialised softmax attention) vs the bare
   model (forward + backward to the input). The adapters' rank is scaled with the widths (rank /
   width as rank 64 on SD-XL; --train-rank sets it).
c. sample (speed_sample.py): 25 denoising steps with classifier-free guidance (batch 2) on that
   UNet, per-step time: bare, tlora (fast path: first run folds, second run reuses the cache),
   tlora with the fast path switched off, PEFT LoRA (unmerged).
d. memory (speed_memory.py): peak memory of (b), each case in a fresh subprocess (this command with
   a hidden --memory-case): the peak resident set size of three steps (VmHWM, reset after the
   model is built so that importing torch does not mask it; max RSS from getrusage where the reset
   is unavailable), and CUDA max allocated when on a GPU.
e. scaling (speed_scaling.py): adapter cost (tlora or PEFT minus bare) of one 1280x1280 layer
   against tokens (256..16384, rank 64) and rank (4..128, 4096 tokens), next to its FLOP count, at
   the full rank.

Writes bench-results/speed.json and speed.md (`--rewrite` redoes speed.md from speed.json).
Times are medians (layer, train: interleaved rounds) or the best of the rounds (sample).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import speed_layer
import speed_memory
import speed_sample
import speed_scaling
import speed_train
from speed_common import machine_info

# The cases in the order they run and report: --only names them.
CASES = {
    "layer": speed_layer,
    "train": speed_train,
    "sample": speed_sample,
    "memory": speed_memory,
    "scaling": speed_scaling,
}
UNET = speed_train.UNET


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats (< 3 minutes on 2 cores)")
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--only", default=",".join(CASES), help="comma-separated sections")
    ap.add_argument("--layer-batch", type=int, default=2, help="batch of case a (samples with their own timesteps)")
    ap.add_argument(
        "--train-rank",
        type=int,
        default=UNET["rank"],
        help="adapter rank of cases b and d (default: scaled with the widths as rank 64 on SD-XL)",
    )
    ap.add_argument("--rewrite", action="store_true", help="rewrite speed.md from the speed.json in --out")
    ap.add_argument("--memory-case", help=argparse.SUPPRESS)
    ap.add_argument("--latent", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    UNET["rank"] = args.train_rank
    if args.memory_case:
        print(json.dumps(speed_memory.memory_case(args.memory_case, args.latent)))
        return

    if args.rewrite:
        results = json.loads((Path(args.out) / "speed.json").read_text())
        results["scaling"] = [speed_scaling.with_flops(row) for row in results.get("scaling", [])]
        write_outputs(results, Path(args.out))
        return
    only = set(args.only.split(","))
    latents = [64] if args.quick else [64, 128]
    info = machine_info()
    print(json.dumps(info), flush=True)
    start = time.perf_counter()
    results: dict = {
        "info": info,
        "quick": args.quick,
        "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET.items()},
    }
    if "layer" in only:
        results["layer"] = speed_layer.layer_section(args.quick, args.layer_batch)
    if "train" in only:
        results["train"] = speed_train.train_section(args.quick, latents)
    if "sample" in only:
        results["sample"] = speed_sample.sample_section(args.quick, latents)
    if "memory" in only:
        results["memory"] = speed_memory.memory_section(latents)
    if "scaling" in only:
        results["scaling"] = speed_scaling.scaling_section(args.quick)
    results["seconds"] = time.perf_counter() - start
    write_outputs(results, Path(args.out))


def write_outputs(results: dict, out: Path) -> None:
    """speed.json as measured; speed.md: the machine, then each case's table."""
    info, quick = results["info"], results["quick"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(results, indent=2))
    parts = [f"Machine: {json.dumps(info)}; quick={quick}; {results['seconds']:.0f} s\n"]
    parts += [case.report(results[name]) for name, case in CASES.items() if name in results]
    text = "\n\n".join(parts) + "\n"
    (out / "speed.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
