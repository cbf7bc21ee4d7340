"""What runs in a label actor: build its labelers once, then label whole ``images/`` shards.

A task is one shard: the actor reads it in batches of its pool's batch size, decodes each image
once and cuts one view per input size (``pipeline.views``), runs its labelers on the batch, and
streams each labeler's rows into that labeler's shard file (``pipeline.shard_writer``), renamed into
place when the shard is done. The driver sends a shard and gets back its row count: no payload,
no view and no label crosses the object store. The labeler classes (torch, transformers,
ultralytics) are imported here, never in the driver.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from four_m import __version__
from four_m.core import storage
from four_m.core.config import Config
from four_m.core.curation import IMAGE, removed_rows
from four_m.core.dataset_root import DatasetRoot, shard_name
from four_m.core.failures import ERROR, labeler_timeout
from four_m.core.modalities import MODALITIES
from four_m.labelers.base import DerivedLabeler, LabelBatch, Labeler
from four_m.labelers.registry import LABELERS
from four_m.pipeline.allocator import keep_freed_memory
from four_m.pipeline.shard_writer import shard_file
from four_m.pipeline.time_limit import TimeLimitExceeded, within
from four_m.pipeline.views import VIEW_ERROR, add_views, pixels_of

STAGE = "label"
log = logging.getLogger(__name__)
ROW_GROUP_ROWS = 256
ORIGINAL_SIZE = ("original_width", "original_height")


def column(labeler: str, name: str) -> str:
    """Labelers' columns travel side by side in a batch, prefixed by modality."""
    return f"{labeler}.{name}"


@dataclass(frozen=True)
class ShardTarget:
    """Where one labeler's shards go in this run: small and picklable, for the writing actors."""

    folder: str
    """Relative to the root: ``labels/<name>``."""
    config_hash: str
    """The shaping hash of its config, which its files' metadata records."""
    shards: frozenset[int]
    """The shards this labeler writes in this run (the others are done or not in the chunk)."""


class LabelerActor:
    """One actor of a pool: loads its labelers' weights once, then labels shard after shard.

    Usually one labeler per pool; ``label.actor_groups`` puts several in one actor where a
    machine is too small for a process per labeler (each process imports torch and friends).
    A file's schema and provenance come from the labeler that writes it, so from here.
    """

    def __init__(
        self,
        names: list[str],
        config: Config,
        models_dir: str,
        targets: dict[str, ShardTarget],
        derived_from_random_init: frozenset[str],
    ):
        import torch  # the networks run here: the driver never imports them

        keep_freed_memory()  # before the models allocate: each batch reuses the last one's memory
        settings = config.label.pool_settings(names)
        # As many threads as CPUs Ray reserved for this actor.
        torch.set_num_threads(max(1, math.ceil(settings.num_cpus)))
        self.root = storage.location(config.root)
        self.dataset = DatasetRoot(config.root)
        self.batch_size = settings.batch_size
        self.sizes = tuple(sorted({config.label.labeler(n).input_size for n in names}))
        self.labelers: list[tuple[Labeler, pa.Schema]] = []
        self.targets: dict[str, tuple[ShardTarget, pa.Schema]] = {}
        """Per labeler: where its files go and their schema (payload, provenance)."""
        for name in names:
            labeler = LABELERS[name](config.label.labeler(name), config.label.size, Path(models_dir) / name, self.root)
            if isinstance(labeler, DerivedLabeler):
                labeler.derived_from_random_init = name in derived_from_random_init
            labeler.setup()
            self.labelers.append((labeler, labeler.schema()))
            self.targets[name] = (targets[name], _file_schema(labeler, config, targets[name].config_hash))

    def label_rows(self, shard: int, path: str, reads: dict[str, str], rows: Piece | None = None) -> int:
        """Label the images/ shard at ``path`` (``reads``: the label files its labelers read, by
        modality), or only its ``rows``, with the labelers that owe it; write their shard files (for
        a piece: parts, see :meth:`merge`) and return how many rows were labelled."""
        owing = self._owing(shard)
        removed = removed_rows(self.dataset, shard, (IMAGE,))  # curation's, before labelling
        done = 0
        with ExitStack() as files:
            writers = {}
            for labeler, _ in owing:
                target, schema = self.targets[labeler.name]
                file = _part_file(target, shard, rows.start) if rows else _shard_file(target, shard)
                writers[labeler.name] = files.enter_context(shard_file(self.root / file, schema, ROW_GROUP_ROWS))
            for table in read_images(path, reads, self.batch_size, rows):
                batch = add_views(table, self.sizes, removed)
                for labeler, schema in owing:
                    batch = _apply(labeler, schema, batch)
                for name, writer in writers.items():
                    writer.write(_modality_table(batch, name, self.targets[name][1]))
                done += batch.num_rows
        return done

    def merge(self, shard: int, pieces: list[Piece]) -> int:
        """Write the shard files of a shard labelled in ``pieces`` from their parts, in row order,
        and remove the parts; returns its rows. Here, not in a task of its own: a task would want a
        worker process, and starting one costs more than the merge."""
        rows = 0
        for labeler, _ in self._owing(shard):
            target, schema = self.targets[labeler.name]
            with shard_file(self.root / _shard_file(target, shard), schema, ROW_GROUP_ROWS) as writer:
                for piece in pieces:
                    writer.write(storage.read_table(self.root / _part_file(target, shard, piece.start)))
                rows = writer.rows
            storage.remove_tree(self.root / _parts_folder(target, shard))
        return rows

    def _owing(self, shard: int) -> list[tuple[Labeler, pa.Schema]]:
        return [(lab, schema) for lab, schema in self.labelers if shard in self.targets[lab.name][0].shards]


@dataclass(frozen=True)
class Piece:
    """Rows ``start`` to ``stop`` of a shard, labelled by one actor where a pool has more actors
    than shards (a small run, the start of a bench): the other actors would idle."""

    start: int
    stop: int


PARTS = "_tmp"
"""The parts' folder inside a labeler's folder; every run clears it first (``clear_temporaries``)."""


def _shard_file(target: ShardTarget, shard: int) -> str:
    return f"{target.folder}/{shard_name(shard)}.parquet"


def _parts_folder(target: ShardTarget, shard: int) -> str:
    return f"{target.folder}/{PARTS}/{shard_name(shard)}"


def _part_file(target: ShardTarget, shard: int, start: int) -> str:
    return f"{_parts_folder(target, shard)}/{start:09d}.parquet"


def _apply(labeler: Labeler, schema: pa.Schema, batch: pa.Table) -> pa.Table:
    """Append one labeler's payload and error columns to a pipeline batch."""
    errors = batch[VIEW_ERROR].to_pylist()
    rows = [i for i, error in enumerate(errors) if error is None]
    payloads: list[dict | None] = [None] * batch.num_rows
    if rows:
        inputs = _label_batch(batch, rows, labeler)
        for row, payload, error in _label_isolated(labeler, inputs, rows, labeler.cfg.timeout_s):
            payloads[row] = payload
            errors[row] = error
    table = pa.Table.from_pylist([p or {} for p in payloads], schema=schema)
    for field_ in schema:
        batch = batch.append_column(column(labeler.name, field_.name), table[field_.name])
    return batch.append_column(column(labeler.name, ERROR), pa.array(errors, pa.string()))


def _label_batch(batch: pa.Table, rows: list[int], labeler: Labeler) -> LabelBatch:
    """The labeler's view of the pipeline batch's ``rows``: pixels at its input size, the url-list
    fields, and the labels it reads (a failed one is None)."""

    def picked(name: str) -> list:
        values = batch[name].to_pylist()
        return [values[row] for row in rows]

    labels = {}
    for source in MODALITIES[labeler.name].label_inputs:
        prefix, failures = f"{source}.", column(source, ERROR)
        if failures not in batch.column_names:
            continue  # never made for this shard: the labeler leaves out what it would give
        names = [n[len(prefix) :] for n in batch.column_names if n.startswith(prefix) and n != failures]
        values = {n: picked(column(source, n)) for n in names}
        failed = picked(failures)
        labels[source] = [None if failed[i] else {n: values[n][i] for n in names} for i in range(len(rows))]
    recorded = all(c in batch.column_names for c in ORIGINAL_SIZE)
    sizes = zip(*(picked(c) for c in ORIGINAL_SIZE), strict=True) if recorded else [(None, None)] * len(rows)
    return LabelBatch(
        pixels=pixels_of(batch, labeler.cfg.input_size)[rows],
        keys=picked("key"),
        alt_texts=picked("caption"),
        original_sizes=[(w, h) if w and h else None for w, h in sizes],
        labels=labels,
    )


def _label_isolated(
    labeler: Labeler, batch: LabelBatch, rows: list[int], limit: float
) -> list[tuple[int, dict | None, str | None]]:
    """Label the batch; if that fails or takes longer than ``limit`` seconds, row by row, so one bad
    image costs only its own row: a row that alone fails is a ``labeler_error``, one that alone takes
    longer than ``limit`` a ``labeler_timeout`` (:mod:`four_m.pipeline.time_limit` says what
    happens to the hung call).

    The fallback and each failing row are logged with their keys (the summary only counts them),
    so the image that broke a labeler can be found.
    """
    keys = batch.keys
    try:
        return [(row, payload, None) for row, payload in zip(rows, within(limit, labeler.labelled, batch), strict=True)]
    except TimeLimitExceeded:
        log.warning(
            "label/%s: a batch of %d rows (keys %s..%s) took longer than %g s, retrying row by row",
            labeler.name,
            len(rows),
            keys[0],
            keys[-1],
            limit,
        )
    except Exception as err:  # noqa: BLE001 - the culprit is isolated below
        log.warning(
            "label/%s: a batch of %d rows (keys %s..%s) failed, retrying row by row: %s: %s",
            labeler.name,
            len(rows),
            keys[0],
            keys[-1],
            type(err).__name__,
            err,
        )
    results = []
    for index, (row, key) in enumerate(zip(rows, keys, strict=True)):
        try:
            (payload,) = within(limit, labeler.labelled, batch.rows(index, index + 1))
            results.append((row, payload, None))
        except TimeLimitExceeded:
            log.warning("label/%s: row %s took longer than %g s alone: quarantined", labeler.name, key, limit)
            results.append((row, None, labeler_timeout(labeler.name, limit)))
        except Exception as err:  # noqa: BLE001 - counted and stored with the row
            log.warning("label/%s: row %s failed: %s: %s", labeler.name, key, type(err).__name__, err)
            results.append((row, None, f"{labeler.name} failed: {type(err).__name__}: {err}"))
    return results


def read_images(path: str, reads: dict[str, str], batch_rows: int, rows: Piece | None = None) -> Iterator[pa.Table]:
    """Stream the images/ shard at ``path`` (or only its ``rows``) in tables of ``batch_rows`` rows,
    each carrying the columns of the labels its labelers read (``reads``: their files by modality)
    as ``<modality>.<column>``, checked to be the same keys in the same order."""
    labels = {source: storage.read_table(storage.location(file)) for source, file in reads.items()}
    file = storage.parquet_file(storage.location(path))
    # The photo's size before resizing, where the writer recorded it (img2dataset does).
    sizes = [c for c in ORIGINAL_SIZE if c in file.schema_arrow.names]
    columns = ["key", "jpg", "status", "error_message", "caption", *sizes]
    start, stop = (rows.start, rows.stop) if rows else (0, file.metadata.num_rows)
    first = 0
    for part in file.iter_batches(batch_size=batch_rows, columns=columns):
        table = pa.Table.from_batches([part])
        begin, end = max(start - first, 0), min(stop - first, table.num_rows)
        if end > begin:
            yield _with_labels(table.slice(begin, end - begin), labels, first + begin, path)
        first += part.num_rows
        if first >= stop:
            break


def _with_labels(table: pa.Table, labels: dict[str, pa.Table], first: int, path: str) -> pa.Table:
    for source, stored in labels.items():
        rows = stored.slice(first, table.num_rows)
        if not rows["key"].equals(table["key"]):
            raise RuntimeError(f"labels/{source} of {path}: keys are not those of images/ (row order broken)")
        for name in rows.column_names[1:]:
            table = table.append_column(column(source, name), rows[name])
    return table


def _modality_table(part: pa.Table, name: str, schema: pa.Schema) -> pa.Table:
    """One labeler's file columns from the pipeline's: key, its payload, alt_text, its error; with
    the file's schema and metadata, which the merged shard file takes from its parts."""
    shared = {"key": "key", "alt_text": "caption"}
    return pa.table({f.name: part[shared.get(f.name, column(name, f.name))] for f in schema}, schema=schema)


def _file_schema(labeler: Labeler, config: Config, config_hash: str) -> pa.Schema:
    fields = [pa.field("key", pa.string())]
    fields += list(labeler.schema())
    if labeler.keeps_alt_text:
        fields.append(pa.field("alt_text", pa.string()))
    fields.append(pa.field(ERROR, pa.string()))
    provenance = {
        "stage": STAGE,
        "package": f"four-m {__version__}",
        "config_hash": config_hash,
        "label_view": f"centre square of the shorter side, {config.label.size} px",
        **labeler.provenance(),
    }
    return pa.schema(fields, metadata={f"four_m.{k}": v for k, v in provenance.items()})
