"""Read CC12M-style url lists, check them, and cut them into the download stage's shards.

The plan (``_state/download/plan.json`` plus one small Arrow file of rows per shard) is made once
per dataset root and reused by every rerun, so a shard always holds the same rows and keys. A
malformed list stops here, before any download, with the file and the problem named.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.csv as pacsv

from four_m.core import storage
from four_m.core.config import DownloadConfig
from four_m.core.dataset_root import DatasetRoot, atomic_path, sha256_file, shard_name, write_text_atomic
from four_m.core.errors import UserError
from four_m.core.storage import RootPath

SUFFIX_FORMATS = {".tsv": "tsv", ".tsv.gz": "tsv", ".parquet": "parquet"}
SHARD_INPUT_SCHEMA = pa.schema([("row_index", pa.int64()), ("url", pa.string()), ("caption", pa.string())])


class UrlListError(UserError):
    """A url list that cannot be used; raised before any work starts."""


@dataclass(frozen=True)
class InputFile:
    path: str
    """Relative to the root for a list inside it (a copied or moved root plans the same), else where it lies."""
    bytes: int
    sha256: str


@dataclass(frozen=True)
class DownloadPlan:
    inputs: tuple[InputFile, ...]
    samples_per_shard: int
    rows: int
    shards: int
    repaired_text: int
    """Urls or captions that were not valid UTF-8 and were decoded with replacement characters."""

    @property
    def shard_ids(self) -> list[int]:
        return list(range(self.shards))


def url_files(location: RootPath, input_format: str) -> list[RootPath]:
    """The url list files at ``location`` (a file, or a folder whose list files are taken in name order)."""
    if location.is_dir():
        files = sorted(p for p in location.iterdir() if _format_of(p) is not None)
        if not files:
            raise UrlListError(f"{location}: no url list (.tsv, .tsv.gz, .parquet) in this folder")
    elif location.is_file():
        files = [location]
    else:
        raise UrlListError(f"{location}: url list not found")
    for file in files:
        if input_format == "auto" and _format_of(file) is None:
            raise UrlListError(f"{file}: cannot tell the format from the name; set download.input_format")
    return files


def read_url_file(file: RootPath, cfg: DownloadConfig) -> tuple[pa.Table, int]:
    """One list as a table of (url, caption), and how many of its texts needed UTF-8 repair."""
    fmt = cfg.input_format if cfg.input_format != "auto" else _format_of(file)
    try:
        table = _read_parquet(file, cfg) if fmt == "parquet" else _read_tsv(file, cfg)
    except (pa.ArrowInvalid, OSError) as err:
        raise UrlListError(f"{file}: unreadable {fmt}: {err}") from None
    repaired = 0
    columns = {}
    for name in ("url", "caption"):
        columns[name], fixed = _as_utf8(table.column(name))
        repaired += fixed
    return pa.table(columns), repaired


def make_plan(root: DatasetRoot, cfg: DownloadConfig) -> DownloadPlan:
    """Reuse the root's plan if the url lists are unchanged, else read them and write a new one."""
    own_place = "://" in cfg.urls or Path(cfg.urls).is_absolute()
    location = storage.location(cfg.urls) if own_place else root / cfg.urls
    files = url_files(location, cfg.input_format)
    inputs = tuple(
        InputFile(str(f) if own_place else f.relative_to(root.path).as_posix(), f.stat().st_size, sha256_file(f))
        for f in files
    )
    plan_file = root / "_state/download/plan.json"
    existing = _read_plan(plan_file)
    if existing is not None:
        # By content, not path: a root that was moved or copied (its urls/ inside it) keeps its plan.
        same = [(i.bytes, i.sha256) for i in existing.inputs] == [(i.bytes, i.sha256) for i in inputs]
        if same and existing.samples_per_shard == cfg.samples_per_shard:
            return existing
        if any(plan_file.parent.glob("*.done.json")):
            raise UrlListError(
                f"{location}: the url list or samples_per_shard changed since {root.path} was planned and"
                " some shards are finished; use a new root, or delete its images/ and _state/download/"
            )

    tables, repaired = [], 0
    for file in files:
        table, fixed = read_url_file(file, cfg)
        tables.append(table)
        repaired += fixed
    rows = pa.concat_tables(tables)
    if rows.num_rows == 0:
        raise UrlListError(f"{location}: the url list has no rows")
    shards = math.ceil(rows.num_rows / cfg.samples_per_shard)
    for shard in range(shards):
        part = rows.slice(shard * cfg.samples_per_shard, cfg.samples_per_shard)
        indexed = pa.table(
            [pa.array(range(part.num_rows), pa.int64()), part["url"], part["caption"]],
            schema=SHARD_INPUT_SCHEMA,
        )
        with (
            atomic_path(shard_input_path(root, shard)) as temp,
            temp.open("wb") as sink,
            pa.ipc.new_file(sink, indexed.schema) as out,
        ):
            out.write_table(indexed)
    plan = DownloadPlan(inputs, cfg.samples_per_shard, rows.num_rows, shards, repaired)
    write_text_atomic(plan_file, json.dumps(asdict(plan), indent=1))
    return plan


def shard_input_path(root: DatasetRoot, shard: int) -> RootPath:
    return root / f"_state/download/inputs/{shard_name(shard)}.arrow"


def read_shard_input(root: DatasetRoot, shard: int) -> pa.Table:
    with shard_input_path(root, shard).open("rb") as source:
        return pa.ipc.open_file(source).read_all()


def _format_of(path: RootPath) -> str | None:
    name = path.name.lower()
    return next((fmt for suffix, fmt in SUFFIX_FORMATS.items() if name.endswith(suffix)), None)


def _read_tsv(file: RootPath, cfg: DownloadConfig) -> pa.Table:
    header = _has_header(file, cfg)
    names = None if header else [cfg.url_col, *([cfg.caption_col] if cfg.caption_col else [])]
    with _open_binary(file) as handle:
        table = pacsv.read_csv(
            handle,
            read_options=pacsv.ReadOptions(column_names=names, block_size=1 << 24),
            # Captions contain quotes; CC12M is plain tab-separated text with no quoting.
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            # Binary first: a caption that is not UTF-8 is repaired below, not a reason to stop.
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.binary() for n in names or _header_names(file)},
                strings_can_be_null=False,
            ),
        )
    return _select(table, file, cfg)


def _read_parquet(file: RootPath, cfg: DownloadConfig) -> pa.Table:
    return _select(storage.read_table(file), file, cfg)


def _select(table: pa.Table, file: RootPath, cfg: DownloadConfig) -> pa.Table:
    if cfg.url_col not in table.column_names:
        raise UrlListError(f"{file}: no url column {cfg.url_col!r} (columns: {', '.join(table.column_names)})")
    if cfg.caption_col and cfg.caption_col not in table.column_names:
        raise UrlListError(
            f"{file}: no caption column {cfg.caption_col!r} (columns: {', '.join(table.column_names)});"
            " set download.caption_col to null for a url-only list"
        )
    caption = table[cfg.caption_col] if cfg.caption_col else pa.nulls(table.num_rows, pa.string())
    return pa.table({"url": table[cfg.url_col], "caption": caption})


def _has_header(file: RootPath, cfg: DownloadConfig) -> bool:
    if cfg.tsv_header != "auto":
        return cfg.tsv_header == "yes"
    return _header_names(file)[:1] == [cfg.url_col]


def _header_names(file: RootPath) -> list[str]:
    with _open_binary(file) as handle:
        first = handle.readline().rstrip(b"\r\n")
    return first.decode("utf-8", errors="replace").split("\t")


@contextmanager
def _open_binary(file: RootPath) -> Iterator[BinaryIO]:
    """A list file's bytes, gunzipped when its name says so (pyarrow infers that only from local names)."""
    with file.open("rb") as raw:
        yield gzip.GzipFile(fileobj=raw) if file.name.lower().endswith(".gz") else raw


def _as_utf8(column: pa.ChunkedArray) -> tuple[pa.ChunkedArray, int]:
    """Cast to string; values that are not UTF-8 are decoded with replacement and counted."""
    try:
        return column.cast(pa.string()), 0
    except pa.ArrowInvalid:
        values = column.to_pylist()
        decoded = [None if v is None else v.decode("utf-8", errors="replace") for v in values]
        fixed = sum(1 for v, d in zip(values, decoded, strict=True) if v is not None and d.encode() != v)
        return pa.chunked_array([pa.array(decoded, pa.string())]), fixed


def _read_plan(plan_file: RootPath) -> DownloadPlan | None:
    try:
        raw = json.loads(plan_file.read_text())
        raw["inputs"] = tuple(InputFile(**f) for f in raw["inputs"])
        return DownloadPlan(**raw)
    except (FileNotFoundError, ValueError, TypeError, KeyError):
        return None
