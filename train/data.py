"""Training data: the token store (``tokens/<modality>/<shard>.parquet``) streamed as masked batches.

Three layers, each usable alone:

- :class:`TokenShards` finds the shards every requested modality has and reads one shard by
  zipping its modality files row by row, one Parquet row group at a time, checking that the keys
  agree. A row where every modality is absent is skipped and counted (``empty_rows``).
- :class:`TokenStream`, the ``IterableDataset``: Lightning adds no distributed sampler to an
  iterable dataset, so the stream splits the work across DDP ranks *and* DataLoader workers itself,
  shuffles, masks and collates (in the workers), and repeats forever.
- :class:`TokenDataModule` hands it to Lightning and carries the resume position in checkpoints.

Choices (the why is in each docstring):

- A pixel input (``rgb_pixels``, 4M's ``rgb@224``) is read from ``images/`` beside the tokens: the
  same shard, row for row (the tokenize stage keeps ``images/``'s rows), its key checked like a
  token file's. The JPEG is decoded only for the rows a stream keeps, after a resumed stream's
  fast-forward, and cut exactly as the RGB tokens were (:func:`four_m.core.views.label_view`), so
  pixels and tokens show the same view. Decoding beats storing the crop: ``images/`` is already
  there, 150 KB per sample of raw pixels is not, and a different crop later (4M's multi-crop) needs
  the whole image. A row whose image failed to download has no pixels (an absent input); one that
  does not decode is absent too and counted (``undecodable_images``).
- A shard must exist for every requested modality: one missing is an error that names the file,
  unless ``skip_incomplete`` (then it is left out and listed in ``TokenShards.skipped``). Token
  files are written atomically, so a file that exists is complete.
- What a stream passes over (empty rows, rows lacking a task's modality, images that do not
  decode) is counted where it is read, in a worker, and travels to the main process with the next
  batch (:class:`StreamBatch`); the data module sums it (``passed_over``) for the train summary.
- Every id read is checked against the ``four_m.vocab_size`` its file declares (the trainer checks
  that against the tokenizers and the model): one out of range is an error naming the file, the
  modality, the id and its row, not an ``IndexError`` in the embedding. A worker's such error
  reaches the main process as an item (:class:`WorkerError`), so it stays one line.
- Work is split in *units*, dealt round-robin by index to the ``world_size * num_workers``
  streams. A unit is a whole shard; when there are more streams than shards, each shard is cut into
  ``ceil(streams / shards)`` row-strided parts (row ``i`` of a shard goes to part ``i % parts``), so
  no stream is left without data (it still reads whole row groups, the price of few shards).
- Every stream repeats its units epoch after epoch (its own epoch counter) and never ends, so every
  rank yields as many batches as the trainer asks for: train to ``max_steps``. Unequal shard sizes
  only make some streams start their next epoch sooner.
- Everything is a function of (seed, epoch, stream, streams): the unit order and the shuffle buffer
  use ``default_rng((seed, epoch, stream, streams))``; a sample's mask uses
  ``masker.sample_rng(hash(key), epoch)``, so it does not depend on which worker drew it.
- Resume: the position is the number of batches the trainer has consumed on a rank. A resumed
  stream recomputes the shuffle up to there and skips the masking and collation of the skipped
  samples; DataLoader workers hand out batches round-robin, so a resumed loader rotates the
  workers' roles to continue with exactly the next batch.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from types import MappingProxyType
from typing import Any

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from four_m.core import storage
from four_m.core.crops import FIELDS, WHOLE, Crop, crops_array
from four_m.core.curation import removed_rows
from four_m.core.dataset_root import DatasetRoot
from four_m.core.errors import UserError
from four_m.core.failures import SUCCESS
from four_m.core.modalities import pixel_inputs
from four_m.core.views import label_view
from four_m.tokenize.store import CROPS as CROPS_COLUMN
from four_m.train.batch import MaskedBatch
from four_m.train.masking import Masker, ModalityInfo

TOKENS = "tokens"
IMAGES = "images"
Sample = dict[str, Any]
"""Modality -> its uint16 ids (a pixel input: its encoded image bytes, then once decoded its
(S, S, 3) uint8 view), None where absent (the masker's input, decoded). As read, a cropped
modality holds its ids per crop (maps: a (n_crops, n) array; boxes: a list of arrays), and
:data:`CROPS` the row's (n_crops, 5) crops; :meth:`TokenShards.view` picks one crop."""
CROPS = "@crops"
"""The sample entry of the row's crops (not a modality name: those are lower-case identifiers)."""
CROP_DRAW = 0x43524F50
"""Mixed into the seed of a sample's crop draw, so it is independent of its masks."""


class TokenStoreError(UserError):
    """A token store the trainer cannot use: missing or misaligned shards, disagreeing metadata."""


@dataclass(frozen=True)
class TokenShard:
    name: str
    """The shard's file stem (``00000``), the same in every modality's folder."""
    files: Mapping[str, Path]
    """Modality -> its token file."""


def _shard_files(root: Path, modality: str) -> dict[str, Path]:
    if modality in pixel_inputs():
        folder = root / IMAGES
        files = {p.stem: p for p in folder.glob("*.parquet") if not p.name.startswith(".")}
        if not files:
            raise TokenStoreError(
                f"no image shards in {folder} for the pixel input {modality!r}: leave {modality} out of"
                " train.modalities to train on the token store alone"
            )
        return files
    folder = root / TOKENS / modality
    files = {p.stem: p for p in folder.glob("*.parquet") if not p.name.startswith(".")}
    if not files:
        raise TokenStoreError(f"no token shards for modality {modality!r} in {folder}; run the tokenize stage")
    return files


PASSED_OVER: Mapping[str, str] = MappingProxyType(
    {
        "empty_rows": "rows with no modality",
        "incomplete_rows": "rows lacking a task modality",
        "undecodable_images": "images that did not decode (absent inputs)",
        "curated_rows": "rows curation removed (its current decisions, curation/decisions/)",
    }
)
"""The counters of what :class:`TokenShards` passes over while reading (each time it reads it), in words."""


class TokenShards:
    """The shards of a dataset root's token store that every requested modality has.

    Args:
        root: the dataset root (holding ``tokens/<modality>/``).
        modalities: the run's modalities; a sample is the zip of their files.
        skip_incomplete: leave out a shard that some modality lacks (and list it in ``skipped``)
            instead of raising. Off by default: training silently on a subset of the data is worse
            than being told the tokenize stage has not finished.
        holdout: the last ``holdout`` complete shards (by name) go to ``held_out`` instead of
            ``shards``: never trained on, they are what ``make eval`` and ``make sample`` read. By
            name, so the split is the same on every rank and every rerun.
        required: modalities a row must have to be read (a task's): rows lacking one are skipped
            and counted in ``incomplete_rows``.
    """

    def __init__(
        self,
        root: str | Path,
        modalities: Sequence[str],
        *,
        skip_incomplete: bool = False,
        holdout: int = 0,
        required: Sequence[str] = (),
    ) -> None:
        self.root = storage.location(root)
        self.modalities = tuple(modalities)
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"needs distinct modalities, got {self.modalities}")
        found = {m: _shard_files(self.root, m) for m in self.modalities}
        names = sorted(set().union(*found.values()))
        incomplete = {n: [m for m in self.modalities if n not in found[m]] for n in names}
        incomplete = {n: missing for n, missing in incomplete.items() if missing}
        if incomplete and not skip_incomplete:
            lines = [f"{self.root / TOKENS / m / n}.parquet" for n, missing in incomplete.items() for m in missing]
            more = f" (and {len(lines) - 5} more)" if len(lines) > 5 else ""
            raise TokenStoreError(
                f"{len(incomplete)} shard(s) lack a modality's tokens: missing {', '.join(lines[:5])}{more}; "
                "run the tokenize stage for them, or skip them with skip_incomplete"
            )
        self.skipped: tuple[str, ...] = tuple(incomplete)
        complete = [TokenShard(n, {m: found[m][n] for m in self.modalities}) for n in names if n not in incomplete]
        if not complete:
            raise TokenStoreError(f"no shard under {self.root / TOKENS} has tokens for all of {self.modalities}")
        if not 0 <= holdout < len(complete):
            raise TokenStoreError(
                f"cannot hold out {holdout} of the {len(complete)} complete token shard(s) under {self.root / TOKENS}:"
                " training needs at least one (lower train.holdout_shards, or tokenize more shards)"
            )
        self.shards = tuple(complete[: len(complete) - holdout])
        self.held_out = tuple(complete[len(complete) - holdout :])
        self.empty_rows = 0
        """Rows skipped because every modality was absent, counted each time they are read (in this process)."""
        self.required = tuple(required)
        self.incomplete_rows = 0
        """Rows skipped because a ``required`` modality was absent (in this process)."""
        self.pixel_sides = {name: spec.pixel_side for name, spec in pixel_inputs(self.modalities).items()}
        """Pixel input name -> the side of its decoded images."""
        self.undecodable_images = 0
        """Pixel inputs left absent because their stored image did not decode (in this process)."""
        self.curated_rows = 0
        """Rows skipped because curation removed them (in this process)."""
        self.crop_settings = _crop_settings(complete[0], self.modalities)
        """The ``tokenize.crops`` the cropped modalities were tokenized under (from the first shard's
        metadata; rows are checked as they are read), None for a store without crops."""

    def passed_over(self) -> dict[str, int]:
        """What reading has passed over so far in this process: :data:`PASSED_OVER` -> count."""
        return {reason: getattr(self, reason) for reason in PASSED_OVER}

    @property
    def crops_per_sample(self) -> int:
        return int(self.crop_settings["n_crops"]) if self.crop_settings else 1

    def __len__(self) -> int:
        return len(self.shards)

    def read(self, shard: TokenShard, part: int = 0, parts: int = 1) -> Iterator[tuple[str, Sample]]:
        """``(key, sample)`` for the rows of ``shard`` whose index ``i`` has ``i % parts == part``.

        Reads one row group of every modality file at a time. Raises :class:`TokenStoreError`
        naming the files when their row counts or keys (row by row) differ, or naming the file and
        row of an id at or past the ``four_m.vocab_size`` its file declares.
        """
        removed = removed_rows(DatasetRoot(self.root), int(shard.name)) if shard.name.isdigit() else {}
        with ExitStack() as stack:
            files = [stack.enter_context(storage.parquet_file(shard.files[m])) for m in self.modalities]
            rows = {shard.files[m]: f.metadata.num_rows for m, f in zip(self.modalities, files, strict=True)}
            if len(set(rows.values())) > 1:
                listed = ", ".join(f"{path}: {n}" for path, n in rows.items())
                raise TokenStoreError(f"shard {shard.name}: the modality files have different row counts ({listed})")
            readers = (
                image_rows(f) if m in self.pixel_sides else _file_rows(f, shard.files[m], m)
                for m, f in zip(self.modalities, files, strict=True)
            )
            columns = zip(*readers, strict=True)
            for index, row in enumerate(columns):
                key = row[0][0]
                if any(other != key for other, _, _ in row[1:]):
                    keys = (k for k, _, _ in row)
                    listed = ", ".join(f"{shard.files[m]}: {k!r}" for m, k in zip(self.modalities, keys, strict=True))
                    raise TokenStoreError(f"shard {shard.name}, row {index}: keys differ ({listed})")
                if index % parts != part:
                    continue
                if key in removed:
                    self.curated_rows += 1
                    continue
                if all(ids is None for _, ids, _ in row):
                    self.empty_rows += 1
                    continue
                sample = {m: ids for m, (_, ids, _) in zip(self.modalities, row, strict=True)}
                if any(sample[m] is None for m in self.required):
                    self.incomplete_rows += 1
                    continue
                crops = [(m, c) for m, (_, _, c) in zip(self.modalities, row, strict=True)]
                sample[CROPS] = self._row_crops(shard, index, crops)
                yield key, sample

    def _row_crops(self, shard: TokenShard, index: int, crops: list[tuple[str, np.ndarray | None]]) -> np.ndarray:
        """The row's crops: those its cropped files store, which must agree (else the modalities were
        tokenized under other crop settings and would not show one region); one whole view if none does."""
        stored = [(m, c) for m, c in crops if c is not None]
        if not stored:
            return crops_array((WHOLE,))
        first_modality, first = stored[0]
        for modality, other in stored[1:]:
            if other.shape != first.shape or not np.array_equal(other, first):
                raise TokenStoreError(
                    f"shard {shard.name}, row {index}: {shard.files[first_modality]} and {shard.files[modality]} hold"
                    " different crops (tokenized under other tokenize.crops settings): retokenize (make tokenize)"
                )
        return first

    def view(self, sample: Sample, crop: int = 0) -> Sample:
        """The sample under its crop number ``crop``: each cropped modality's ids of that crop, each
        pixel input's image cut to that crop and decoded. Crop 0, the whole label view, is what
        generation and ``make eval`` use."""
        crops = sample[CROPS]
        if not 0 <= crop < len(crops):
            raise IndexError(f"crop {crop} of a sample with {len(crops)} crops")
        viewed: Sample = {}
        for name in self.modalities:
            value = sample[name]
            if name in self.pixel_sides and isinstance(value, bytes):
                value = label_view(value, self.pixel_sides[name], Crop.from_row(crops[crop]))
                self.undecodable_images += value is None
            elif isinstance(value, list) or getattr(value, "ndim", 1) == 2:  # a cropped modality's crops
                value = value[crop]
            viewed[name] = value
        return viewed


def _crop_settings(shard: TokenShard, modalities: Sequence[str]) -> dict[str, Any] | None:
    """The crop settings every cropped file of ``shard`` declares (``four_m.crops``), or
    :class:`TokenStoreError` naming two modalities tokenized under different ones."""
    declared = {}
    for modality in modalities:
        if modality in pixel_inputs():
            continue
        crops = (storage.read_schema(shard.files[modality]).metadata or {}).get(b"four_m.crops")
        if crops is not None:
            declared[modality] = json.loads(crops)
    if len({json.dumps(d, sort_keys=True) for d in declared.values()}) > 1:
        listed = "; ".join(f"{m}: {d}" for m, d in declared.items())
        raise TokenStoreError(
            f"shard {shard.name}: the cropped modalities were tokenized under different tokenize.crops ({listed}):"
            " retokenize (make tokenize)"
        )
    return next(iter(declared.values()), None)


def image_rows(file: pq.ParquetFile) -> Iterator[tuple[str, bytes | None, None]]:
    """``images/``'s rows as (key, JPEG bytes, no crops), None where the download failed."""
    for group in range(file.num_row_groups):
        table = file.read_row_group(group, columns=["key", "status", "jpg"])
        rows = zip(*(table.column(c).to_pylist() for c in ("key", "status", "jpg")), strict=True)
        for key, status, data in rows:
            yield key, data if status == SUCCESS and data else None, None


def _file_rows(file: pq.ParquetFile, path: Path, modality: str) -> Iterator[tuple[str, Any, np.ndarray | None]]:
    """(key, ids, crops) per row: a cropped file's ids are one array per crop, with its crops."""
    vocab_size = int(_declared(file.schema_arrow, path)["vocab_size"])
    cropped = file.schema_arrow.get_field_index(CROPS_COLUMN) >= 0
    first_row = 0
    for group in range(file.num_row_groups):
        table = file.read_row_group(group, columns=["key", TOKENS, *([CROPS_COLUMN] if cropped else [])])
        _check_ids(table, vocab_size, path, modality, first_row)
        first_row += table.num_rows
        crops = _crop_rows(table.column(CROPS_COLUMN)) if cropped else [None] * table.num_rows
        yield from zip(table.column("key").to_pylist(), _token_rows(table.column(TOKENS)), crops, strict=True)


def _crop_rows(column: pa.ChunkedArray) -> list[np.ndarray]:
    array = column.combine_chunks()
    lengths = pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(pc.list_flatten(array)).to_numpy(zero_copy_only=False).reshape(-1, len(FIELDS))
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(array) else []


def _check_ids(table: pa.Table, vocab_size: int, path: Path, modality: str, first_row: int) -> None:
    """Every id of a row group is below ``vocab_size``, else :class:`TokenStoreError` naming the first bad one.

    An id past the vocabulary would index past the model's embedding table: an ``IndexError`` deep in
    a forward pass that names no file. One vectorised max per row group; rows are searched only then.
    """
    tokens = table.column(TOKENS)
    top = pc.max(_flat_ids(tokens)).as_py()
    if top is None or top < vocab_size:
        return
    for index, (key, ids) in enumerate(zip(table.column("key").to_pylist(), tokens.to_pylist(), strict=True)):
        ids = [i for crop in ids or () for i in crop] if _nested(tokens.type) else ids
        bad = next((i for i in ids or () if i >= vocab_size), None)
        if bad is not None:
            raise TokenStoreError(
                f"{path}: {modality} token id {bad} at row {first_row + index} (key {key!r}) is out of range:"
                f" the vocabulary has {vocab_size} ids; retokenize this shard (make tokenize)"
            )


def _nested(tokens_type: pa.DataType) -> bool:
    """Whether a ``tokens`` column holds a list of crops (each a list of ids) per row."""
    return pa.types.is_list(tokens_type) and not pa.types.is_integer(tokens_type.value_type)


def _flat_ids(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    flat = pc.list_flatten(column)
    return pc.list_flatten(flat) if _nested(column.type) else flat


def _token_rows(column: pa.ChunkedArray | pa.Array) -> list[Any]:
    """One uint16 array per row (views of one buffer), None for null rows; lists and fixed-size
    lists. A column of crops gives per row a (n_crops, n) array for maps (views too) and a list of
    per-crop arrays for boxes, indexed by crop either way."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(array) == 0:
        return []
    lengths = pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False)
    inner = pc.list_flatten(array)  # skips null rows' slots
    if not _nested(array.type):
        flat = inner.to_numpy(zero_copy_only=False)
    elif isinstance(inner.type, pa.FixedSizeListType):  # maps: every crop the same length
        flat = pc.list_flatten(inner).to_numpy(zero_copy_only=False).reshape(-1, inner.type.list_size)
    else:  # boxes: crops of their own lengths
        flat = _token_rows(inner)
    ends = np.cumsum(lengths)
    pieces = [flat[end - n : end] for n, end in zip(lengths.tolist(), ends.tolist(), strict=True)]
    nulls = array.is_null().to_numpy(zero_copy_only=False)
    return [None if null else ids for null, ids in zip(nulls, pieces, strict=True)]


VOCABULARY_KEYS = ("vocab_size", "max_tokens", "tokenizer")
"""The token files' metadata (``four_m.<key>``) that :func:`store_vocabularies` reads."""


def store_vocabularies(root: str | Path, modalities: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per modality, what its token files say about their ids: ``vocab_size`` (int), ``max_tokens``
    (int), ``tokenizer`` (``<modality>-<hash of the tokenizer's files>``) and ``fixed_length`` (bool,
    True for maps: a fixed-size list column). For the trainer to check against the model.

    Every file of the modality is read (footers only); :class:`TokenStoreError` names two files that
    disagree (a tokenizer changed between shards) or a file without the metadata.
    """
    out = {}
    for modality in modalities:
        first: tuple[dict[str, Any], Path] | None = None
        for path in sorted(_shard_files(storage.location(root), modality).values()):
            schema = storage.read_schema(path)
            meta = _declared(schema, path)
            tokens_type = schema.field(TOKENS).type
            ids_type = tokens_type.value_type if _nested(tokens_type) else tokens_type
            vocabulary = {
                "vocab_size": int(meta["vocab_size"]),
                "max_tokens": int(meta["max_tokens"]),
                "tokenizer": meta["tokenizer"],
                "fixed_length": isinstance(ids_type, pa.FixedSizeListType),
            }
            if first is None:
                first = vocabulary, path
            elif vocabulary != first[0]:
                raise TokenStoreError(f"{modality}: {first[1]} has {first[0]} but {path} has {vocabulary}")
        assert first is not None  # _shard_files raises when there is no file
        out[modality] = first[0]
    return out


def _declared(schema: pa.Schema, path: Path) -> dict[str, str]:
    """The :data:`VOCABULARY_KEYS` a token file's metadata declares; :class:`TokenStoreError` if any is missing."""
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    missing = [k for k in VOCABULARY_KEYS if f"four_m.{k}" not in meta]
    if missing:
        raise TokenStoreError(f"{path}: no {missing} in its metadata (not written by the tokenize stage?)")
    return {k: meta[f"four_m.{k}"] for k in VOCABULARY_KEYS}


def check_store(vocabularies: Mapping[str, Mapping[str, Any]], modalities: Sequence[ModalityInfo]) -> None:
    """The stored tokens fit the run's modalities: maps hold exactly their grid, sequences at most their cap."""
    problems = []
    for info in modalities:
        stored = vocabularies[info.name]
        fixed, length = stored["fixed_length"], stored["max_tokens"]
        if info.layout == "map" and (not fixed or length != info.num_tokens):
            problems.append(f"{info.name}: the run wants maps of {info.num_tokens} tokens, the store has {stored}")
        if info.layout == "sequence" and (fixed or length > info.num_tokens):
            problems.append(f"{info.name}: the run wants sequences of <= {info.num_tokens} tokens, has {stored}")
    if problems:
        raise TokenStoreError("; ".join(problems))


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def key_index(key: str) -> int:
    """A stable 63-bit index of a sample key, for :meth:`Masker.sample_rng` (Python's ``hash`` is salted)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def draw_crop(seed: int, key: str, epoch: int, crops: int) -> int:
    """Which of a sample's ``crops`` crops it shows in ``epoch`` (4M draws one per example): a function
    of (seed, key, epoch) alone, like its masks, so any worker and a resumed run draw the same."""
    return int(np.random.default_rng((seed, CROP_DRAW, key_index(key), epoch)).integers(crops))


@dataclass(frozen=True)
class Unit:
    """Rows ``i % parts == part`` of shard number ``shard``: what one stream reads in one go."""

    shard: int
    part: int
    parts: int


class TokenStream(IterableDataset):
    """Endless masked batches of one rank, split across that rank's DataLoader workers.

    Use with ``DataLoader(stream, batch_size=None)``: batches are collated here, in the workers.

    Args:
        shards: the token store.
        masker: masks each sample and collates; its modalities should be ``shards.modalities``.
        batch_size: samples per batch (per rank).
        shuffle_buffer: samples held for shuffling; 0 reads units and rows in order (evaluation,
            tests). Mixing is across the units a stream reads in turn, whose order is shuffled per epoch.
        seed: of the unit order and the shuffle buffer (the masks follow ``masker.seed``).
        rank, world_size: this process's place in DDP; None reads the initialised process group
            (at construction, in the main process: workers may not see it) or else 0 of 1.
        start_batch: batches of this rank already consumed, in DataLoader order (resume).
    """

    def __init__(
        self,
        shards: TokenShards,
        masker: Masker,
        batch_size: int,
        *,
        shuffle_buffer: int = 1024,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        start_batch: int = 0,
    ) -> None:
        super().__init__()
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if rank is None or world_size is None:
            rank, world_size = distributed_rank_world()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        if batch_size < 1 or shuffle_buffer < 0 or seed < 0 or start_batch < 0:
            raise ValueError("batch_size must be >= 1; shuffle_buffer, seed and start_batch >= 0")
        self.shards = shards
        self.masker = masker
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch

    def units(self, stream: int, streams: int) -> list[Unit]:
        """What stream ``stream`` of ``streams`` reads each epoch: units dealt round-robin by index."""
        parts = math.ceil(streams / len(self.shards))
        every = (Unit(s, p, parts) for s in range(len(self.shards)) for p in range(parts))
        return [unit for i, unit in enumerate(every) if i % streams == stream]

    def epoch_samples(self, stream: int, streams: int, epoch: int) -> Iterator[tuple[str, Sample]]:
        """One epoch of one stream: its units in a shuffled order, rows through the shuffle buffer."""
        units = self.units(stream, streams)
        rng = np.random.default_rng((self.seed, epoch, stream, streams))
        if self.shuffle_buffer:
            units = [units[i] for i in rng.permutation(len(units))]
        rows = (row for u in units for row in self.shards.read(self.shards.shards[u.shard], u.part, u.parts))
        return _shuffled(rows, self.shuffle_buffer, rng) if self.shuffle_buffer else rows

    def samples(self, stream: int, streams: int) -> Iterator[tuple[int, str, Sample]]:
        """``(epoch, key, sample)`` forever: epoch after epoch of :meth:`epoch_samples`."""
        for epoch in count():
            rows = 0
            for key, sample in self.epoch_samples(stream, streams, epoch):
                rows += 1
                yield epoch, key, sample
            if rows == 0:  # would loop forever without yielding
                wanted = f"all of {list(self.shards.required)}" if self.shards.required else "any modality"
                raise TokenStoreError(
                    f"data stream {stream} of {streams} has no rows with {wanted} present "
                    f"(units {self.units(stream, streams)} of {[s.name for s in self.shards.shards]})"
                )

    def worker_batches(self, worker: int = 0, workers: int = 1) -> Iterator[MaskedBatch]:
        """What DataLoader worker ``worker`` of ``workers`` yields, resuming at ``start_batch``.

        The DataLoader takes batch ``i`` from worker ``i % workers``. After ``start_batch`` batches,
        the next one is due from the worker role ``start_batch % workers``; a new loader asks worker
        0 first, so worker ``w`` plays role ``(w + start_batch) % workers`` (same stream, same
        shuffle) and skips the batches that role had delivered.
        """
        offset = self.start_batch % workers
        role = (worker + offset) % workers
        skip = (self.start_batch // workers + (role < offset)) * self.batch_size
        batch = []
        for epoch, key, sample in self.samples(self.rank * workers + role, self.world_size * workers):
            if skip:  # fast-forward: the order is recomputed, the masks need not be
                skip -= 1
                continue
            sample = self.shards.view(sample, draw_crop(self.seed, key, epoch, len(sample[CROPS])))
            batch.append(self.masker(sample, self.masker.sample_rng(key_index(key), epoch)))
            if len(batch) == self.batch_size:
                yield self.masker.collate(batch)
                batch = []

    def __iter__(self) -> Iterator[StreamBatch | WorkerError]:
        """Each batch with what was passed over before it; in a DataLoader worker, a
        :class:`UserError` ends the worker's batches as a :class:`WorkerError`."""
        info = get_worker_info()
        if info is None:
            return self._counted(self.worker_batches())
        return _delivering_errors(self._counted(self.worker_batches(info.id, info.num_workers)))

    def _counted(self, batches: Iterator[MaskedBatch]) -> Iterator[StreamBatch]:
        before = self.shards.passed_over()
        for batch in batches:
            now = self.shards.passed_over()
            yield StreamBatch(batch, {reason: now[reason] - before[reason] for reason in PASSED_OVER})
            before = now


@dataclass(frozen=True)
class StreamBatch:
    """A batch as the stream hands it to a DataLoader: the masked batch, and what its reading
    passed over since the previous one (:data:`PASSED_OVER` -> count), counted in the worker that
    read it. :meth:`TokenDataModule.on_before_batch_transfer` sums the counts and passes the batch on."""

    batch: MaskedBatch
    passed_over: dict[str, int]


@dataclass(frozen=True)
class WorkerError:
    """A :class:`UserError` raised in a DataLoader worker, handed to the main process as the worker's last item.

    Raised in the worker, the DataLoader would rebuild it in the main process around the worker's
    whole traceback (torch's ``ExceptionWrapper``), and the CLI's one-line message would become
    thirty. :meth:`TokenDataModule.on_before_batch_transfer` raises it there as it was.
    """

    error: UserError


def _delivering_errors(batches: Iterator[StreamBatch]) -> Iterator[StreamBatch | WorkerError]:
    try:
        yield from batches
    except UserError as err:
        yield WorkerError(err)


def _shuffled(rows: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """A shuffle buffer: each new row replaces a random held one, which is yielded; the rest at the end."""
    buffer = []
    for row in rows:
        if len(buffer) < size:
            buffer.append(row)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = row
    for i in rng.permutation(len(buffer)):
        yield buffer[i]


class TokenDataModule(L.LightningDataModule):
    """The token store as Lightning's training data, resumable mid-epoch.

    The modalities are the masker's. ``state_dict()`` (saved in Lightning checkpoints) holds the
    number of training batches consumed on this rank, counted in :meth:`on_before_batch_transfer`
    as the training loop takes each batch (after Lightning's prefetch, so it is what the model
    saw). Every rank consumes as many, so rank 0's count is every rank's. Lightning calls only one
    ``on_before_batch_transfer``: a LightningModule that overrides it must call this one's.

    Args:
        root: the dataset root.
        masker: the run's masker (modalities and masking config).
        batch_size: per rank.
        modalities: the run's modality names; optional, must be the masker's (in its order).
        num_workers: DataLoader workers (persistent when > 0).
        shuffle_buffer, seed: see :class:`TokenStream`.
        skip_incomplete, holdout: see :class:`TokenShards`.
    """

    def __init__(
        self,
        root: str | Path,
        masker: Masker,
        batch_size: int,
        *,
        modalities: Sequence[str] | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 1024,
        seed: int = 0,
        skip_incomplete: bool = False,
        holdout: int = 0,
    ) -> None:
        super().__init__()
        names = tuple(m.name for m in masker.modalities)
        if modalities is not None and tuple(modalities) != names:
            raise ValueError(f"modalities {tuple(modalities)} are not the masker's {names}")
        self.root = storage.location(root)
        self.masker = masker
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.skip_incomplete = skip_incomplete
        self.holdout = holdout
        self.shards: TokenShards | None = None
        self.vocabularies: dict[str, dict[str, Any]] | None = None
        self.batches_consumed = 0
        self.passed_over = dict.fromkeys(PASSED_OVER, 0)
        """What the training batches' reading passed over (:data:`PASSED_OVER`), on this rank, in this launch."""
        self._stream: TokenStream | None = None

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.masker.modalities)

    def setup(self, stage: str | None = None) -> None:
        """Find the shards and check the stored tokens against the masker's modalities (once)."""
        if self.shards is None:
            tokens = [m for m in self.masker.modalities if m.layout != "pixels"]
            self.vocabularies = store_vocabularies(self.root, [m.name for m in tokens])
            check_store(self.vocabularies, tokens)
            self.shards = TokenShards(
                self.root,
                self.modalities,
                skip_incomplete=self.skip_incomplete,
                holdout=self.holdout,
                required=self.masker.cfg.task.modalities,
            )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        assert self.shards is not None
        self._stream = TokenStream(
            self.shards,
            self.masker,
            self.batch_size,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            start_batch=self.batches_consumed,
        )
        # pin_memory stays off: MaskedBatch has no pin_memory(), so the DataLoader could not pin it.
        return DataLoader(
            self._stream, batch_size=None, num_workers=self.num_workers, persistent_workers=self.num_workers > 0
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, WorkerError):
            raise batch.error
        training = self.trainer is None or self.trainer.training
        if isinstance(batch, StreamBatch):
            if training:
                for reason, count in batch.passed_over.items():
                    self.passed_over[reason] += count
            batch = batch.batch
        if training:
            self.batches_consumed += 1
        return batch

    def _layout(self) -> dict[str, Any]:
        """What must not change for a resumed stream to be the exact continuation."""
        shard_names = [s.name for s in self.shards.shards] if self.shards is not None else None
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "shuffle_buffer": self.shuffle_buffer,
            "world_size": distributed_rank_world()[1],
            "num_workers": self.num_workers,
            "modalities": list(self.modalities),
            "masking": repr(self.masker.cfg),
            "mask_seed": self.masker.seed,
            "shards": hashlib.sha256(repr(shard_names).encode()).hexdigest()[:16] if shard_names else None,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"batches_consumed": self.batches_consumed, "layout": self._layout()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume after ``batches_consumed`` batches. With another layout (world size, workers, seed,
        shards...) the stream still skips that many batches, but it is not the same stream: warned."""
        self.setup()
        saved, now = state_dict.get("layout", {}), self._layout()
        changed = sorted(k for k in now if saved.get(k) != now[k])
        if changed:
            rank_zero_warn(
                f"resuming the token stream after {state_dict['batches_consumed']} batches, but {changed} changed "
                "since the checkpoint: the data order is not the exact continuation"
            )
        self.batches_consumed = int(state_dict["batches_consumed"])
        if self._stream is not None:  # a loader made before the restore starts its workers later
            self._stream.start_batch = self.batches_consumed
