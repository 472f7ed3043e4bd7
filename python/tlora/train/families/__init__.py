"""The families tlora trains, one recipe per file behind one interface (`base.Family`), and the
registry from diffusers pipeline classes to recipes: `family_of(pipe)`, `SUPPORTED` (pipeline
class -> family name) and `FAMILIES` (family name -> recipe class). A new family is one file here
and one line in RECIPES."""

from __future__ import annotations

from ...errors import InputError
from .auraflow import AuraFlow
from .base import Family, FlowMatching, Noised
from .chroma import Chroma
from .flux import Flux
from .flux2 import Flux2
from .flux_kontext import FluxKontext
from .hidream import HiDream
from .ideogram4 import Ideogram4
from .krea2 import Krea2
from .lumina2 import Lumina2
from .pixart import PixArtSigma
from .qwenimage import QwenImage
from .sana import Sana
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL
from .wan import Wan
from .zimage import ZImage

RECIPES: tuple[type[Family], ...] = (
    StableDiffusion,
    StableDiffusionXL,
    Flux,
    StableDiffusion3,
    Sana,
    Lumina2,
    QwenImage,
    Flux2,
    ZImage,
    Chroma,
    AuraFlow,
    PixArtSigma,
    Wan,
    FluxKontext,
    HiDream,
    Krea2,
    Ideogram4,
)
FAMILIES: dict[str, type[Family]] = {f.name: f for f in RECIPES}
RECIPE_OF: dict[str, type[Family]] = {p: f for f in RECIPES for p in f.pipelines}
SUPPORTED: dict[str, str] = {p: f.name for p, f in RECIPE_OF.items()}
REQUIRED_COMPONENTS: dict[str, tuple[str, ...]] = {p: f.components for p, f in RECIPE_OF.items()}
REFUSED_COMPONENTS: dict[str, dict[str, str]] = {p: f.refused_components for p, f in RECIPE_OF.items()}


def family_of(pipe) -> Family:
    name = type(pipe).__name__
    recipe = RECIPE_OF.get(name)
    if recipe is None:
        raise InputError(f"{name} is not supported: tlora trains {', '.join(SUPPORTED)}")
    return recipe(pipe)


__all__ = ["FAMILIES", "RECIPES", "SUPPORTED", "Family", "FlowMatching", "Noised", "family_of"]
