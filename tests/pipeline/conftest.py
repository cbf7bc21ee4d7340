"""Pipeline fixtures: images/ roots as the download stage writes them, and one labelled root."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from four_m.core.config import load_config
from four_m.core.dataset_root import DatasetRoot
from four_m.core.modalities import labelled_modalities, map_modalities
from four_m.pipeline.label import run_label
from four_m.pipeline.tokenize import run_tokenize
from four_m.pipeline.tokenizers import run_tokenizer_training

SMALL = [
    "label.size=64",
    *(f"label.{n}.input_size=64" for n in labelled_modalities()),
    "label.det.input_size=96",  # after the line above: YOLO needs a larger input
    "label.caption.max_new_tokens=5",
    # One actor per pool: a few images do not repay a second process importing torch.
    *(f"label.{n}.concurrency=1" for n in labelled_modalities()),
    "ray.num_cpus=2",
]


def _jpeg(path: Path, mode: str = "RGB", size: int = 256) -> bytes:
    image = Image.open(path).convert(mode)
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, "JPEG")
    return out.getvalue()


def _make_images_root(root: Path, photos, per_shard: int = 4) -> list[list[str]]:
    """images/ shards as the download stage writes them, with a corrupt image and a failed row.

    Also a greyscale and a 1x1 image: both must be labelled, not failed.
    """
    rows = [dict(jpg=_jpeg(p), status="success", error_message=None, caption=c) for p, c in photos[:6]]
    rows.append(dict(jpg=_jpeg(photos[0][0], "L"), status="success", error_message=None, caption="grey"))
    rows.append(dict(jpg=_jpeg(photos[1][0], size=1), status="success", error_message=None, caption="1x1"))
    rows.insert(2, dict(jpg=b"\xff\xd8 not really a jpeg", status="success", error_message=None, caption="corrupt"))
    rows.insert(5, dict(jpg=None, status="failed_to_download", error_message="HTTP Error 404: x", caption="gone"))
    state = DatasetRoot(root).stage("download")
    keys = []
    for shard, start in enumerate(range(0, len(rows), per_shard)):
        part = rows[start : start + per_shard]
        shard_keys = [f"{shard:05d}{i}" for i in range(len(part))]
        table = pa.table({"key": shard_keys, **{k: [r[k] for r in part] for k in part[0]}})
        path = root / f"images/{shard:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        state.mark_done(shard, len(part), [path], "test")
        keys.append(shard_keys)
    return keys


def _small_config(root: Path, *extra: str):
    return load_config("default", [*SMALL, *extra], root=str(root))


@pytest.fixture(scope="session")
def labelled(tmp_path_factory, ray_local, photos):
    root = tmp_path_factory.mktemp("label") / "root"
    keys = _make_images_root(root, photos)
    config = _small_config(root)
    return config, keys, run_label(config, progress=False)


@pytest.fixture
def make_images_root():
    return _make_images_root


@pytest.fixture(scope="session")
def small_config():
    return _small_config


TINY_TOKENIZERS = [
    "tokenize.train_samples=64",
    "tokenize.crops.size=64",  # the 64 px label view's crops stay at 64 px (a 4 x 4 grid of 16 px)
    "tokenize.crops.n_crops=2",  # the whole view and one random crop: cropping without the demo's 4x cost
    "tokenize.text.vocab_size=200",
    "tokenize.text.min_box_score=0.0",
    *(
        f"tokenize.{m}.{k}"
        for m in map_modalities()
        for k in ("grid=4", "width=8", "steps=12", "codebook_size=32", "batch_size=4")
    ),
]


@pytest.fixture(scope="session")
def tokenized(tmp_path_factory, labelled):
    """A copy of the session's labelled root, with trained tokenizers and tokens/."""
    labelled_config, keys, _ = labelled
    root = tmp_path_factory.mktemp("tokenize") / "root"
    shutil.copytree(labelled_config.root, root, ignore=shutil.ignore_patterns("tokens", "tokenizers"))
    config = load_config("default", [*small_tokenize_overrides(labelled_config), *TINY_TOKENIZERS], root=str(root))
    trained = run_tokenizer_training(config)
    return config, keys, trained, run_tokenize(config, progress=False)


def small_tokenize_overrides(config) -> list[str]:
    """The labelled root's label settings, so the tokenize config matches what is on disk."""
    return [f"label.size={config.label.size}", "ray.num_cpus=2"]


@pytest.fixture(scope="session")
def tiny_tokenizers() -> list[str]:
    """Overrides for tokenizers that train in seconds (tiny VQ models, a small WordPiece)."""
    return list(TINY_TOKENIZERS)
