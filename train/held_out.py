"""The held-out token shards (``train.holdout_shards``), row by row with their pseudo-labels and images:
what ``make sample`` shows and ``make eval`` scores, never what ``make train`` saw."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from four_m.core import storage
from four_m.core.config import Config
from four_m.core.dataset_root import DatasetRoot, shard_name
from four_m.core.errors import UserError
from four_m.core.modalities import of_kind
from four_m.core.views import label_view
from four_m.tokenize.base import Tokenizer
from four_m.tokenize.maps import ADAPTERS
from four_m.tokenize.sources import read_whole_view
from four_m.train.data import Sample, TokenShards


class NothingHeldOutError(UserError):
    """No shard was kept out of training, or none of them has what was asked for."""


@dataclass(frozen=True)
class HeldOutRow:
    shard: int
    key: str
    tokens: Sample
    """Modality -> its stored ids, a pixel input's decoded (S, S, 3) image (None where absent)."""


def held_out_rows(config: Config, modalities: Sequence[str], needed: Sequence[str] = ()) -> Iterator[HeldOutRow]:
    """Rows of the held-out shards, in order, that have tokens (or pixels) for every modality in ``needed``."""
    holdout = config.train.holdout_shards
    if holdout < 1:
        raise NothingHeldOutError(
            "train.holdout_shards is 0: every token shard was trained on, so nothing is held out to sample or"
            " evaluate on; set it to 1 or more and retrain"
        )
    shards = TokenShards(config.root, modalities, holdout=holdout)
    for shard in shards.held_out:
        for key, stored in shards.read(shard):
            sample = shards.view(stored, 0)  # crop 0, the whole view: figures stay comparable
            if all(sample[m] is not None for m in needed):
                yield HeldOutRow(int(shard.name), key, sample)


class Labels:
    """Pseudo-labels and image views of held-out rows by (shard, key), each shard file read once, cut
    to crop 0 by the run's own tokenizers (what their tokens were made from)."""

    def __init__(self, config: Config, tokenizers: Mapping[str, Tokenizer]):
        self.config = config
        self.root = DatasetRoot(config.root)
        self.tokenizers = tokenizers

    def value(self, modality: str, row: HeldOutRow) -> Any:
        """The label of crop 0 as the run's tokenizer encodes it (None where the labeler failed for that row)."""
        return self._values(modality, row.shard).get(row.key)

    def view(self, row: HeldOutRow) -> np.ndarray:
        """The uint8 RGB view of the row's image, crop 0 at the side of its tokens' values (or
        ``tokenize.crops.size`` in a run without the image's tokens); grey where it has none."""
        image = of_kind("image")[0]
        if image in self.tokenizers:
            pixels = self.value(image, row)
            return ADAPTERS[image].render(pixels) if pixels is not None else self.blank()
        view = label_view(self._images(row.shard).get(row.key), self.config.tokenize.crops.size)
        return view if view is not None else self.blank()

    def blank(self) -> np.ndarray:
        return np.full((self.config.tokenize.crops.size,) * 2 + (3,), 128, np.uint8)

    @cache  # noqa: B019 - one Labels per command; the cache dies with it
    def _values(self, modality: str, shard: int) -> dict[str, Any]:
        rows = read_whole_view(self.root, modality, shard, self.config, self.tokenizers.get(modality))  # crop 0
        return dict(zip(rows.keys, rows.values, strict=True))

    @cache  # noqa: B019 - as above
    def _images(self, shard: int) -> dict[str, bytes | None]:
        table = storage.read_table(self.root / f"images/{shard_name(shard)}.parquet", columns=["key", "jpg"])
        return dict(zip(table["key"].to_pylist(), table["jpg"].to_pylist(), strict=True))
