"""`tlora evaluate`: the paper's metrics over a folder of generated images.

- CLIP-I (the paper's IS): cosine between the CLIP image embeddings of a generated image and of the
  reference image(s), averaged over the references.
- CLIP-T (the paper's TS): cosine between the CLIP image embedding and the CLIP text embedding of
  the prompt the image was generated from.
- DINO: cosine between the DINO CLS embeddings (last hidden state, token 0) of a generated image and
  of the reference(s).

The paper measures image similarity "with backgrounds masked". We mask the REFERENCE only: outside
a reference's subject (its mask's white pixels, or in a mask with transparency its opaque ones: the
rule `tlora train --mask` uses, `images.subject_mask`), its pixels are replaced by one constant colour
(`mask_fill`, white by default) before both CLIP-I and DINO see it, so the score compares the
generated image with the subject and not with the training photo's background. Generated images are
used as they are (no masks exist for them).

The models are stock transformers models read from a local folder or a hub id: CLIPModel with its
CLIPProcessor, and AutoModel + AutoImageProcessor for DINO (Dinov2Model, or ViTModel for DINO v1).

Prompts of generated images, first found wins: a manifest given with `prompts=` (JSON object
{file name: prompt}, JSON list of {"file", "prompt"}, or JSONL of such objects); the "prompt" text
chunk `tlora generate` writes into each PNG; a prompt set (`prompt_set=`, tlora.prompt_sets: DreamBooth's
"object" / "live", the T-LoRA paper's "paper-object" / "paper-live") indexed by the "NN-" prefix
`tlora generate` gives its files. `tlora.protocol` generates and scores a whole set in one call.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import InputError, MissingFileError
from .files.atomic import write_atomic
from .images import IMAGE_SUFFIXES, _open, check_input_file, subject_mask, to_rgb
from .prompt_sets import PROMPT_SETS

CLIP_TYPES = ("clip",)
DINO_TYPES = ("dinov2", "dinov2_with_registers", "vit")
SKIPPED_FILES = ("grid.png",)  # the overview `tlora generate` writes next to the samples
METRICS = ("clip_i", "clip_t", "dino")


def prompt_templates(name: str) -> list[str]:
    """The prompts of set `name` (tlora.prompt_sets: "object", "live", "paper-object", "paper-live"),
    with {} for the concept, in file order (NN-*.png has prompt NN)."""
    if name not in PROMPT_SETS:
        raise InputError(f"unknown prompt set {name!r}: use one of {sorted(PROMPT_SETS)}", field="prompt_set")
    return PROMPT_SETS[name].templates


# ---- models -----------------------------------------------------------------------------------


def _model_type(source: str, field: str, wanted: tuple[str, ...], example: str) -> str:
    """`source` as transformers reads it (a local folder or a hub id), refusing one that is not a
    `wanted` model_type before loading weights; `field`: the setting it came from, clip or dino."""
    from transformers import AutoConfig

    path = Path(source).expanduser()
    looks_local = path.exists() or source.startswith(("/", ".", "~")) or source.count("/") > 1
    if looks_local and not path.is_dir():
        raise MissingFileError(
            f"{field} {source}: no such model folder (give a local transformers folder or a hub id such as {example})",
            field=field,
        )
    if looks_local and not (path / "config.json").is_file():
        raise InputError(
            f"{field} {source} has no config.json: it is not a transformers model folder "
            f"(save one with model.save_pretrained(folder), e.g. of {example})",
            field=field,
        )
    try:
        kind = AutoConfig.from_pretrained(str(path) if looks_local else source).model_type
    except (OSError, ValueError) as e:
        if looks_local:
            raise InputError(
                f"{field} {source}: its config.json is not a transformers model's ({e}); give a "
                f"folder like {example} saved with save_pretrained",
                field=field,
            ) from None
        raise InputError(
            f"{field} {source}: no such local folder, and reading it as a hub id failed ({e}); "
            "give a local folder where the hub is unreachable",
            field=field,
        ) from None
    if kind not in wanted:
        raise InputError(
            f"{field} {source} holds a {kind!r} model (config.json model_type), not "
            f"{' / '.join(repr(w) for w in wanted)}: give a model like {example}",
            field=field,
        )
    return str(path) if looks_local else source


@dataclass
class Encoders:
    """The loaded models; either may be missing (its metrics are then not computed)."""

    clip: object | None = None
    clip_processor: object | None = None
    dino: object | None = None
    dino_processor: object | None = None
    device: str = "cpu"

    @classmethod
    def load(cls, clip: str | None = None, dino: str | None = None, device: str | None = None) -> Encoders:
        """`device`: as train's and generate's --device (`pipelines.resolve_device`), default the CPU."""
        from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

        from .pipelines import resolve_device

        if not clip and not dino:
            raise InputError("no model given: pass clip (CLIP-I, CLIP-T) and/or dino (DINO)", field=("clip", "dino"))
        enc = cls(device=str(resolve_device(device or "cpu")))
        # Check both kinds before loading either: a swapped pair fails at once.
        clip_src = _model_type(clip, "clip", CLIP_TYPES, "openai/clip-vit-base-patch32") if clip else None
        dino_src = (
            _model_type(dino, "dino", DINO_TYPES, "facebook/dinov2-small or facebook/dino-vits16") if dino else None
        )
        if clip_src:
            try:
                enc.clip_processor = CLIPProcessor.from_pretrained(clip_src)
            except (OSError, ValueError, TypeError) as e:
                raise InputError(
                    f"clip {clip}: cannot load its CLIPProcessor ({e}); the folder needs the "
                    "image processor and tokenizer files (processor.save_pretrained(folder))",
                    field="clip",
                ) from None
            enc.clip = _load_weights(CLIPModel, clip_src, "clip", clip, enc.device)
        if dino_src:
            try:
                enc.dino_processor = AutoImageProcessor.from_pretrained(dino_src)
            except (OSError, ValueError, TypeError) as e:
                raise InputError(
                    f"dino {dino}: cannot load its image processor ({e}); the folder needs "
                    "preprocessor_config.json (image_processor.save_pretrained(folder))",
                    field="dino",
                ) from None
            enc.dino = _load_weights(AutoModel, dino_src, "dino", dino, enc.device)
        return enc

    @torch.no_grad()
    def clip_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        px = self.clip_processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        return _pooled(self.clip.get_image_features(pixel_values=px)).double().cpu()

    @torch.no_grad()
    def clip_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tok = self.clip_processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        out = self.clip.get_text_features(
            input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
        )
        return _pooled(out).double().cpu()

    @torch.no_grad()
    def dino_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        px = self.dino_processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        return self.dino(pixel_values=px).last_hidden_state[:, 0].double().cpu()


# Weights a scorer may lack without changing a score: the pooler head, which the metrics do not use
# (DINO v1 checkpoints ship without it; the score is the last hidden state's CLS token).
UNUSED_WEIGHTS = ("pooler.",)


def _load_weights(model_class, source: str, field: str, given: str, device: str):
    """`model_class.from_pretrained(source)` on `device`, in eval mode, refusing (InputError about
    setting `field`) weights that do not load, that do not fit the folder's config.json (a tensor of another
    shape, or one missing: transformers would initialise it at random), or that are not finite."""
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    # transformers logs a load report table for mismatched or missing weights; the refusal below
    # says what it would, in one line.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = model_class.from_pretrained(source, output_loading_info=True, ignore_mismatched_sizes=True)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputError(
            f"{field} {given}: its weights cannot be loaded ({type(e).__name__}: {first}); the model file is "
            "truncated or corrupted: re-save (model.save_pretrained) or re-download it",
            field=field,
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key, in_file, in_config = mismatched[0]
        raise InputError(
            f"{field} {given}: its weights do not fit its config.json ({len(mismatched)} tensor(s) of another "
            f"shape, e.g. {key}: {tuple(in_file)} in the weights, {tuple(in_config)} by the config): give the "
            "config.json saved with these weights",
            field=field,
        )
    missing = sorted(k for k in info.get("missing_keys") or [] if not k.startswith(UNUSED_WEIGHTS))
    if missing:
        raise InputError(
            f"{field} {given}: its weights lack {len(missing)} tensor(s) that its config.json needs (e.g. "
            f"{missing[0]}), which would be random: give the config.json saved with these weights",
            field=field,
        )
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise InputError(
                f"{field} {given}: weight {name} holds non-finite values (NaN or infinity): the model file "
                "is corrupted; re-save or re-download it",
                field=field,
            )
    return model.eval().to(device)


def _pooled(out) -> torch.Tensor:
    """get_*_features returns the projected embedding (transformers 4) or an output whose
    pooler_output is that embedding (transformers 5)."""
    return out if torch.is_tensor(out) else out.pooler_output


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, d) x (m, d) -> (n, m) cosine similarities in float64."""
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    return a @ b.T


# ---- inputs -----------------------------------------------------------------------------------


def masked_reference(image: Image.Image, mask: Image.Image, fill=(255, 255, 255), where: str = "") -> Image.Image:
    """The reference with its background (outside `images.subject_mask`) replaced by the constant colour `fill`."""
    image = to_rgb(image)
    if mask.size != image.size:
        raise InputError(
            f"mask {where} is {mask.width}x{mask.height} but its reference image is "
            f"{image.width}x{image.height}: give a mask of the same size"
        )
    subject = subject_mask(mask, where)
    out = np.asarray(image).copy()
    out[~subject] = np.asarray(fill, dtype=np.uint8)
    return Image.fromarray(out)


def _generated_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.exists():
        raise MissingFileError(f"generated-image folder {folder} does not exist")
    if not folder.is_dir():
        raise InputError(
            f"generated-image folder {folder} is a file, not a folder: give the folder of generated images "
            "(as `tlora generate --out` writes it)"
        )
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.name not in SKIPPED_FILES
    )
    if not files:
        raise InputError(
            f"generated-image folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}; "
            f"{', '.join(SKIPPED_FILES)} is skipped)"
        )
    return files


def _read_manifest(path: str | Path) -> dict[str, str]:
    path = check_input_file(path, "prompt manifest", kind="a JSON or JSONL file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"prompt manifest {path} is not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x}): "
            "give a JSON or JSONL file"
        ) from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise InputError(f"prompt manifest {path} is nested too deeply to be a manifest") from None
    except json.JSONDecodeError:
        data = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except (json.JSONDecodeError, RecursionError) as e:
                raise InputError(f"prompt manifest {path} is neither JSON nor JSONL (line {n}: {e})") from None
    if isinstance(data, dict):
        items = list(data.items())
    elif isinstance(data, list) and all(isinstance(d, dict) and {"file", "prompt"} <= d.keys() for d in data):
        items = [(d["file"], d["prompt"]) for d in data]
    else:
        raise InputError(
            f"prompt manifest {path}: expected a JSON object {{file: prompt}} or a list / JSONL "
            'of {"file": ..., "prompt": ...} objects'
        )
    if not all(isinstance(f, str) and isinstance(p, str) for f, p in items):
        raise InputError(f"prompt manifest {path}: file names and prompts must be strings")
    return {Path(f).name: p for f, p in items}


def _prompts_for(
    files: list[Path],
    images: list[Image.Image],
    manifest: str | Path | None,
    prompt_set: str | None,
    concept: str | None,
) -> list[str | None]:
    table = _read_manifest(manifest) if manifest else {}
    if table:
        unknown = sorted(set(table) - {f.name for f in files})
        if unknown:
            raise InputError(
                f"prompt manifest {manifest} names {len(unknown)} file(s) not in the folder "
                f"(e.g. {unknown[0]}): its entries and the generated images do not match"
            )
    templates = prompt_templates(prompt_set) if prompt_set else None
    if templates and not concept:
        raise InputError(
            "prompt_set needs concept, the words that replace {} (e.g. 'dog' or 'sks dog')",
            field=("concept", "prompt_set"),
        )
    prompts = []
    for f, img in zip(files, images):
        prompt = table.get(f.name) or img.info.get("prompt")
        if prompt is None and templates:
            m = re.match(r"(\d+)-", f.name)
            if not m or int(m.group(1)) >= len(templates):
                raise InputError(
                    f"prompt_set {prompt_set!r} needs files named NN-*.png with NN the prompt's index "
                    f"0..{len(templates) - 1}, as `tlora generate` names them; {f.name} is not",
                    field="prompt_set",
                )
            prompt = templates[int(m.group(1))].replace("{}", concept)
        prompts.append(prompt)
    return prompts


# ---- the evaluation ---------------------------------------------------------------------------


def evaluate(
    generated: str | Path,
    references: Sequence[str | Path],
    clip: str | None = None,
    dino: str | None = None,
    masks: Sequence[str | Path] | None = None,
    prompts: str | Path | None = None,
    prompt_set: str | None = None,
    concept: str | None = None,
    drop_words: Sequence[str] = (),
    mask_fill: tuple[int, int, int] = (255, 255, 255),
    device: str | None = None,
    batch_size: int = 16,
    encoders: Encoders | None = None,
) -> dict:
    """Score every generated image against the references (and its prompt); returns the report
    dict that `write_report` saves. `drop_words` are removed from prompts before CLIP-T (e.g. the
    rare token "sks", which CLIP's text encoder does not know). A bad input is an InputError (or
    MissingFileError) naming the setting (`fields`: see tlora.errors)."""
    refs = reference_images(references, masks, mask_fill)
    files = _generated_files(generated)
    images = [_open(f, "generated image") for f in files]  # keep .info (PNG text) for the prompts
    texts = _prompts_for(files, images, prompts, prompt_set, concept)
    images = [to_rgb(i) for i in images]
    enc = encoders or Encoders.load(clip, dino, device)
    if enc.clip is not None and any(t is None for t in texts):
        missing = [f.name for f, t in zip(files, texts) if t is None]
        raise InputError(
            f"no prompt for {len(missing)} generated image(s) (e.g. {missing[0]}), needed for CLIP-T: "
            "give prompts (a manifest), or prompt_set with concept, or images written by "
            "`tlora generate` (their PNGs carry the prompt)",
            field=("prompts", "prompt_set", "concept"),
        )
    scores = _scores(enc, images, refs, texts, drop_words, batch_size)
    for key, values in scores.items():
        bad = [f.name for f, v in zip(files, values) if not math.isfinite(v)]
        if bad:
            field = "dino" if key == "dino" else "clip"
            raise InputError(
                f"{NAMES[key]} is not finite for {len(bad)} image(s) (e.g. {bad[0]}): the {field} model gives "
                "zero or non-finite embeddings for them; check the model's weights",
                field=field,
            )
    return _report(files, texts, scores, clip, dino, references, masks, mask_fill, drop_words)


def reference_images(
    references: Sequence[str | Path], masks: Sequence[str | Path] | None, mask_fill: tuple[int, int, int]
) -> list[Image.Image]:
    """The reference images in RGB, each with its background filled (`masked_reference`) when masks are given."""
    if not references:
        raise InputError("no reference image: give references, one path or more", field="references")
    if masks and len(masks) != len(references):
        raise InputError(
            f"{len(masks)} mask(s) for {len(references)} reference image(s): give one mask per reference "
            "image, masks and references in the same order",
            field=("masks", "references"),
        )
    refs = [to_rgb(_open(r, "reference image")) for r in references]
    if masks:
        refs = [masked_reference(img, _open(m, "mask"), mask_fill, str(m)) for img, m in zip(refs, masks)]
    return refs


def _scores(
    enc: Encoders,
    images: list[Image.Image],
    refs: list[Image.Image],
    texts: list[str | None],
    drop_words: Sequence[str],
    batch_size: int,
) -> dict[str, list[float]]:
    """Metric -> one score per generated image, for the metrics `enc`'s models give."""

    def batched(fn, items):
        return torch.cat([fn(items[i : i + batch_size]) for i in range(0, len(items), batch_size)])

    scores: dict[str, list[float]] = {}
    if enc.clip is not None:
        gen = batched(enc.clip_images, images)
        scores["clip_i"] = _cosine(gen, enc.clip_images(refs)).mean(1).tolist()
        shown = [_drop(t, drop_words) for t in texts]
        txt = batched(enc.clip_texts, shown)
        scores["clip_t"] = (_cosine(gen, txt).diagonal()).tolist()
    if enc.dino is not None:
        scores["dino"] = _cosine(batched(enc.dino_images, images), enc.dino_images(refs)).mean(1).tolist()
    return scores


def _report(files, texts, scores, clip, dino, references, masks, mask_fill, drop_words) -> dict:
    """The report `evaluate` returns: its inputs, then the scores overall, per prompt and per image."""
    per_image = [
        {"file": f.name, "prompt": t, **{k: v[i] for k, v in scores.items()}}
        for i, (f, t) in enumerate(zip(files, texts))
    ]
    groups: dict[str | None, list[dict]] = {}
    for row in per_image:
        groups.setdefault(row["prompt"], []).append(row)
    per_prompt = [
        {"prompt": p, "images": len(rows), **{k: float(np.mean([r[k] for r in rows])) for k in scores}}
        for p, rows in groups.items()
    ]
    return {
        "models": {"clip": clip, "dino": dino},
        "references": [str(r) for r in references],
        "masks": [str(m) for m in masks] if masks else None,
        "mask_fill": list(mask_fill) if masks else None,
        "drop_words": list(drop_words),
        "metrics": list(scores),
        "overall": {"images": len(per_image), **{k: float(np.mean(v)) for k, v in scores.items()}},
        "per_prompt": per_prompt,
        "per_image": per_image,
    }


def _drop(text: str, words: Sequence[str]) -> str:
    for w in words:
        text = re.sub(rf"\s*\b{re.escape(w)}\b", "", text)
    return text.strip()


NAMES = {"clip_i": "CLIP-I", "clip_t": "CLIP-T", "dino": "DINO"}


def markdown(report: dict) -> str:
    keys = report["metrics"]
    head = "| prompt | images | " + " | ".join(NAMES[k] for k in keys) + " |"
    lines = [head, "|---" * (len(keys) + 2) + "|"]
    fmt = lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"  # noqa: E731
    for row in report["per_prompt"]:
        prompt = (row["prompt"] or "(no prompt)").replace("|", "\\|")
        lines.append(f"| {prompt} | {row['images']} | " + " | ".join(fmt(row[k]) for k in keys) + " |")
    o = report["overall"]
    lines.append(f"| **mean over all images** | {o['images']} | " + " | ".join(f"**{fmt(o[k])}**" for k in keys) + " |")
    note = (
        "CLIP-I and DINO: mean cosine to the reference image(s)"
        + (f", reference background filled with RGB {tuple(report['mask_fill'])}" if report["masks"] else "")
        + "; CLIP-T: cosine to the prompt"
        + (f" without {report['drop_words']}" if report["drop_words"] else "")
        + "."
    )
    return "\n".join(lines) + "\n\n" + note + "\n"


def write_report(report: dict, out: str | Path) -> tuple[Path, Path]:
    """evaluation.json and evaluation.md in `out`, each written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    # allow_nan=False: NaN is not JSON (evaluate refuses non-finite scores before this).
    as_json = json.dumps(report, indent=1, allow_nan=False)
    for name, text in (("evaluation.json", as_json), ("evaluation.md", markdown(report))):
        paths.append(write_atomic(out / name, text))
    return paths[0], paths[1]


def parse_colour(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    try:
        rgb = tuple(int(p) for p in parts)
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise InputError(f"mask_fill {text!r}: give R,G,B with each 0..255, e.g. 255,255,255", field="mask_fill")
    return rgb  # type: ignore[return-value]
