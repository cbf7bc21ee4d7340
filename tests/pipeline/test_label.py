"""The label stage for real: six tiny labelers on Ray Data over images/ shards."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from four_m.core.config import LABELER_NAMES, load_config
from four_m.core.dataset_root import DatasetRoot, sha256_file
from four_m.labelers.base import RANDOM_INIT
from four_m.pipeline.label import run_label

SMALL = [
    "label.size=64",
    *(f"label.{n}.input_size=64" for n in ("depth", "normal", "semseg", "caption", "clip")),
    "label.det.input_size=96",
    "label.caption.max_new_tokens=5",
    "label.shards_per_run=1",
    "ray.num_cpus=2",
]


def _jpeg(path: Path, mode: str = "RGB", size: int = 256) -> bytes:
    image = Image.open(path).convert(mode)
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, "JPEG")
    return out.getvalue()


def make_images_root(root: Path, photos, per_shard: int = 4) -> list[list[str]]:
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


def _config(root: Path, *extra: str):
    return load_config("default", [*SMALL, *extra], root=str(root))


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, ray_local, photos):
    root = tmp_path_factory.mktemp("label") / "root"
    keys = make_images_root(root, photos)
    config = _config(root)
    return config, keys, run_label(config, progress=False)


def test_every_labeler_writes_every_row_and_counts_failures(labelled):
    config, keys, summary = labelled
    total = sum(len(k) for k in keys)
    for name in LABELER_NAMES:
        assert summary.rows[name] == total
        assert summary.labelled[name] == total - 2
        assert dict(summary.failures[name]) == {"no_image": 2}
        assert summary.shards_done[name] == len(keys)
    assert sorted(summary.random_init) == sorted(LABELER_NAMES)


def test_all_modalities_align_with_images_row_by_row(labelled):
    config, keys, _ = labelled
    root = Path(config.root)
    for name in LABELER_NAMES:
        for shard, shard_keys in enumerate(keys):
            table = pq.read_table(root / f"labels/{name}/{shard:05d}.parquet")
            assert table["key"].to_pylist() == shard_keys, name
            errors = table["error"].to_pylist()
            payload = table.column(1).to_pylist()
            assert all((e is None) == (p is not None) for e, p in zip(errors, payload, strict=True)), name


def test_files_carry_schema_and_loud_provenance(labelled):
    config, _, _ = labelled
    root = Path(config.root)
    for name in LABELER_NAMES:
        schema = pq.read_schema(root / f"labels/{name}/00000.parquet")
        assert schema.names[0] == "key" and schema.names[-1] == "error"
        assert schema.metadata[b"four_m.model"] == RANDOM_INIT.encode()
        assert schema.metadata[b"four_m.modality"] == name.encode()
    captions = pq.read_table(root / "labels/caption/00000.parquet")
    assert captions["alt_text"].to_pylist()[0] == "astronaut eileen collins in an orange flight suit with the us flag"


def test_only_reruns_the_named_labelers_and_leaves_others_byte_identical(labelled):
    config, keys, _ = labelled
    root = DatasetRoot(config.root)
    others = {
        p: sha256_file(p) for n in LABELER_NAMES if n != "depth" for p in (root / f"labels/{n}").glob("*.parquet")
    }
    (root / "_state/label/depth/00001.done.json").unlink()
    summary = run_label(config, only=("depth",), progress=False)
    assert summary.shards_done["depth"] == 1 and summary.shards_skipped["depth"] == len(keys) - 1
    assert {p: sha256_file(p) for p in others} == others
    again = run_label(config, progress=False)
    assert sum(again.shards_done.values()) == 0


def test_a_killed_run_resumes_with_every_key_exactly_once(tmp_path, ray_local, photos, kill_after_first_marker):
    root = tmp_path / "root"
    keys = make_images_root(root, photos * 3, per_shard=3)
    config_file = tmp_path / "c.yaml"
    config_file.write_text(_config(root, "label.labelers=[depth, clip]").to_yaml())
    done = kill_after_first_marker("label", config_file, root / "_state/label/clip")
    assert 1 <= done < len(keys), "the kill should land mid-run"
    summary = run_label(load_config(config_file), progress=False)
    assert summary.shards_done["clip"] == len(keys) - done
    for name in ("depth", "clip"):
        written = [
            k
            for s in range(len(keys))
            for k in pq.read_table(root / f"labels/{name}/{s:05d}.parquet")["key"].to_pylist()
        ]
        assert written == [k for shard in keys for k in shard]
    assert not list((root / "labels/clip").glob(".*.tmp"))
