"""Token store: bytes on disk and single-core read speed against the original 4M's format, in one run.

(a) Bytes per sample of ``tokens/`` against the raw uint16 payload (2 bytes x ids actually present),
per modality and in total (goal <= 1.0x), then the very same tokens re-encoded in candidate layouts
(uint16 lists vs int32 lists vs raw bytes in a binary column; zstd, snappy, none; dictionary on/off)
with the same shards and row groups, so the store's choice is visibly one made by measurement.
(b) Samples/s reading every modality on one core (one process, Arrow's thread pools at one thread):
the store, rows zipped by key, against one int16 ``.npy`` per sample per modality in webdataset tar
shards (how the original 4M code stores tokens), both from the page cache, best of the repeats
(goal: store / webdataset >= 5x). The first pass of each is untimed: it warms the cache and checks
that both formats hold the same tokens.

(c) Samples/s of the tokenize stage that made those tokens, from its own summary.

By default the tokens are made in this run by the real stages: ``--images`` generated photos go
through the label stage (the configured, by default tiny, labelers), tokenizer training (a few
steps: quality does not change speed) and the tokenize stage. ``--root`` measures an existing
root instead (e.g. after ``make demo``). ``--synthetic N`` writes N samples with the store's own
writer instead, for (a) and (b) at scale: maps of 196 ids from a 1024-code book, sequences of 5-60
ids from a ~5000-word vocabulary, Zipf-like and i.i.d. (real VQ maps repeat neighbouring codes and
compress better), ~2% absent rows per modality.

    .venv/bin/python bench/tokens.py [--images 512] [--root DATASET_ROOT] [--synthetic 20000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import webdataset as wds
from common import make_images, write_images_root

from four_m.core.config import TokenizeConfig, load_config
from four_m.core.dataset_root import shard_name
from four_m.core.modalities import MODALITIES, ModalitySpec, map_modalities
from four_m.pipeline.label import run_label
from four_m.pipeline.tokenize import run_tokenize
from four_m.pipeline.tokenizers import run_tokenizer_training
from four_m.tokenize.base import TOKEN_DTYPE
from four_m.tokenize.store import COMPRESSION, token_schema, token_table, write_tokens

CODEBOOK = 1024  # VQConfig's default codebook size
TEXT_VOCAB = 30_000  # TextTokenizerConfig's default WordPiece size
WORDS = 5_000  # distinct words a caption set actually uses
SEQUENCE_LENGTHS = (5, 60)
ABSENT = 0.02
ABSENT_REASON = "synthetic: label failed upstream"
CODECS = ("zstd", "snappy", "none")

Sample = dict[str, np.ndarray | None]
"""Modality -> its ids, None where the modality is absent for that sample."""


def zipf_probabilities(vocab: int, rng: np.random.Generator) -> np.ndarray:
    """Usage ~ 1/rank over ids in random order: a few ids common, most rare, as in codebooks and text."""
    weights = 1.0 / np.arange(1, vocab + 1)
    return rng.permutation(weights / weights.sum())


def synthetic_rows(spec: ModalitySpec, count: int, rng: np.random.Generator) -> list[np.ndarray | None]:
    """``count`` rows of ids for one modality, about ``ABSENT`` of them None."""
    if spec.layout == "map":
        grid = rng.choice(CODEBOOK, size=(count, spec.max_tokens), p=zipf_probabilities(CODEBOOK, rng))
        rows = list(grid.astype(TOKEN_DTYPE))
    else:
        words = rng.choice(TEXT_VOCAB, WORDS, replace=False)  # WordPiece ids spread over the vocabulary
        lengths = rng.integers(SEQUENCE_LENGTHS[0], SEQUENCE_LENGTHS[1] + 1, count)
        flat = words[rng.choice(WORDS, lengths.sum(), p=zipf_probabilities(WORDS, rng))].astype(TOKEN_DTYPE)
        rows = np.split(flat, np.cumsum(lengths)[:-1])
    absent = rng.random(count) < ABSENT
    return [None if gone else row for row, gone in zip(rows, absent, strict=True)]


def write_synthetic_store(tokens_dir: Path, samples: int, per_shard: int, seed: int = 0) -> None:
    """A ``tokens/`` folder written by the store's own schema, table builder and writer."""
    rng = np.random.default_rng(seed)
    keys = [f"{index:09d}" for index in range(samples)]
    row_group_rows = TokenizeConfig().row_group_rows
    for name, spec in MODALITIES.items():
        rows = synthetic_rows(spec, samples, rng)
        schema = token_schema(spec.max_tokens if spec.layout == "map" else None, {"tokenizer": "synthetic"})
        for shard, start in enumerate(range(0, samples, per_shard)):
            ids = rows[start : start + per_shard]
            errors = [ABSENT_REASON if row is None else None for row in ids]
            table = token_table(keys[start : start + per_shard], ids, errors, schema)
            write_tokens(tokens_dir / name / f"{shard_name(shard)}.parquet", table, row_group_rows)


def store_shards(tokens_dir: Path) -> list[tuple[str, dict[str, Path]]]:
    """Each shard's name and its file per modality; every modality folder must hold the same shards."""
    modalities = [name for name in MODALITIES if (tokens_dir / name).is_dir()]
    if not modalities:
        raise SystemExit(f"no modality folders under {tokens_dir}")
    files = {name: sorted(p.name for p in (tokens_dir / name).glob("*.parquet")) for name in modalities}
    first = files[modalities[0]]
    for name in modalities:
        assert files[name] == first, f"tokens/{name} holds other shards than tokens/{modalities[0]}"
    return [(Path(file).stem, {name: tokens_dir / name / file for name in modalities}) for file in first]


def uint16_values(values: pa.Array) -> np.ndarray:
    """The ids' data buffer as uint16 without a copy; slots under a null row hold whatever was written."""
    return np.frombuffer(values.buffers()[1], np.uint16)[values.offset : values.offset + len(values)]


def row_arrays(column: pa.ChunkedArray) -> list[np.ndarray | None]:
    """One numpy view per row (None for a null row), for fixed-size and variable lists alike."""
    lists = column.combine_chunks()
    valid = lists.is_valid().to_numpy(zero_copy_only=False)
    if isinstance(lists.type, pa.FixedSizeListType):
        size = lists.type.list_size
        # .values ignores the array's offset; the slice below applies it.
        flat = uint16_values(lists.values)[lists.offset * size : (lists.offset + len(lists)) * size]
        grid = flat.reshape(len(lists), size)
        return [row if ok else None for row, ok in zip(grid, valid, strict=True)]
    flat, offsets = uint16_values(lists.values), lists.offsets.to_numpy().tolist()
    return [flat[a:b] if ok else None for a, b, ok in zip(offsets[:-1], offsets[1:], valid, strict=True)]


def read_shard(files: dict[str, Path]) -> Iterator[tuple[str, Sample]]:
    """One shard's samples as (key, modality -> ids); the modalities' rows must share their keys."""
    tables = {name: pq.read_table(path, columns=["key", "tokens"], use_threads=False) for name, path in files.items()}
    keys = next(iter(tables.values()))["key"]
    for name, table in tables.items():
        assert table["key"].equals(keys), f"{files[name]}: keys differ from the other modalities'"
    columns = [row_arrays(table["tokens"]) for table in tables.values()]
    for key, rows in zip(keys.to_pylist(), zip(*columns, strict=True), strict=True):
        yield key, dict(zip(tables, rows, strict=True))


def iter_store(tokens_dir: Path) -> Iterator[tuple[str, Sample]]:
    """Every sample of the store, shard after shard: what a training loader reads."""
    for _, files in store_shards(tokens_dir):
        yield from read_shard(files)


def write_webdataset(tokens_dir: Path, out: Path) -> list[str]:
    """The same tokens in the original 4M's format: one tar per shard, one int16 ``.npy`` per modality.

    Absent modalities have no member. Ids are reinterpreted as int16 (4M's dtype): ids above 32767
    would read back negative, but the bytes, which are what is measured here, are the same.
    """
    out.mkdir(parents=True, exist_ok=True)
    urls = []
    for shard, files in store_shards(tokens_dir):
        url = str(out / f"{shard}.tar")
        with wds.TarWriter(url) as sink:
            for key, sample in read_shard(files):
                members = {f"{name}.npy": ids.view(np.int16) for name, ids in sample.items() if ids is not None}
                sink.write({"__key__": key, **members})
        urls.append(url)
    return urls


def iter_webdataset(urls: list[str]) -> Iterable[dict]:
    return wds.WebDataset(urls, shardshuffle=False).decode()


def check_same_tokens(tokens_dir: Path, urls: list[str]) -> int:
    """Read both formats once side by side (warming the page cache) and assert they agree; the sample count."""
    count = 0
    for (key, sample), record in zip(iter_store(tokens_dir), iter_webdataset(urls), strict=True):
        assert record["__key__"] == key, f"webdataset key {record['__key__']} where the store has {key}"
        for name, ids in sample.items():
            stored = record.get(f"{name}.npy")
            assert (ids is None) == (stored is None), f"{key}/{name}: present in only one format"
            assert ids is None or np.array_equal(ids.view(np.int16), stored), f"{key}/{name}: ids differ"
        count += 1
    return count


def best_rate(make_samples: Callable[[], Iterable], expected: int, repeats: int) -> float:
    """Samples/s of the fastest full pass: other load on the machine can only slow a pass down."""
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        count = sum(1 for _ in make_samples())
        seconds = time.perf_counter() - started
        assert count == expected, f"read {count} samples, expected {expected}"
        best = max(best, count / seconds)
    return best


def payload_bytes(path: Path) -> int:
    """2 bytes per id actually present in one token file (null rows count nothing)."""
    tokens = pq.read_table(path, columns=["tokens"])["tokens"]
    return 2 * (pc.sum(pc.list_value_length(tokens)).as_py() or 0)


def as_stored(tokens: pa.ChunkedArray) -> pa.ChunkedArray:
    return tokens


def as_int32_list(tokens: pa.ChunkedArray) -> pa.ChunkedArray:
    return tokens.cast(pa.list_(pa.int32()))


def as_raw_bytes(tokens: pa.ChunkedArray) -> pa.Array:
    """Each row's ids as little-endian uint16 bytes in one binary value: no list for Parquet to encode."""
    return pa.array([None if row is None else row.astype("<u2").tobytes() for row in row_arrays(tokens)], pa.binary())


TOKEN_LAYOUTS: dict[str, Callable[[pa.ChunkedArray], pa.Array | pa.ChunkedArray]] = {
    "uint16 list": as_stored,
    "int32 list": as_int32_list,
    "raw bytes": as_raw_bytes,
}
"""Candidate types of the ``tokens`` column; the store's is the first (fixed-size for maps)."""


def encoded_bytes(table: pa.Table, compression: str, dictionary: bool, row_group_rows: int) -> int:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression, use_dictionary=dictionary, row_group_size=row_group_rows)
    return sink.getvalue().size


def layout_bytes(shards: list[tuple[str, dict[str, Path]]]) -> dict[tuple[str, str, bool], dict[str, int]]:
    """Bytes per (tokens type, codec, dictionary) and modality, re-encoding every shard with its row groups."""
    sizes: dict[tuple[str, str, bool], dict[str, int]] = {}
    for _, files in shards:
        for name, path in files.items():
            table = pq.read_table(path)
            row_group_rows = pq.ParquetFile(path).metadata.row_group(0).num_rows
            index = table.schema.get_field_index("tokens")
            for layout, convert in TOKEN_LAYOUTS.items():
                converted = table.set_column(index, "tokens", convert(table["tokens"]))
                for codec in CODECS:
                    for dictionary in (True, False):
                        per_modality = sizes.setdefault((layout, codec, dictionary), {})
                        size = encoded_bytes(converted, codec, dictionary, row_group_rows)
                        per_modality[name] = per_modality.get(name, 0) + size
    return sizes


def print_sizes(shards: list[tuple[str, dict[str, Path]]], samples: int) -> dict[str, int]:
    """Table (a): the store on disk against the payload; returns the payload per modality."""
    modalities = list(shards[0][1])
    payload = {name: sum(payload_bytes(files[name]) for _, files in shards) for name in modalities}
    disk = {name: sum(files[name].stat().st_size for _, files in shards) for name in modalities}
    print(f"(a) bytes per sample: tokens/ on disk vs raw uint16 payload (2 B x ids present), {samples} samples")
    print(f"    {'modality':9s} {'disk B':>8s} {'payload B':>10s} {'ratio':>7s}")
    for name in modalities:
        ratio = disk[name] / payload[name]
        print(f"    {name:9s} {disk[name] / samples:8.1f} {payload[name] / samples:10.1f} {ratio:6.2f}x")
    total_disk, total_payload = sum(disk.values()), sum(payload.values())
    print(
        f"    {'total':9s} {total_disk / samples:8.1f} {total_payload / samples:10.1f}"
        f" {total_disk / total_payload:6.2f}x  (goal <= 1.0x)"
    )
    return payload


def print_layouts(shards: list[tuple[str, dict[str, Path]]], payload: dict[str, int]) -> None:
    """The same tokens in every candidate layout, as ratios to the payload; * marks the store's."""
    sizes = layout_bytes(shards)
    modalities = list(payload)
    print("    same tokens re-encoded (same shards and row groups), ratio to payload; * = the store's layout")
    print(f"    {'tokens':12s} {'codec':6s} {'dict':4s} " + " ".join(f"{n[:7]:>7s}" for n in modalities) + "   total")
    store_layout = (next(iter(TOKEN_LAYOUTS)), COMPRESSION, True)
    for (layout, codec, dictionary), per_modality in sizes.items():
        mark = "*" if (layout, codec, dictionary) == store_layout else " "
        ratios = " ".join(f"{per_modality[n] / payload[n]:7.2f}" for n in modalities)
        total = sum(per_modality.values()) / sum(payload.values())
        print(f"  {mark} {layout:12s} {codec:6s} {'on' if dictionary else 'off':4s} {ratios} {total:7.2f}")


def print_read_rates(tokens_dir: Path, work: Path, payload: dict[str, int], repeats: int) -> None:
    """Figures (b): the store against 4M's webdataset ``.npy`` shards, one core, from the page cache."""
    urls = write_webdataset(tokens_dir, work / "webdataset")
    tar_bytes = sum(Path(url).stat().st_size for url in urls)
    samples = check_same_tokens(tokens_dir, urls)
    print(
        f"    4M's webdataset .npy tars for comparison: {tar_bytes / samples:.0f} B/sample,"
        f" {tar_bytes / sum(payload.values()):.2f}x payload"
    )
    store = best_rate(lambda: iter_store(tokens_dir), samples, repeats)
    webdataset = best_rate(lambda: iter_webdataset(urls), samples, repeats)
    print(f"(b) reading all {len(payload)} modalities, one core, page cache warm, best of {repeats}")
    print(f"    store (pyarrow, rows zipped by key)   {store:10.0f} samples/s")
    print(f"    webdataset tars, one .npy per member  {webdataset:10.0f} samples/s")
    print(f"    ratio store / webdataset: {store / webdataset:.1f}x  (goal >= 5x)")


def measure_store(tokens_dir: Path, work: Path, repeats: int) -> None:
    """(a) and (b) for one ``tokens/`` folder; ``work`` receives the webdataset copy."""
    shards = store_shards(tokens_dir)
    samples = sum(pq.ParquetFile(files[next(iter(files))]).metadata.num_rows for _, files in shards)
    payload = print_sizes(shards, samples)
    print_layouts(shards, payload)
    print_read_rates(tokens_dir, work, payload, repeats)


def pipeline_root(work: Path, images: int, per_shard: int, overrides: list[str]) -> Path:
    """A dataset root made by the real stages: generated photos -> label -> tokenizers -> tokenize."""
    photos = work / "photos"
    photos.mkdir()
    names = make_images(photos, images)
    root = work / "root"
    write_images_root(root, [photos / n for n in names], per_shard)
    # Tokenizers train only a few steps: the tokenize stage's speed does not depend on their quality.
    quick = [f"tokenize.{m}.steps=5" for m in map_modalities()]
    config = load_config("default", [*quick, *overrides], root=str(root))
    ray.init(num_cpus=config.ray.num_cpus, include_dashboard=False, logging_level="warning")
    run_label(config, progress=False)
    run_tokenizer_training(config)
    run_tokenize(config, progress=False)
    ray.shutdown()
    return root


def print_tokenize_rate(root: Path) -> None:
    """(c) from the run that made the tokens: rows over the stage's own wall time."""
    summary = json.loads((root / "_state/tokenize/summary.json").read_text())
    rows = max(m["rows_in"] for m in summary["modalities"].values())
    modalities = len(summary["modalities"])
    print(
        f"tokenize stage: {rows} samples x {modalities} modalities in {summary['seconds']:.1f} s"
        f" (Ray start and tokenizer loading included) = {rows / summary['seconds']:.1f} samples/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="measure an existing dataset root's tokens/")
    parser.add_argument("--images", type=int, default=512, help="photos through the real stages (no --root)")
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--synthetic", type=int, metavar="SAMPLES", help="a synthetic store instead, for (a)/(b)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = args.root
        if args.synthetic:
            write_synthetic_store(work / "tokens", args.synthetic, args.per_shard)
            root = work
        elif root is None:
            root = pipeline_root(work, args.images, args.per_shard, args.overrides)
        # One core from here: Arrow would otherwise decode columns and row groups on its thread pools.
        pa.set_cpu_count(1)
        pa.set_io_thread_count(1)
        measure_store(root / "tokens", work, args.repeats)
        if not args.synthetic:
            print_tokenize_rate(root)


if __name__ == "__main__":
    main()
