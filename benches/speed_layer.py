"""Speed case a, layer: one adapted linear layer, forward + backward, SD-XL shapes, rank 64 (r_min 32)
(see benches/speed.py).
"""

from __future__ import annotations

import json
import statistics

import torch
from speed_common import Cycle, Holder, T, interleaved, md_table
from torch import nn

import tlora


def reference_layer(lin: nn.Linear, r: int, r_min: int):
    """The paper's formula as plain PyTorch: full-rank trainable and frozen branches times a mask."""
    out_f, in_f = lin.weight.shape
    p = nn.Parameter(torch.randn(out_f, r) * 0.01)
    lam = nn.Parameter(torch.ones(r))
    q = nn.Parameter(torch.randn(r, in_f) * 0.01)
    p0, lam0, q0 = p.detach().clone(), lam.detach().clone(), q.detach().clone()

    def forward(x, t):
        ranks = tlora.rank_schedule(t, r, r_min)
        m = (torch.arange(r)[None, :] < ranks[:, None]).float()[:, None, :]
        y = lin(x)
        y = y + ((x @ q.T) * lam * m) @ p.T - ((x @ q0.T) * lam0 * m) @ p0.T
        return y

    return forward, [p, lam, q]


def lycoris_layer(lin: nn.Linear, r: int, r_min: int, bypass: bool):
    from lycoris.modules.tlora import TLoraModule, compute_timestep_mask, set_timestep_mask

    module = TLoraModule(
        "lora_unet_to_q", lin, lora_dim=r, alpha=r, sig_type="last", use_data_init=False, bypass_mode=bypass
    )
    module.apply_to()
    params = [p for p in module.parameters() if p.requires_grad]
    masks = {}

    def forward(x, t):
        tmin = int(t.min())  # one mask per batch: the batch's largest rank
        if tmin not in masks:
            masks[tmin] = compute_timestep_mask(tmin, T, r, r_min)
        set_timestep_mask(masks[tmin])
        return lin(x)

    return forward, params


def bench_layer(tokens: int, in_f: int, out_f: int, r: int, repeats: int, lycoris: bool, batch: int = 2) -> dict:
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    x = torch.randn(batch, tokens, in_f)
    # A dense upstream gradient, as a layer inside a network gets (the gradient of a plain .sum()
    # is an expanded stride-0 tensor that every product would first have to copy).
    gout = torch.randn(batch, tokens, out_f)
    steps = {}

    def add(name, fn, params):
        """One forward + backward of `fn` per call."""
        cyc = Cycle(batch)

        def step():
            xi = x.clone().requires_grad_(True)
            fn(xi, cyc.next()).backward(gout)
            for p in params:
                p.grad = None

        steps[name] = step

    def linear():
        return nn.Linear(in_f, out_f).requires_grad_(False)

    base = linear()
    add("bare", lambda xi, t: base(xi), [])
    for variant in ("tlora", "lora"):
        m = Holder(linear())
        ad = tlora.inject(m, rank=r, variant="lora" if variant == "lora" else "tlora")
        with torch.no_grad():
            for p in ad.parameters():
                p.add_(0.01 * torch.randn_like(p))
        add(f"tlora-{variant}", lambda xi, t, m=m: m(xi, t), list(ad.parameters()))
    pm = inject_adapter_in_model(
        LoraConfig(r=r, lora_alpha=r, target_modules=["to_q"], init_lora_weights="gaussian"), Holder(linear())
    )
    add("peft-lora", lambda xi, t: pm(xi, t), [p for p in pm.parameters() if p.requires_grad])
    ref, ref_params = reference_layer(linear(), r, r // 2)
    add("reference", ref, ref_params)
    if lycoris:
        for bypass in (False, True):
            fn, params = lycoris_layer(linear(), r, r // 2, bypass)
            add("lycoris-bypass" if bypass else "lycoris", fn, params)
    # Round-robin, so that drifts of the machine hit every method alike; the median of the rounds.
    times = interleaved(steps, repeats, warmup=2)
    if lycoris:
        from lycoris.modules.tlora import clear_timestep_mask

        clear_timestep_mask()
    return {k: statistics.median(v) for k, v in times.items()}


def layer_section(quick: bool, batch: int = 2) -> list[dict]:
    repeats = 5 if quick else 15
    shapes = (
        [(1024, 640, 640), (1024, 2048, 1280)]
        if quick
        else [(t, i, o) for t in (1024, 4096) for i, o in ((640, 640), (1280, 1280), (2048, 640), (2048, 1280))]
    )
    rows = []
    for tokens, in_f, out_f in shapes:
        res = bench_layer(tokens, in_f, out_f, 64, repeats, lycoris=True, batch=batch)
        bare = res["bare"]
        row = {
            "batch": batch,
            "tokens": tokens,
            "in": in_f,
            "out": out_f,
            "rank": 64,
            **{k: v * 1e3 for k, v in res.items()},
            "overhead_vs_reference": (res["tlora-tlora"] - bare) / (res["reference"] - bare),
            "tlora_vs_peft": res["tlora-tlora"] / res["peft-lora"],
            "tlora_vs_bare": res["tlora-tlora"] / bare,
        }
        rows.append(row)
        print("layer", json.dumps(row), flush=True)
    return rows


def report(rows: list[dict]) -> str:
    return "### a. One layer, forward + backward, ms (median); per-sample timesteps\n\n" + md_table(
        rows,
        [
            "batch",
            "tokens",
            "in",
            "out",
            "bare",
            "tlora-tlora",
            "tlora-lora",
            "peft-lora",
            "reference",
            "lycoris",
            "lycoris-bypass",
            "overhead_vs_reference",
            "tlora_vs_peft",
            "tlora_vs_bare",
        ],
    )
