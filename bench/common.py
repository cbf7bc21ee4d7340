"""What the benchmarks share: a set of distinct, CC12M-like photos made offline."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

from four_m.pipeline.sample_site import bundled_photo_paths


def make_images(folder: Path, count: int, seed: int = 0) -> list[str]:
    """Distinct CC12M-like JPEGs (random crops of the bundled photos, 400-800 px, varied quality)."""
    rng = random.Random(seed)
    sources = [Image.open(p).convert("RGB") for p, _ in bundled_photo_paths()]
    names = []
    for index in range(count):
        source = rng.choice(sources)
        width, height = source.size
        crop_w, crop_h = rng.randint(width // 2, width), rng.randint(height // 2, height)
        left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
        target = rng.randint(400, 800)
        image = source.crop((left, top, left + crop_w, top + crop_h))
        image = image.resize((target, max(1, target * crop_h // crop_w)))
        name = f"{index:05d}.jpg"
        image.save(folder / name, quality=rng.randint(75, 95))
        names.append(name)
    return names
