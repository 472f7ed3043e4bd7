"""`tlora.generate(...)` and the `tlora generate` command: sample a stock diffusers pipeline with
an adapter injected, write PNGs and one grid."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from .config import check_float, check_int
from .errors import AdapterFileError, ConfigError, about
from .files.atomic import save_image
from .files.io import load, read
from .images import grid
from .options import MAX_GUIDANCE, MAX_IMAGES, MAX_SAMPLE_STEPS, MAX_SEED, SCHEDULERS
from .pipelines import check_dtype, check_side, load_pipeline, resolve_device
from .train.families import Family, family_of


def fill(prompt: str, concept: str) -> str:
    if "{}" not in prompt:
        raise ConfigError(f"prompt {prompt!r} has no {{}} where the concept ({concept!r}) goes")
    return prompt.replace("{}", concept)


def sample_images(
    pipe,
    texts: Sequence[str],
    n: int = 1,
    steps: int = 25,
    guidance: float = 5.0,
    seed: int = 0,
    size: tuple[int, int] | None = None,
    desc: str = "sample",
    negative_prompt: str | None = None,
    family: Family | None = None,
) -> list[list[Image.Image]]:
    """n images for each finished prompt (no {} left), seeded per prompt so that methods compare
    on the same noise; `family`: the pipeline's recipe, which calls it (its own arguments, its
    output's images), else a plain text-to-image call."""
    rows = []
    for i, text in enumerate(tqdm(texts, desc=desc, leave=False)):
        kwargs = dict(
            num_inference_steps=steps,
            guidance_scale=guidance,
            num_images_per_prompt=n,
            generator=torch.Generator().manual_seed(seed + i),
        )
        if size:
            kwargs.update(height=size[0], width=size[1])
        if negative_prompt:
            kwargs["negative_prompt"] = negative_prompt
        if family is not None:
            rows.append(family.sample(pipe, text, kwargs))
        else:
            rows.append(pipe(prompt=text, **kwargs).images)
    return rows


def sample_grid(
    pipe,
    prompts: Sequence[str],
    concept: str,
    out: Path,
    n: int = 1,
    steps: int = 25,
    guidance: float = 5.0,
    seed: int = 0,
    size: tuple[int, int] | None = None,
    label: str = "",
    negative_prompt: str | None = None,
    family: Family | None = None,
) -> Path:
    """Render n images per prompt ({} -> concept) into `out` as PNGs (each carries its prompt as a PNG
    text chunk, which `tlora evaluate` reads); returns the grid's path: one row per prompt, columns
    labelled `label` (method, rank, step) and the sample number."""
    from PIL.PngImagePlugin import PngInfo

    out.mkdir(parents=True, exist_ok=True)
    texts = [fill(p, concept) for p in prompts]
    rows = sample_images(pipe, texts, n, steps, guidance, seed, size, negative_prompt=negative_prompt, family=family)
    for i, row in enumerate(rows):
        info = PngInfo()
        info.add_text("prompt", texts[i])
        for j, img in enumerate(row):
            save_image(img, out / f"{i:02d}-{j}.png", pnginfo=info)
    path = out / "grid.png"
    heads = [f"{label}\nsample {j + 1}" if label else f"sample {j + 1}" for j in range(n)]
    save_image(grid([img for row in rows for img in row], cols=n, col_labels=heads, row_labels=texts), path)
    return path


def generate(
    model: str,
    adapter: str,
    prompts: Sequence[str],
    out: str,
    n: int = 4,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    device: str | None = None,
    dtype: str = "fp32",
    negative_prompt: str | None = None,
    scheduler: str | None = None,
    adapter_scale: float = 1.0,
) -> Path:
    """Sample `n` images per prompt with the adapter; `{}` in a prompt becomes 'token class' from the
    adapter's metadata. Returns the grid's path.

    `device`: "auto" / None (CUDA when available, else the CPU), "cpu", "cuda", "cuda:N";
    `dtype`: the pipeline's weights, "fp32", "fp16" (GPU only) or "bf16" (the adapter stays float32).
    `negative_prompt`: what classifier-free guidance steers away from; `scheduler`: a sampler of
    options.SCHEDULERS in place of the model's (one its pipeline takes); `adapter_scale`: the
    update's strength (0: the base model, 1: as trained).
    A bad setting is a ConfigError or InputError naming it (`fields`: see tlora.errors)."""
    _check_settings(n, steps, guidance, seed, height, width)
    _, meta = read(adapter)
    concept = adapter_concept(adapter, meta)
    for p in prompts:
        fill(p, concept)  # fail early, before loading the model
    s = prepare(model, adapter, steps, guidance, height, width, device, dtype, scheduler, adapter_scale, meta)
    return s.grid(prompts, Path(out), n=n, seed=seed, negative_prompt=negative_prompt)


def adapter_concept(adapter: str, meta: dict | None = None) -> str:
    """'token class' from the adapter file's metadata (`meta`: the file's, when already read), what
    {} in a prompt becomes."""
    if meta is None:
        _, meta = read(adapter)
    extra = meta["config"].get("extra", {})
    if "token" not in extra:
        raise ConfigError(f"{adapter} has no concept token in its metadata; write the concept into the prompt yourself")
    if not all(isinstance(extra.get(k), str) and extra[k].strip() for k in ("token", "class_name")):
        raise AdapterFileError(adapter, "token and class_name must be non-empty strings", field="config.extra")
    return f"{extra['token']} {extra['class_name']}"


@dataclass
class Sampler:
    """A stock pipeline with the adapter loaded and the sampling settings resolved (the family's
    defaults where none was given): `grid` renders prompts with it, as often as needed."""

    pipe: object
    family: Family
    concept: str
    steps: int
    guidance: float
    size: tuple[int, int] | None
    label: str

    def grid(self, prompts, out: Path, n: int = 1, seed: int = 0, negative_prompt: str | None = None) -> Path:
        return sample_grid(
            self.pipe,
            prompts,
            self.concept,
            out,
            n=n,
            steps=self.steps,
            guidance=self.guidance,
            seed=seed,
            size=self.size,
            label=self.label,
            negative_prompt=negative_prompt,
            family=self.family,
        )


def prepare(
    model: str,
    adapter: str,
    steps: int | None = None,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    device: str | None = None,
    dtype: str = "fp32",
    scheduler: str | None = None,
    adapter_scale: float = 1.0,
    meta: dict | None = None,
) -> Sampler:
    """Load the pipeline once, the adapter into its denoiser (settings as in `generate`; `meta`:
    the adapter file's metadata when the caller has read it already)."""
    _check_settings(1, steps, guidance, 0, height, width)
    with about("adapter_scale"):
        check_float("adapter_scale", adapter_scale, 0.0, 10.0)
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ConfigError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}", field="scheduler")
    dev = resolve_device(device)
    weight_dtype = check_dtype(dtype, dev)
    if meta is None:
        _, meta = read(adapter)
    concept = adapter_concept(adapter, meta)
    pipe = load_pipeline(model, dtype=weight_dtype).to(dev)
    fam = family_of(pipe)
    if scheduler is not None:
        pipe.scheduler = _scheduler(pipe, scheduler)
    loaded = load(fam.denoiser, adapter)
    if adapter_scale != 1.0:
        _scale_update(loaded, adapter_scale)
    side = fam.default_resolution()
    size = (height or side, width or side) if (height or width) else None
    c = meta["config"]
    return Sampler(
        pipe,
        fam,
        concept,
        steps=steps or fam.default_steps,
        guidance=fam.default_guidance if guidance is None else guidance,
        size=size,
        label=f"{c.get('variant', 'adapter')} rank {c.get('rank', '?')}",
    )


def _scheduler(pipe, name: str):
    """Sampler `name` (options.SCHEDULERS) built from the model's scheduler config; one the
    pipeline's own scheduler does not list as compatible (an epsilon sampler for FLUX) is refused."""
    import diffusers

    cls_name, kwargs = SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    if cls not in pipe.scheduler.compatibles and cls is not type(pipe.scheduler):
        raise ConfigError(
            f"scheduler {name} does not fit {type(pipe).__name__} (its scheduler is "
            f"{type(pipe.scheduler).__name__}): choose another --scheduler",
            field="scheduler",
        )
    return cls.from_config(pipe.scheduler.config, **kwargs)


def _scale_update(adapter, s: float) -> None:
    """The update times s, exactly: tlora's lambda and its frozen copy (P L Q - P0 L0 Q0 is linear
    in both), the LoRA variants' up factor."""
    with torch.no_grad():
        for name, t in adapter.state_dict().items():
            if name.endswith((".lam", ".lam0", ".up")):
                t.mul_(s)


def _check_settings(
    n: int, steps: int | None, guidance: float | None, seed: int, height: int | None, width: int | None
) -> None:
    """`generate`'s numbers in range, each refusal a ConfigError about its setting."""
    with about("n"):
        check_int("n", n, 1, MAX_IMAGES)
    if steps is not None:
        with about("steps"):
            check_int("steps", steps, 1, MAX_SAMPLE_STEPS)
    if guidance is not None:
        with about("guidance"):
            check_float("guidance", guidance, 0.0, MAX_GUIDANCE)
    with about("seed"):
        check_int("seed", seed, 0, MAX_SEED)
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            check_side(name, value)
