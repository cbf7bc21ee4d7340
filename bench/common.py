"""What the benchmarks share: a set of distinct, CC12M-like photos made offline."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from four_m.core.dataset_root import DatasetRoot
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


def write_images_root(root: Path, photos: list[Path], per_shard: int, shorter_side: int | None = None) -> list[bytes]:
    """images/ shards with JPEGs as the download stage leaves them (quality 95): within 384 x 256 px,
    or with a ``shorter_side`` as img2dataset's ``keep_ratio`` makes it; returns the JPEGs."""
    jpegs = []
    for path in photos:
        image = Image.open(path).convert("RGB")
        if shorter_side is None:
            image.thumbnail((384, 256))
        else:
            scale = shorter_side / min(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=95)
        jpegs.append(out.getvalue())
    state = DatasetRoot(root).stage("download")
    for shard, start in enumerate(range(0, len(jpegs), per_shard)):
        part = jpegs[start : start + per_shard]
        table = pa.table(
            {
                "key": [f"{shard:05d}{i:04d}" for i in range(len(part))],
                "jpg": part,
                "status": ["success"] * len(part),
                "error_message": pa.nulls(len(part), pa.string()),
                "caption": [f"bench image {start + i}" for i in range(len(part))],
            }
        )
        file = root / f"images/{shard:05d}.parquet"
        file.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, file)
        state.mark_done(shard, len(part), [file], "bench")
    return jpegs
