"""Training prompt templates: the textual-inversion "object" and "style" sets, or the user's own.

``{}`` marks where the learned word goes (the reference recipe's ImageNet-style templates).
"""

from __future__ import annotations

PLACEHOLDER = "{}"

OBJECT = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
]

STYLE = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
]

PRESETS = {"object": OBJECT, "style": STYLE}


def resolve_templates(preset: str, custom: str = "") -> list[str]:
    """The template list for ``preset`` ("object", "style" or "custom").

    Custom templates are the non-empty lines of ``custom``; each must hold ``{}`` once.
    """
    if preset in PRESETS:
        return list(PRESETS[preset])
    if preset != "custom":
        raise ValueError(f"template preset must be one of object, style, custom; got {preset!r}")
    lines = [line.strip() for line in custom.splitlines() if line.strip()]
    if not lines:
        raise ValueError("custom templates are empty: write one prompt per line, each with {} where the word goes")
    for line in lines:
        if line.count(PLACEHOLDER) != 1:
            raise ValueError(f"custom template {line!r} must contain the placeholder {{}} exactly once")
    return lines


def parse_captions(text: str, count: int) -> list[str]:
    """Per-image captions: one non-empty line per training image, in image order, each holding
    ``{}`` exactly once where the learned word goes."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != count:
        raise ValueError(f"captions: {len(lines)} line(s) for {count} image(s); write one line per image, in the "
                         f"order of the images (the images batch first, then the folder's files by name)")
    for k, line in enumerate(lines, 1):
        if line.count(PLACEHOLDER) != 1:
            raise ValueError(f"caption {k} {line!r} must contain the placeholder {{}} exactly once "
                             f"(where the learned word goes)")
    return lines
