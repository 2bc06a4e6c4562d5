"""Aspect-ratio buckets: SDXL's list, scaled to a training resolution (pure math)."""

from __future__ import annotations

import math

# SDXL's training buckets (height, width) at 1024 x 1024 px area (SDXL report, appendix I).
SDXL_BUCKETS = [
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1344, 704), (1408, 704), (1472, 704),
    (1536, 640), (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512),
    (2048, 512),
]


def buckets_for(resolution: int) -> list[tuple[int, int]]:
    """SDXL's bucket list scaled to ``resolution``'s area: sides in multiples of 64 px (8 px below
    512, where 64 px steps would be too coarse), duplicates after rounding dropped."""
    q = 64 if resolution >= 512 else 8
    scale = resolution / 1024
    return sorted({(max(q, round(h * scale / q) * q), max(q, round(w * scale / q) * q)) for h, w in SDXL_BUCKETS})


def choose_bucket(height: int, width: int, resolution: int) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log ratio), then the one whose
    area is closest to ``resolution`` squared."""
    ratio = math.log(height / width)
    return min(buckets_for(resolution),
               key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 9), abs(b[0] * b[1] - resolution ** 2)))
