"""The prompts `tlora train` trains on: `--instance-prompt` (placeholders {token} and {class}; the
paper's "a photo of {token} {class}" by default), a caption per image of `--image-dir` from
NAME.txt beside NAME.png (the same placeholders), and the class prompt of the prior images."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ConfigError, InputError

INSTANCE_PROMPT = "a photo of {token} {class}"
CLASS_PROMPT = "a photo of {class}"
PLACEHOLDERS = ("{token}", "{class}")
MAX_CAPTION_BYTES = 10_000


def check_template(name: str, text: str) -> None:
    """Refuse braces other than the placeholders (a typo such as {tokn} would be trained on literally)."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{name} must be a non-empty string, got {text!r}", field=name)
    rest = text
    for p in PLACEHOLDERS:
        rest = rest.replace(p, "")
    stray = re.search(r"\{[^{}]*\}?|\}", rest)
    if stray:
        raise ConfigError(
            f"{name} {text!r} has {stray.group(0)!r}: the placeholders are {{token}} and {{class}}", field=name
        )


def fill(template: str, token: str, class_name: str) -> str:
    return template.replace("{token}", token).replace("{class}", class_name)


def image_caption(image: Path, cfg) -> str:
    """The caption of `image`: NAME.txt beside it (placeholders filled), else the instance prompt."""
    path = Path(image).with_suffix(".txt")
    if not path.exists():
        return cfg.prompt
    try:
        data = path.read_bytes()[: MAX_CAPTION_BYTES + 1]
        text = data.decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"caption {path} is unreadable ({type(e).__name__}): write it as UTF-8 text") from None
    if len(data) > MAX_CAPTION_BYTES or not text:
        raise InputError(
            f"caption {path} is {'empty' if not text else 'longer than 10 kB'}: one line of text describing "
            "the image, or delete it to use --instance-prompt"
        )
    try:
        check_template("caption", text)
    except ConfigError as e:
        raise InputError(f"{path}: {e}") from None
    return fill(text, cfg.token, cfg.class_name)
