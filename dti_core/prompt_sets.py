"""Prompt sets for rendering a learned word before scoring it (``python -m dti_cli evaluate --render``).

From the authors' evaluation code (github ``kunheek/dti``, ``src/dti/metrics/prompts.py``, MIT License,
Copyright (c) 2025 Kunhee Kim and NaHyeon Park): ``simple`` is their ``SIMPLE`` object prompts taken
from the DreamBooth paper (its first 24), ``complex`` their ``COMPLEX_LV1`` object prompts. ``{}`` is
where the learned word goes.
"""

from __future__ import annotations

import re

PROMPT_SETS: dict[str, tuple[str, ...]] = {
    "simple": (
        'a {} in the jungle',
        'a {} in the snow',
        'a {} on the beach',
        'a {} on a cobblestone street',
        'a {} on top of pink fabric',
        'a {} on top of a wooden floor',
        'a {} with a city in the background',
        'a {} with a mountain in the background',
        'a {} with a blue house in the background',
        'a {} on top of a purple rug in a forest',
        'a {} with a wheat field in the background',
        'a {} with a tree and autumn leaves in the background',
        'a {} with the Eiffel Tower in the background',
        'a {} floating on top of water',
        'a {} floating in an ocean of milk',
        'a {} on top of green grass with sunflowers around it',
        'a {} on top of a mirror',
        'a {} on top of the sidewalk in a crowded street',
        'a {} on top of a dirt road',
        'a {} on top of a white rug',
        'a red {}',
        'a purple {}',
        'a shiny {}',
        'a wet {}',
    ),
    "complex": (
        'Against a plain white studio backdrop, a {} lying flat',
        'On a marble floor, a {} resting',
        'On a glass tabletop, a {} placed at the center',
        'On a stone staircase outdoors, a {} resting on a step',
        'On a wooden pier above still water, a {} lying on the boards',
        'On patterned ceramic tiles, a {} placed neatly',
        'On snow-covered stairs, a {} resting',
        'On a sandy path through dunes, a {} lying on the sand',
        'On a sunlit balcony over a city street, a {} placed near the railing',
        'Next to an old brick wall, a {} resting on the ground',
        'On a stone plaza, a {} lying still',
        'Inside a glass greenhouse, a {} placed on the floor',
        'With rolling green hills behind, a {} lying on short grass',
        'With a city skyline in the background, a {} lying on the ground',
        'At the entrance of a museum hall, a {} placed on the floor',
        'Beside a calm lake, a {} lying on a rocky shore',
    ),
}


def parse_seeds(text: str) -> list[int]:
    """``"0-3"`` -> [0, 1, 2, 3]; ``"0,5,7"`` -> [0, 5, 7]; each seed at most once, in order."""
    seeds: list[int] = []
    for part in (p.strip() for p in str(text).split(",")):
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        lo, hi = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, -1)
        if part and (hi < lo or hi - lo > 10000):
            raise ValueError(f"seeds {text!r}: write a range '0-3' or a list '0,5,7' of whole numbers >= 0")
        seeds += range(lo, hi + 1)
    if not seeds:
        raise ValueError(f"seeds {text!r}: write a range '0-3' or a list '0,5,7' of whole numbers >= 0")
    return list(dict.fromkeys(seeds))
