"""Tokenize one shard: every requested modality's rows -> ``tokens/<modality>/<shard>.parquet``.

Maps and boxes are tokenized once per crop (``core.crops``, drawn from each row's key under
``tokenize.crops``): the crops are cut from the label view, then encoded together.

A pure function of the dataset root and the loaded tokenizers (no Ray here): the executor in
``pipeline.tokenize`` hands shards to it and records markers.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from four_m.core import storage
from four_m.core.config import Config
from four_m.core.crops import Crop, crops_array, draw_crops
from four_m.core.curation import removed_rows
from four_m.core.dataset_root import DatasetRoot, shard_name
from four_m.core.failures import ABSENT, absent, curated_reason, is_curated
from four_m.core.modalities import MODALITIES
from four_m.core.summary import ShardReport
from four_m.tokenize.base import Tokenizer, TokenizerInputError
from four_m.tokenize.sources import read_rows, source_file
from four_m.tokenize.store import token_schema, token_table, write_tokens


def token_file(root: DatasetRoot, modality: str, shard: int):
    return root / f"tokens/{modality}/{shard_name(shard)}.parquet"


def tokenize_shard(
    root: DatasetRoot,
    shard: int,
    tokenizers: Mapping[str, Tokenizer],
    config: Config,
    provenance: Mapping[str, dict[str, str]],
) -> dict[str, ShardReport]:
    """Write the shard's token file of every modality in ``tokenizers``; one report per modality."""
    image_keys = storage.read_table(root / f"images/{shard_name(shard)}.parquet", columns=["key"])["key"].to_pylist()
    reports = {}
    removed = removed_rows(root, shard)  # curation's decisions, every phase
    for modality, tokenizer in tokenizers.items():
        started = time.perf_counter()
        rows = _without(read_rows(root, modality, shard, config), removed)
        if rows.keys != image_keys:
            raise ValueError(f"{source_file(root, modality, shard)}: keys are not those of images/ (row order broken)")
        where = str(source_file(root, modality, shard))
        fixed = tokenizer.max_tokens if tokenizer.fixed_length else None
        if MODALITIES[modality].cropped:
            crops = [draw_crops(key, config.tokenize.crops) for key in rows.keys]
            ids = _encode_crops(tokenizer, rows.values, crops, config.tokenize.batch_size, where)
            stored = [crops_array(c) for c in crops]
        else:
            ids, stored = _encode(tokenizer, rows.values, config.tokenize.batch_size, where), None
        schema = token_schema(fixed, provenance[modality], cropped=stored is not None)
        errors = [
            None if i is not None else (e if is_curated(e) else absent(e))
            for i, e in zip(ids, rows.errors, strict=True)
        ]
        table = token_table(rows.keys, ids, errors, schema, stored)
        write_tokens(token_file(root, modality, shard), table, config.tokenize.row_group_rows)
        failures = Counter(curated_reason(e) if is_curated(e) else ABSENT for e in errors if e is not None)
        reports[modality] = ShardReport(
            shard=shard,
            rows_in=len(ids),
            rows_out=len(ids) - sum(failures.values()),
            failures=dict(failures),
            seconds=time.perf_counter() - started,
        )
    return reports


def _without(rows, removed: dict[str, str]):
    """``rows`` with the values of the rows curation removed taken out, their error saying why."""
    if not removed:
        return rows
    chosen = [key in removed for key in rows.keys]
    values = [None if out else v for v, out in zip(rows.values, chosen, strict=True)]
    errors = [removed[k] if out else e for k, e, out in zip(rows.keys, rows.errors, chosen, strict=True)]
    return dataclasses.replace(rows, values=values, errors=errors)


def _encode_crops(
    tokenizer: Tokenizer, values: list[Any], crops: list[tuple[Crop, ...]], batch_size: int, where: str
) -> list[list[np.ndarray] | None]:
    """Per present row, the ids of each of its crops; None for absent rows. The crops of
    ``batch_size`` rows are cut and encoded together (cut per batch: a shard's crops at once would
    not fit in memory)."""
    ids: list[list[np.ndarray] | None] = [None] * len(values)
    present = [i for i, value in enumerate(values) if value is not None]
    for start in range(0, len(present), batch_size):
        chosen = present[start : start + batch_size]
        try:
            cut = [tokenizer.crop(values[i], crop) for i in chosen for crop in crops[i]]
        except TokenizerInputError as err:
            raise TokenizerInputError(f"{where}: {err}") from None
        encoded = iter(_encode(tokenizer, cut, len(cut), where))
        for i in chosen:
            ids[i] = [next(encoded) for _ in crops[i]]
    return ids


def _encode(tokenizer: Tokenizer, values: list[Any], batch_size: int, where: str) -> list[np.ndarray | None]:
    """Ids for the present values, in batches; None for absent ones. Ids are range-checked here."""
    ids: list[np.ndarray | None] = [None] * len(values)
    present = [i for i, value in enumerate(values) if value is not None]
    for start in range(0, len(present), batch_size):
        chosen = present[start : start + batch_size]
        try:
            encoded = tokenizer.encode([values[i] for i in chosen])
        except TokenizerInputError as err:
            raise TokenizerInputError(f"{where}: {err}") from None
        for index, row_ids in zip(chosen, encoded, strict=True):
            tokenizer.check_ids(row_ids, where)
            ids[index] = row_ids
    return ids
