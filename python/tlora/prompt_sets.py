"""Evaluation prompt sets, plain data ({} is where "token class" goes, e.g. "sks dog").

- "object" / "live": DreamBooth's 25 context prompts (Ruiz et al. 2023) for objects and for live
  subjects (pets); DreamBooth sampled 4 images per prompt.
- "paper-object" / "paper-live": the T-LoRA paper's protocol (arXiv 2507.05964, section 4 and
  Appendix A): the base prompt "a photo of V*" (15 images), 25 context prompts and 6 complex ones
  (several modifications at once: background and outfit), 5 images each, 170 images per concept.
  The prompts are the paper's as printed, its spellings included ("chief outfit", "floaing"), so
  that scores compare with its tables.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptGroup:
    name: str  # "base", "context" or "complex"
    templates: tuple[str, ...]
    images: int  # images per prompt in the set's protocol


@dataclass(frozen=True)
class PromptSet:
    name: str
    source: str
    groups: tuple[PromptGroup, ...]

    @property
    def templates(self) -> list[str]:
        """Every prompt in order: index i is file NN-*.png's prompt for NN = i."""
        return [t for g in self.groups for t in g.templates]

    @property
    def images(self) -> int:
        return sum(len(g.templates) * g.images for g in self.groups)


_DB_SHARED = (
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
)
_DB_RECOLOUR = ("a red {}", "a purple {}", "a shiny {}", "a wet {}", "a cube shaped {}")
_DB_OBJECT = (
    _DB_SHARED
    + (
        "a {} with a wheat field in the background",
        "a {} with a tree and autumn leaves in the background",
        "a {} with the Eiffel Tower in the background",
        "a {} floating on top of water",
        "a {} floating in an ocean of milk",
        "a {} on top of green grass with sunflowers around it",
        "a {} on top of a mirror",
        "a {} on top of the sidewalk in a crowded street",
        "a {} on top of a dirt road",
        "a {} on top of a white rug",
    )
    + _DB_RECOLOUR
)
_DB_LIVE = (
    _DB_SHARED
    + (
        "a {} wearing a red hat",
        "a {} wearing a santa hat",
        "a {} wearing a rainbow scarf",
        "a {} wearing a black top hat and a monocle",
        "a {} in a chef outfit",
        "a {} in a firefighter outfit",
        "a {} in a police outfit",
        "a {} wearing pink glasses",
        "a {} wearing a yellow shirt",
        "a {} in a purple wizard outfit",
    )
    + _DB_RECOLOUR
)

_PAPER_BASE = PromptGroup("base", ("a photo of {}",), 15)
_PAPER_SHARED = (
    "a {} with the Eiffel Tower in the background",
    "a {} with a mountain in the background",
    "a {} with a tree and autumn leaves in the background",
    "a {} on top of green grass with sunflowers around it",
    "a {} with a sunset and palm trees in the background",
    "a {} with the Sydney Opera House in the background",
)
_PAPER_LIVE = (
    ("a chocolate-colored {}", "a red {}", "a purple {}", "a brightly lit {}", "a snowy {}")
    + ("a {} in a purple wizard outfit", "a {} in a doctor outfit", "a {} in a superhero suit")
    + ("a {} dressed as a ballerina", "a {} wearing a green bow tie")
    + _PAPER_SHARED
    + ("a {} lying in the bed", "a {} sitting on the chair", "a {} swimming", "a {} sleeping", "a {} skateboarding")
    + ("a {} riding a surfboard", "a {} jumping with a parachute", "a {} running on a treadmill", "a {} riding a bike")
)
_PAPER_LIVE_COMPLEX = (
    "a {} in a chief outfit in a nostalgic kitchen filled with vintage furniture and scattered biscuit",
    "a {} dressed in a superhero cape, soaring through the skies above a bustling city during a sunset",
    "a {} wearing a tuxedo performing on a stage in the spotlight",
    "a {} in a wizard's robe in a magical forest at midnight, accented with purples and sparkling silver tones",
    "a {} wearing a space helmet, among stars in a cosmic landscape during a starry night",
    "a {} wearing a pirate hat exploring a sandy beach at the sunset with a boat floating in the background",
)
_PAPER_OBJECT = (
    ("a chocolate-colored {}", "a {} made of gold", "a brightly lit {}", "a red {}", "a purple {}")
    + ("a {} on top of a red and white checkered picnic blanket",)
    + _PAPER_SHARED
    + ("a {} in the snow", "a {} on the beach", "a {} on a cobblestone street", "a {} on top of a wooden floor")
    + ("a {} with a city in the background", "a {} with a blue house in the background")
    + ("a {} on top of a purple rug in a forest", "a {} with a wheat field in the background")
    + ("a {} in the bed", "a {} on the chair", "a {} on top of a snowy mountain peak")
    + ("a {} with a sand castle in the background", "a {} in a cave")
)
_PAPER_OBJECT_COMPLEX = (
    "a {} on a windowsill in Tokyo at dusk, illuminated by neon city lights, using neon color palette",
    "a {} on a sofa in a cozy living room, rendered in warm tones",
    "a {} on a wooden table in a sunny backyard, surrounded by flowers and butterflies",
    "a {} floating in a bathtub filled with bubbles and illuminated by the warm glow of evening sunlight "
    "filtering through a nearby window",
    "a {} floating among stars in a cosmic landscape during a starry night with a spacecraft in the background",
    "a {} on a sandy beach next to the sand castle at the sunset with a floaing boat in the background",
)

_DREAMBOOTH = "DreamBooth's context prompts (Ruiz et al. 2023), 4 images each"
_PAPER = "the T-LoRA paper's protocol (arXiv 2507.05964, Appendix A)"
PROMPT_SETS: dict[str, PromptSet] = {
    "object": PromptSet("object", _DREAMBOOTH, (PromptGroup("context", _DB_OBJECT, 4),)),
    "live": PromptSet("live", _DREAMBOOTH, (PromptGroup("context", _DB_LIVE, 4),)),
    "paper-object": PromptSet(
        "paper-object",
        _PAPER,
        (_PAPER_BASE, PromptGroup("context", _PAPER_OBJECT, 5), PromptGroup("complex", _PAPER_OBJECT_COMPLEX, 5)),
    ),
    "paper-live": PromptSet(
        "paper-live",
        _PAPER,
        (_PAPER_BASE, PromptGroup("context", _PAPER_LIVE, 5), PromptGroup("complex", _PAPER_LIVE_COMPLEX, 5)),
    ),
}
