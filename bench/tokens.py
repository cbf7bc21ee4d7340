"""Token store: bytes on disk, single-core read speed with a crop drawn per sample, the layout of the
cropped modalities, against the original 4M's format, and the tokenize stage's speed, in one run.

Maps and boxes are stored per crop (``core.crops``: crop 0 the whole label view, then random resized
crops), one row per sample holding a list of crops; 4M saves one ``.npy`` of shape
``[n_crops, n_tokens]`` per sample and modality in webdataset tars. Training reads a sample and
shows one crop of it, drawn by ``train.data.draw_crop``.

(a) Bytes per sample, and per sample and crop, of ``tokens/`` against the raw uint16 payload (2 bytes
x ids present, every crop) and against 4M's tars holding the same tokens, per modality and in total
(goal: store <= 0.5x payload), and what the ``crops`` columns (the crop boxes) take. Then the very
same tokens re-encoded in candidate layouts (uint16 lists vs int32 lists vs raw bytes in a binary
column; zstd, snappy, none; dictionary on/off) with the same shards and row groups, so the store's
encoding is visibly one made by measurement.
(b) Samples/s on one core (one process, Arrow's thread pools at one thread), from the page cache,
best of the repeats, reading every modality and keeping one crop per sample, drawn by
``draw_crop`` in every reader: the store (a bench reader: views of the read columns, only the drawn
crop picked) against 4M's tars (each member's ``[n_crops, n]`` int16 ``.npy`` decoded, then the crop
picked; ragged crops, the boxes', are padded with -1 and unpadded) (goal: store / tars >= 10x),
with the trainer's own reader (``TokenShards.read`` + ``view``) and ``draw_crop`` alone for scale.
The first pass of every reader is untimed: it warms the cache and checks they all hold the same
tokens.
(c) The layout of the cropped modalities, both measured: a list of crops per row (the store) against
a crop column (one row per sample and crop, with an int ``crop`` column, the same row groups in
samples), bytes of the cropped modalities and the read speed of (b).
(d) Samples/s of the tokenize stage, from its own summary: at 1 crop and at ``--crops`` crops over the
same labels and tokenizers (the cost should grow at most with the number of crops); with ``--root``,
the root's own run.

By default the tokens are made in this run by the real stages: ``--images`` generated photos go
through the label stage (the configured, by default tiny, labelers), tokenizer training (a few
steps: quality does not change speed) and the tokenize stage, twice; (a) measures the tokens of
``--crops`` crops. (b) and (c) then read a synthetic store of ``--read-samples`` samples in shards
of ``--read-per-shard`` (``--read-samples 0``: the stages' own tokens): a training run reads shards
of thousands of samples (CC12M's hold 10,000), where a few dozen photos would make shards so small
that opening 12 files per shard, not reading samples, is what gets timed. ``--root`` measures an
existing root instead (e.g. after ``make demo``). ``--synthetic N`` writes N samples of
``--crops`` crops with the store's own writer instead, for (a)-(c) at scale. Synthetic stores hold
maps of 196 ids (256 for DINOv2) from a 1024-code book, sequences of 5-60 ids from a ~5000-word
vocabulary, Zipf-like and i.i.d. (real VQ maps repeat neighbouring codes and compress better), ~2%
absent rows per modality, each sample's crops drawn as the tokenize stage draws them.

    .venv/bin/python bench/tokens.py [--images 32] [--crops 4] [--read-samples 2000] [--root DATASET_ROOT]
        [--synthetic 20000]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import webdataset as wds
from common import make_images, write_images_root

from four_m.core.config import Config, CropConfig, TokenizeConfig, load_config
from four_m.core.crops import crops_array, draw_crops
from four_m.core.dataset_root import shard_name
from four_m.core.modalities import MODALITIES, ModalitySpec, map_modalities
from four_m.pipeline.executor import ray_session
from four_m.pipeline.label import run_label
from four_m.pipeline.tokenize import run_tokenize
from four_m.pipeline.tokenizers import run_tokenizer_training
from four_m.tokenize.base import TOKEN_DTYPE
from four_m.tokenize.store import COMPRESSION, CROPS, token_schema, token_table, write_tokens
from four_m.train.data import CROPS as SAMPLE_CROPS
from four_m.train.data import TokenShards, draw_crop

CODEBOOK = 1024  # VQConfig's default codebook size
TEXT_VOCAB = 30_000  # TextTokenizerConfig's default WordPiece size
WORDS = 5_000  # distinct words a caption set actually uses
SEQUENCE_LENGTHS = (5, 60)
ABSENT = 0.02
ABSENT_REASON = "synthetic: label failed upstream"
CODECS = ("zstd", "snappy", "none")
SEED, EPOCH = 0, 0
"""``draw_crop``'s seed and epoch in every reader, so they all pick the same crop of a sample."""
CROP = "crop"
"""The crop-column layout's column: the crop number of the row (its sample's rows in crop order)."""
PAD = -1
"""Pads the crops of a ragged modality (boxes) to one ``[n_crops, longest]`` array in the tars."""
TAR_BLOCK = 512

Sample = dict[str, np.ndarray | None]
"""Modality -> its ids (of the crop drawn, for a cropped modality), None where absent."""
Reader = Callable[[], Iterable[tuple[str, Sample]]]
"""A fresh pass over every sample, as (key, sample)."""
Shards = list[tuple[str, dict[str, Path]]]
"""Each shard's name and its token file per modality."""


def zipf_probabilities(vocab: int, rng: np.random.Generator) -> np.ndarray:
    """Usage ~ 1/rank over ids in random order: a few ids common, most rare, as in codebooks and text."""
    weights = 1.0 / np.arange(1, vocab + 1)
    return rng.permutation(weights / weights.sum())


def synthetic_ids(spec: ModalitySpec, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` id arrays of one modality: maps of ``max_tokens`` codes, or word sequences."""
    if spec.layout == "map":
        grid = rng.choice(CODEBOOK, size=(count, spec.max_tokens), p=zipf_probabilities(CODEBOOK, rng))
        return list(grid.astype(TOKEN_DTYPE))
    words = rng.choice(TEXT_VOCAB, WORDS, replace=False)  # WordPiece ids spread over the vocabulary
    lengths = rng.integers(SEQUENCE_LENGTHS[0], SEQUENCE_LENGTHS[1] + 1, count)
    flat = words[rng.choice(WORDS, lengths.sum(), p=zipf_probabilities(WORDS, rng))].astype(TOKEN_DTYPE)
    return np.split(flat, np.cumsum(lengths)[:-1])


def synthetic_rows(
    spec: ModalitySpec, count: int, n_crops: int, rng: np.random.Generator
) -> list[np.ndarray | list[np.ndarray] | None]:
    """``count`` rows of one modality (a list of ``n_crops`` id arrays if it is cropped), ~``ABSENT`` None."""
    if spec.cropped:
        ids = synthetic_ids(spec, count * n_crops, rng)
        rows: list = [ids[start : start + n_crops] for start in range(0, len(ids), n_crops)]
    else:
        rows = synthetic_ids(spec, count, rng)
    absent = rng.random(count) < ABSENT
    return [None if gone else row for row, gone in zip(rows, absent, strict=True)]


def write_synthetic_store(tokens_dir: Path, samples: int, n_crops: int, per_shard: int, seed: int = 0) -> None:
    """A ``tokens/`` folder written by the store's own schema, table builder and writer, every sample's
    crops drawn as the tokenize stage draws them (the same for every cropped modality)."""
    rng = np.random.default_rng(seed)
    keys = [f"{index:09d}" for index in range(samples)]
    settings = CropConfig(n_crops=n_crops)
    crops = [crops_array(draw_crops(key, settings)) for key in keys]
    row_group_rows = TokenizeConfig().row_group_rows
    for name, spec in MODALITIES.items():
        if not spec.tokenized:
            continue
        rows = synthetic_rows(spec, samples, n_crops, rng)
        vocab = CODEBOOK if spec.layout == "map" else TEXT_VOCAB
        provenance = {"tokenizer": "synthetic", "vocab_size": str(vocab), "max_tokens": str(spec.max_tokens)}
        schema = token_schema(spec.max_tokens if spec.layout == "map" else None, provenance, cropped=spec.cropped)
        for shard, start in enumerate(range(0, samples, per_shard)):
            part = slice(start, start + per_shard)
            errors = [ABSENT_REASON if row is None else None for row in rows[part]]
            table = token_table(keys[part], rows[part], errors, schema, crops[part] if spec.cropped else None)
            write_tokens(tokens_dir / name / f"{shard_name(shard)}.parquet", table, row_group_rows)


def store_shards(tokens_dir: Path) -> Shards:
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


class Ragged:
    """The id lists of a variable-length list array by index, each a view of one buffer."""

    def __init__(self, lists: pa.ListArray) -> None:
        self.flat = uint16_values(lists.values)
        self.offsets = lists.offsets.to_pylist()

    def __getitem__(self, index: int) -> np.ndarray:
        return self.flat[self.offsets[index] : self.offsets[index + 1]]


def id_lists(lists: pa.Array) -> np.ndarray | Ragged:
    """The id lists of a (fixed-size) list array by index: a 2-D view for fixed-size lists."""
    if isinstance(lists.type, pa.FixedSizeListType):
        size = lists.type.list_size
        # .values ignores the array's offset; the slice below applies it.
        flat = uint16_values(lists.values)[lists.offset * size : (lists.offset + len(lists)) * size]
        return flat.reshape(len(lists), size)
    return Ragged(lists)


def nested(tokens_type: pa.DataType) -> bool:
    """Whether a ``tokens`` column holds a list of crops (each a list of ids) per row."""
    return pa.types.is_list(tokens_type) and not pa.types.is_integer(tokens_type.value_type)


@dataclass(frozen=True)
class TokenColumn:
    """One modality's ids in one shard by (sample, crop), whatever the layout: the id lists by entry,
    each sample's first entry (and the end of the last), and whether the sample has the modality."""

    lists: np.ndarray | Ragged
    first: Sequence[int]
    valid: Sequence[bool]
    cropped: bool

    def ids(self, sample: int, crop: int) -> np.ndarray | None:
        if not self.valid[sample]:
            return None
        return self.lists[self.first[sample] + crop] if self.cropped else self.lists[self.first[sample]]

    def crop_counts(self) -> np.ndarray:
        """Crops per sample, 0 where the modality is absent."""
        return np.diff(np.asarray(self.first)) * np.asarray(self.valid)


def token_column(file: pq.ParquetFile) -> tuple[pa.ChunkedArray | pa.Array, TokenColumn]:
    """A token file's sample keys and ids, read on one thread; for either layout of a cropped file."""
    long = CROP in file.schema_arrow.names
    table = file.read(columns=["key", "tokens", *([CROP] if long else [])], use_threads=False)
    tokens = table["tokens"].combine_chunks()
    valid = tokens.is_valid().to_numpy(zero_copy_only=False)
    if long:  # one row per (sample, crop): a sample starts at its crop 0
        starts = np.flatnonzero(table[CROP].to_numpy() == 0)
        first = [*starts.tolist(), len(tokens)]
        return pc.take(table["key"], starts), TokenColumn(id_lists(tokens), first, valid[starts].tolist(), True)
    if nested(tokens.type):
        return table["key"], TokenColumn(id_lists(tokens.values), tokens.offsets.to_pylist(), valid.tolist(), True)
    return table["key"], TokenColumn(id_lists(tokens), range(len(tokens) + 1), valid.tolist(), False)


def read_columns(files: dict[str, Path]) -> tuple[list[str], dict[str, TokenColumn]]:
    """One shard's keys and each modality's column; the modalities must share their keys, in order."""
    columns, keys = {}, None
    for name, path in files.items():
        # A memory map of the file: no filesystem to resolve per file, no copy of its bytes.
        with pa.memory_map(str(path)) as source, pq.ParquetFile(source) as file:
            file_keys, columns[name] = token_column(file)
        assert keys is None or file_keys.equals(keys), f"{path}: keys differ from the other modalities'"
        keys = file_keys
    return keys.to_pylist(), columns


def read_shard(files: dict[str, Path]) -> Iterator[tuple[str, Sample]]:
    """One shard's samples with one crop drawn each: (key, modality -> that crop's ids)."""
    keys, columns = read_columns(files)
    counts = [column.crop_counts() for column in columns.values() if column.cropped]
    # A sample's crop count is its cropped modalities'; 1 if it has none (nothing to pick then).
    crop_counts = np.maximum.reduce([np.ones(len(keys), np.int64), *counts]).tolist()
    for index, (key, count) in enumerate(zip(keys, crop_counts, strict=True)):
        crop = draw_crop(SEED, key, EPOCH, count)
        yield key, {name: column.ids(index, crop) for name, column in columns.items()}


def iter_store(tokens_dir: Path) -> Iterator[tuple[str, Sample]]:
    """Every sample of the store, shard after shard, one crop each: what a training loader reads."""
    for _, files in store_shards(tokens_dir):
        yield from read_shard(files)


def iter_trainer(root: Path, modalities: list[str]) -> Iterator[tuple[str, Sample]]:
    """The same through the trainer's reader: ``TokenShards.read``, then ``view`` of the drawn crop."""
    shards = TokenShards(root, modalities)
    for shard in shards.shards:
        for key, sample in shards.read(shard):
            yield key, shards.view(sample, draw_crop(SEED, key, EPOCH, len(sample[SAMPLE_CROPS])))


def npy_bytes(ids: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, ids)
    return out.getvalue()


def stacked(crops: list[np.ndarray]) -> np.ndarray:
    """A sample's crops as one ``[n_crops, n]`` int16 array (4M's dtype), ragged ones padded with PAD."""
    longest = max(len(crop) for crop in crops)
    out = np.full((len(crops), longest), PAD, np.int16)
    for row, crop in zip(out, crops, strict=True):
        row[: len(crop)] = crop.view(np.int16)
    return out


def tar_members(columns: dict[str, TokenColumn], sample: int) -> dict[str, bytes]:
    """One sample's ``.npy`` members, as 4M saves them: ``[n_crops, n]`` for a cropped modality."""
    members = {}
    for name, column in columns.items():
        if not column.valid[sample]:
            continue
        entries = range(column.first[sample], column.first[sample + 1])
        ids = stacked([column.lists[e] for e in entries]) if column.cropped else column.lists[sample].view(np.int16)
        members[f"{name}.npy"] = npy_bytes(ids)
    return members


def write_webdataset(tokens_dir: Path, out: Path) -> tuple[list[str], dict[str, int]]:
    """The same tokens in the original 4M's format: one tar per shard, one int16 ``.npy`` per modality.

    Absent modalities have no member. Ids are reinterpreted as int16 (4M's dtype): ids above 32767
    would read back negative, but the bytes, which are what is measured here, are the same. Returns
    the tars and the bytes each modality's members take in them (header and padding included).
    """
    out.mkdir(parents=True, exist_ok=True)
    urls, sizes = [], {}
    for shard, files in store_shards(tokens_dir):
        keys, columns = read_columns(files)
        url = str(out / f"{shard}.tar")
        with wds.TarWriter(url) as sink:
            for index, key in enumerate(keys):
                members = tar_members(columns, index)
                sink.write({"__key__": key, **members})
                for member, data in members.items():
                    name = member.removesuffix(".npy")
                    sizes[name] = sizes.get(name, 0) + TAR_BLOCK + -(-len(data) // TAR_BLOCK) * TAR_BLOCK
        urls.append(url)
    return urls, sizes


def picked(stored: np.ndarray | None, crop: int, spec: ModalitySpec) -> np.ndarray | None:
    """The drawn crop of a decoded ``.npy``: its row for a cropped modality, unpadded if ragged."""
    if stored is None or not spec.cropped:
        return stored
    row = stored[crop]
    return row[row != PAD] if spec.layout == "sequence" else row


def iter_webdataset(urls: list[str], modalities: list[str]) -> Iterator[tuple[str, Sample]]:
    """4M's tars read as a loader would: every member decoded, then one crop drawn and picked."""
    specs = {name: MODALITIES[name] for name in modalities}
    for record in wds.WebDataset(urls, shardshuffle=False).decode():
        key = record["__key__"]
        stored = {name: record.get(f"{name}.npy") for name in modalities}
        count = max((a.shape[0] for n, a in stored.items() if a is not None and specs[n].cropped), default=1)
        crop = draw_crop(SEED, key, EPOCH, count)
        yield key, {name: picked(ids, crop, specs[name]) for name, ids in stored.items()}


def present(samples: Iterable[tuple[str, Sample]]) -> Iterator[tuple[str, Sample]]:
    """The samples with at least one modality: the trainer's reader skips the others."""
    return ((key, sample) for key, sample in samples if any(ids is not None for ids in sample.values()))


def check_same_tokens(readers: dict[str, Reader]) -> None:
    """Read every format once side by side (warming the page cache) and assert they pick the same ids."""
    (first, _), *others = readers.items()
    for rows in zip(*(present(read()) for read in readers.values()), strict=True):
        key, sample = rows[0]
        for name, (other_key, other) in zip((n for n, _ in others), rows[1:], strict=True):
            assert other_key == key, f"{name}: key {other_key} where {first} has {key}"
            for modality, ids in sample.items():
                theirs = other[modality]
                assert (ids is None) == (theirs is None), f"{key}/{modality}: present in {first} xor {name}"
                same = ids is None or np.array_equal(ids.view(np.int16), theirs.view(np.int16))
                assert same, f"{key}/{modality}: {name}'s ids differ from {first}'s"


def best_rate(read: Reader, repeats: int) -> float:
    """Samples/s of the fastest full pass: other load on the machine can only slow a pass down."""
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        count = sum(1 for _ in read())
        best = max(best, count / (time.perf_counter() - started))
    return best


def draw_rate(keys: list[str], n_crops: int, repeats: int) -> float:
    """``draw_crop`` calls per second alone: every reader pays it once per sample."""
    return best_rate(lambda: (draw_crop(SEED, key, EPOCH, n_crops) for key in keys), repeats)


def flat_ids(tokens: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Every id present in a tokens column (every crop of every present row)."""
    flat = pc.list_flatten(tokens)
    return flat_ids(flat) if pa.types.is_list(flat.type) or pa.types.is_fixed_size_list(flat.type) else flat


def payload_bytes(path: Path) -> int:
    """2 bytes per id actually present in one token file (null rows count nothing)."""
    return 2 * len(flat_ids(pq.read_table(path, columns=["tokens"])["tokens"]))


def crops_column_bytes(path: Path) -> int:
    """Bytes of a token file's ``crops`` column (compressed, as on disk), from its footer."""
    meta = pq.ParquetFile(path).metadata
    groups = (meta.row_group(g) for g in range(meta.num_row_groups))
    chunks = (group.column(c) for group in groups for c in range(group.num_columns))
    return sum(chunk.total_compressed_size for chunk in chunks if chunk.path_in_schema.split(".")[0] == CROPS)


def store_crops(shards: Shards) -> int:
    """Crops per sample of the store: the most any row of a cropped file holds (1 if none is cropped)."""
    files = [path for _, modality_files in shards for path in modality_files.values()]
    cropped = [path for path in files if CROPS in pq.read_schema(path).names]
    lengths = (pc.max(pc.list_value_length(pq.read_table(p, columns=[CROPS])[CROPS])).as_py() for p in cropped)
    return max(lengths, default=1)


def with_leaf(data_type: pa.DataType, leaf: pa.DataType) -> pa.DataType:
    """``data_type`` with the integer type inside its (nested, fixed-size) lists replaced by ``leaf``."""
    if pa.types.is_fixed_size_list(data_type):
        return pa.list_(with_leaf(data_type.value_type, leaf), data_type.list_size)
    return pa.list_(with_leaf(data_type.value_type, leaf)) if pa.types.is_list(data_type) else leaf


def as_stored(tokens: pa.ChunkedArray) -> pa.ChunkedArray:
    return tokens


def as_int32_list(tokens: pa.ChunkedArray) -> pa.ChunkedArray:
    return tokens.cast(with_leaf(tokens.type, pa.int32()))


def as_raw_bytes(tokens: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Each id list as little-endian uint16 bytes in one binary value (a list of them per row for a
    cropped file): no list of ids for Parquet to encode."""
    array = tokens.combine_chunks() if isinstance(tokens, pa.ChunkedArray) else tokens
    if nested(array.type):
        return pa.ListArray.from_arrays(array.offsets, as_raw_bytes(array.values), mask=array.is_null())
    lists, valid = id_lists(array), array.is_valid().to_pylist()
    return pa.array([lists[i].astype("<u2").tobytes() if ok else None for i, ok in enumerate(valid)], pa.binary())


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


def layout_bytes(shards: Shards) -> dict[tuple[str, str, bool], dict[str, int]]:
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


def as_crop_rows(table: pa.Table) -> pa.Table:
    """A cropped token table in the other layout: one row per (sample, crop), with its ``crop``
    number and crop box; an absent sample keeps its crops' rows, with null tokens and its error."""
    tokens = table["tokens"].combine_chunks()
    counts = pc.list_value_length(table[CROPS]).to_numpy(zero_copy_only=False)
    sample = np.repeat(np.arange(len(table)), counts)
    crop = np.arange(len(sample)) - np.repeat(np.cumsum(counts) - counts, counts)
    kept = tokens.is_valid().to_numpy(zero_copy_only=False)[sample]
    entry = np.cumsum(kept) - 1  # a present row's crops are the next entries of the flattened column
    ids = pc.take(pc.list_flatten(tokens), pa.array(entry, mask=~kept))
    columns = {
        "key": pc.take(table["key"], sample),
        CROP: pa.array(crop, pa.uint8()),
        "tokens": ids,
        CROPS: pc.list_flatten(table[CROPS]),
        "error": pc.take(table["error"], sample),
    }
    return pa.table(columns).replace_schema_metadata(table.schema.metadata)


def write_crop_rows(shards: Shards, out: Path, n_crops: int) -> Path:
    """The store with its cropped files in the crop-column layout (the others copied) under ``out``;
    row groups of as many samples as the store's."""
    for _, files in shards:
        for name, path in files.items():
            target = out / name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if CROPS not in pq.read_schema(path).names:
                shutil.copyfile(path, target)
                continue
            row_group_rows = pq.ParquetFile(path).metadata.row_group(0).num_rows
            write_tokens(target, as_crop_rows(pq.read_table(path)), row_group_rows * n_crops)
    return out


def print_sizes(shards: Shards, tar_sizes: dict[str, int], n_crops: int) -> dict[str, int]:
    """Table (a): the store on disk against the payload and 4M's tars; returns the payload per modality."""
    modalities = list(shards[0][1])
    samples = sum(pq.ParquetFile(files[modalities[0]]).metadata.num_rows for _, files in shards)
    payload = {name: sum(payload_bytes(files[name]) for _, files in shards) for name in modalities}
    disk = {name: sum(files[name].stat().st_size for _, files in shards) for name in modalities}
    crops_of = {name: n_crops if CROPS in pq.read_schema(shards[0][1][name]).names else 1 for name in modalities}
    print(f"(a) bytes per sample, {samples} samples, {n_crops} crops each: tokens/ on disk vs the raw uint16 payload")
    print("    (2 B x ids present, every crop) vs 4M's .npy in tar members holding the same [n_crops, n] tokens")
    header = f"{'modality':13s} {'crops':>5s} {'store B':>8s} {'per crop':>8s} {'payload B':>9s} {'/payload':>8s}"
    print(f"    {header} {'tar B':>7s} {'/payload':>8s}")
    for name in modalities:
        store, tar, raw = disk[name] / samples, tar_sizes[name] / samples, payload[name] / samples
        row = f"{name:13s} {crops_of[name]:5d} {store:8.1f} {store / crops_of[name]:8.1f} {raw:9.1f}"
        print(f"    {row} {disk[name] / payload[name]:7.2f}x {tar:7.0f} {tar_sizes[name] / payload[name]:7.2f}x")
    store, tar, raw = sum(disk.values()), sum(tar_sizes.values()), sum(payload.values())
    row = f"{'total':13s} {'':5s} {store / samples:8.1f} {store / samples / n_crops:8.1f} {raw / samples:9.1f}"
    print(f"    {row} {store / raw:7.2f}x {tar / samples:7.0f} {tar / raw:7.2f}x  (goal: store <= 0.5x)")
    boxes = sum(crops_column_bytes(path) for _, files in shards for path in files.values())
    print(f"    of the store's, the crops columns (5 float32 per crop, in every cropped file): {boxes / samples:.1f} B")
    return payload


def print_layouts(shards: Shards, payload: dict[str, int]) -> None:
    """The same tokens in every candidate encoding, as ratios to the payload; * marks the store's."""
    sizes = layout_bytes(shards)
    modalities = list(payload)
    print("    same tokens re-encoded (same shards and row groups), ratio to payload; * = the store's encoding")
    print(f"    {'tokens':12s} {'codec':6s} {'dict':4s} " + " ".join(f"{n[:7]:>7s}" for n in modalities) + "   total")
    store_layout = (next(iter(TOKEN_LAYOUTS)), COMPRESSION, True)
    for (layout, codec, dictionary), per_modality in sizes.items():
        mark = "*" if (layout, codec, dictionary) == store_layout else " "
        ratios = " ".join(f"{per_modality[n] / payload[n]:7.2f}" for n in modalities)
        total = sum(per_modality.values()) / sum(payload.values())
        print(f"  {mark} {layout:12s} {codec:6s} {'on' if dictionary else 'off':4s} {ratios} {total:7.2f}")


def print_read_rates(rates: dict[str, float], draws: float, modalities: int, repeats: int, samples: str) -> None:
    """Figures (b): the store against 4M's tars, one core, one crop drawn per sample."""
    where = f"one core, page cache warm, best of {repeats}"
    print(f"(b) reading all {modalities} modalities, one crop drawn per sample, {where}; {samples}")
    labels = {
        "store": "store (pyarrow, rows zipped by key, drawn crop picked)",
        "trainer": "store through the trainer's TokenShards.read + view",
        "tars": "4M's tars: decode each [n_crops, n] .npy, pick the crop",
    }
    for name, label in labels.items():
        print(f"    {label:56s} {rates[name]:9.0f} samples/s")
    print(f"    {'draw_crop alone (in every reader above)':56s} {draws:9.0f} draws/s")
    print(f"    ratio store / tars: {rates['store'] / rates['tars']:.1f}x  (goal >= 10x)")


def print_crop_layouts(
    layouts: dict[str, Path], rates: dict[str, float], payload: dict[str, int], n_crops: int
) -> None:
    """Figures (c): a list of crops per row against a crop column, bytes and read speed side by side."""
    store = layouts["store"]
    cropped = [name for name in payload if CROPS in pq.read_schema(next((store / name).glob("*.parquet"))).names]
    samples = sum(pq.ParquetFile(path).metadata.num_rows for path in (store / cropped[0]).glob("*.parquet"))
    raw = sum(payload[name] for name in cropped)
    print(f"(c) layout of the {len(cropped)} cropped modalities; bytes of those, reading as in (b)")
    print(f"    {'layout':45s} {'B/sample':>9s} {'per crop':>8s} {'/payload':>8s} {'samples/s':>10s}")
    labels = {"store": "a list of crops per row (the store's)", "crop column": "a crop column (a row per sample, crop)"}
    for name, label in labels.items():
        disk = sum(path.stat().st_size for m in cropped for path in (layouts[name] / m).glob("*.parquet"))
        mark = "*" if name == "store" else " "
        figures = f"{disk / samples:9.1f} {disk / samples / n_crops:8.1f} {disk / raw:7.2f}x {rates[name]:10.0f}"
        print(f"  {mark} {label:45s} {figures}")


def measure_bytes(tokens_dir: Path, work: Path) -> None:
    """(a) for one ``tokens/`` folder, its layouts included; ``work`` receives the tars."""
    shards = store_shards(tokens_dir)
    _, tar_sizes = write_webdataset(tokens_dir, work / "webdataset")
    print_layouts(shards, print_sizes(shards, tar_sizes, store_crops(shards)))


def measure_reads(tokens_dir: Path, work: Path, repeats: int) -> None:
    """(b) and (c) for one ``tokens/`` folder; ``work`` receives the tars and the other layout."""
    shards = store_shards(tokens_dir)
    modalities = list(shards[0][1])
    n_crops = store_crops(shards)
    urls, _ = write_webdataset(tokens_dir, work / "webdataset")
    payload = {name: sum(payload_bytes(files[name]) for _, files in shards) for name in modalities}
    crop_rows = write_crop_rows(shards, work / "crop-column" / "tokens", n_crops)
    readers: dict[str, Reader] = {
        "store": lambda: iter_store(tokens_dir),
        "crop column": lambda: iter_store(crop_rows),
        "tars": lambda: iter_webdataset(urls, modalities),
        "trainer": lambda: iter_trainer(tokens_dir.parent, modalities),
    }
    check_same_tokens(readers)
    rates = {name: best_rate(read, repeats) for name, read in readers.items()}
    keys = [key for key, _ in iter_store(tokens_dir)]
    samples = f"{len(keys)} samples in {len(shards)} shards of {n_crops} crops"
    print_read_rates(rates, draw_rate(keys, n_crops, repeats), len(modalities), repeats, samples)
    print_crop_layouts({"store": tokens_dir, "crop column": crop_rows}, rates, payload, n_crops)


def stage_config(root: Path, overrides: list[str]) -> Config:
    # Tokenizers train one step: the tokenize stage's speed does not depend on their quality.
    quick = [f"tokenize.{m}.steps=1" for m in map_modalities()]
    return load_config("default", [*quick, *overrides], root=str(root))


def pipeline_root(work: Path, images: int, per_shard: int, overrides: list[str], n_crops: int) -> tuple[Path, dict]:
    """A dataset root made by the real stages: generated photos -> label -> tokenizers -> tokenize,
    tokenized at 1 crop and then, over the same labels and tokenizers, at ``n_crops``; the root
    (its tokens of ``n_crops`` crops) and each tokenize run's summary by crops."""
    photos = work / "photos"
    photos.mkdir()
    names = make_images(photos, images)
    root = work / "root"
    write_images_root(root, [photos / n for n in names], per_shard)
    config = stage_config(root, overrides)
    summaries = {}
    with ray_session(config.ray):  # one Ray for every stage, started as a stage starts it
        started = time.perf_counter()
        run_label(config, progress=False)
        labelled = time.perf_counter()
        run_tokenizer_training(config)
        trained = time.perf_counter()
        for crops in dict.fromkeys((1, n_crops)):
            if summaries:  # another crop setting: the tokens of the last one would be stale
                shutil.rmtree(root / "tokens")
                shutil.rmtree(root / "_state/tokenize")
            run_tokenize(stage_config(root, [*overrides, f"tokenize.crops.n_crops={crops}"]), progress=False)
            summaries[crops] = tokenize_summary(root)
    print(
        f"stages: label {labelled - started:.0f} s, tokenizer training {trained - labelled:.0f} s,"
        f" tokenize twice {time.perf_counter() - trained:.0f} s"
    )
    return root, summaries


def tokenize_summary(root: Path) -> dict:
    return json.loads((root / "_state/tokenize/summary.json").read_text())


def print_tokenize_rates(summaries: dict[int, dict]) -> None:
    """(d) from the runs that made the tokens: rows over each stage run's own wall time."""
    print("(d) tokenize stage by crops per sample, from its summary (actors' start, tokenizer loading included)")
    for crops, summary in summaries.items():
        rows = max(m["rows_in"] for m in summary["modalities"].values())
        seconds = summary["seconds"]
        if rows == 0:
            print(f"    n_crops={crops:<2d} its last run tokenized nothing (every shard was done already)")
            continue
        done = f"{rows} samples x {len(summary['modalities'])} modalities in {seconds:6.1f} s"
        print(f"    n_crops={crops:<2d} {done} = {rows / seconds:6.1f} samples/s")
    if len(summaries) == 2:
        (one, single), (many, multi) = summaries.items()
        ratio = multi["seconds"] / single["seconds"]
        print(f"    time at {many} crops / at {one}: {ratio:.2f}x  (goal <= {many}x: it grows at most with the crops)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="measure an existing dataset root's tokens/")
    parser.add_argument("--images", type=int, default=32, help="photos through the real stages (no --root)")
    parser.add_argument("--crops", type=int, default=4, help="crops per sample: synthetic store, tokenize run")
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--synthetic", type=int, metavar="SAMPLES", help="a synthetic store instead, for (a)-(c)")
    parser.add_argument(
        "--read-samples",
        type=int,
        default=2000,
        help="with the real stages: (b)-(c) read a synthetic store of this many samples (0: the stages' tokens)",
    )
    parser.add_argument("--read-per-shard", type=int, default=2000, help="samples per shard of that store")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root, summaries = args.root, {}
        if args.synthetic:
            write_synthetic_store(work / "tokens", args.synthetic, args.crops, args.per_shard)
            root = work
        elif root is None:
            root, summaries = pipeline_root(work, args.images, args.per_shard, args.overrides, args.crops)
        else:
            summaries = {store_crops(store_shards(root / "tokens")): tokenize_summary(root)}
        read_root = root
        if root == work / "root" and args.read_samples:
            # Training reads shards of thousands of samples: per-file costs then weigh as they will.
            read_root = work / "read"
            write_synthetic_store(read_root / "tokens", args.read_samples, args.crops, args.read_per_shard)
        # One core from here: Arrow would otherwise decode columns and row groups on its thread pools.
        pa.set_cpu_count(1)
        pa.set_io_thread_count(1)
        measure_bytes(root / "tokens", work / "bytes")
        measure_reads(read_root / "tokens", work / "reads", args.repeats)
        if summaries:
            print_tokenize_rates(summaries)


if __name__ == "__main__":
    main()
