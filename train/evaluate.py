"""``make eval``: a trained 4M on the held-out shards, scored against the pseudo-labels.

What is predicted from what: a run trained on a task (``train.task``, e.g. rgb_pixels -> semseg or
caption -> rgb) is scored on that task, each target from all of the task's inputs; any other run
predicts every modality X besides rgb (depth, normal, semseg, clip, det, caption, ...) from the
image. Three columns per figure, so a figure means something:

- **model**: X generated from the inputs alone (greedy decoding: a metric of the model, not of
  the sampler's noise; the other decoding settings come from ``generate``), decoded by X's
  tokenizer. The image is shown as pixels where the run has its pixel input (``rgb_pixels``, as 4M
  evaluates), else as its tokens;
- **baseline**: one fixed prediction fitted on the pseudo-labels of the *training* shards (the
  per-pixel mean map, the per-pixel most frequent class, ...; see ``train/metrics.py``);
- **tokenizer ceiling**: X's own stored tokens decoded, i.e. the best any model predicting these
  tokens can score, since every prediction passes through the same tokenizer.

Rows without an input (pixels or tokens) are skipped (nothing to predict from); a row without X's pseudo-label
(its labeler failed) does not count for X. Captions are scored on token ids, everything else on
decoded values. Writes ``runs/<run>/eval/metrics.md`` and ``metrics.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from four_m.core.config import Config
from four_m.core.dataset_root import DatasetRoot, write_text_atomic
from four_m.core.errors import UserError
from four_m.core.modalities import MODALITIES, pixel_input_of
from four_m.tokenize.base import Tokenizer
from four_m.tokenize.sources import read_whole_view
from four_m.train.data import TokenShards
from four_m.train.generate import Generator
from four_m.train.held_out import HeldOutRow, Labels, held_out_rows
from four_m.train.metrics import BASELINES, METRICS, results_table
from four_m.train.sample import decoding
from four_m.train.trained import TrainedRun, load_trained

SOURCE_KIND = "image"
"""A run without a task is scored on every other modality from the image (rgb -> X), as 4M reports transfer."""
BATCH = 16
"""Held-out rows generated together: bounds memory, and the decoder's work grows with it."""
TOKEN_LEVEL = frozenset({"text"})
"""Kinds scored on token ids: a caption has no decoded value to compare but its text, and ids are exact."""


@dataclass(frozen=True)
class EvalReport:
    table: str
    """Markdown."""
    written: tuple[Path, Path]
    rows: int
    shown: tuple[str, ...]
    targets: tuple[str, ...]

    def lines(self) -> list[str]:
        shown = "+".join(self.shown)
        return [
            f"eval: {self.rows} held-out rows with {shown}, {shown} -> {', '.join(self.targets)} (greedy decoding)",
            *self.table.rstrip().splitlines(),
            f"eval: wrote {self.written[0]} and {self.written[1]}",
        ]


def evaluated(run: TrainedRun) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(what the model is shown, what it is scored on): a task run's own task, else the image (as
    its pixels where the run has them) -> every other modality with a metric."""
    if run.task is not None:
        return run.task.inputs, tuple(t for t in run.task.targets if t in METRICS)
    source = next((m for m in run.modalities if MODALITIES[m].kind == SOURCE_KIND), None)
    if source is None:
        raise UserError(f"run {run.directory.name} has no image modality to predict from: make eval scores rgb -> X")
    shown = pixel_input_of(source, run.modalities) or source
    return (shown,), tuple(m for m in run.predicted if m not in (source, shown) and m in METRICS)


def run_eval(config: Config) -> EvalReport:
    run = load_trained(config)
    shown, targets = evaluated(run)
    rows = list(held_out_rows(config, run.modalities, needed=shown))
    if not rows:
        raise UserError(f"no held-out row has all of {', '.join(shown)}: nothing to evaluate")
    labels = Labels(config, run.tokenizers)
    generator = Generator(run.model)
    greedy = decoding(config.generate, temperature=0.0)
    columns: dict[str, dict[str, Any]] = {"baseline": {}, "model": {}, "tokenizer ceiling": {}}
    for target in targets:
        tokenizer = run.tokenizers[target]
        metrics = {column: METRICS[target]() for column in columns}
        baseline = BASELINES[target]()
        baseline.fit(
            _scored(target, tokenizer, value) for value in _training_labels(config, run.modalities, tokenizer, target)
        )
        fixed = baseline.predict()
        for batch in _batches(rows):
            given = {m: [row.tokens[m] for row in batch] for m in shown}
            predicted = generator.generate(given, [(target, greedy)], seed=config.generate.seed)[target]
            for row, ids in zip(batch, predicted, strict=True):
                label = labels.value(target, row)
                if label is None:
                    continue
                truth = _scored(target, tokenizer, label)
                metrics["model"].update(_decoded(target, tokenizer, ids), truth)
                metrics["baseline"].update(fixed, truth)
                if row.tokens[target] is not None:
                    metrics["tokenizer ceiling"].update(_decoded(target, tokenizer, row.tokens[target]), truth)
        for column, metric in metrics.items():
            columns[column][target] = metric.result()
    table, data = results_table(columns)
    out = run.directory / "eval"
    markdown, figures = out / "metrics.md", out / "metrics.json"
    direction = f"{'+'.join(shown)} -> {', '.join(targets)}"
    # The root is where this file lies: naming its path would make the same run differ in another root.
    header = f"# {direction} on this root's held-out shards, run {run.directory.name}\n\n"
    write_text_atomic(markdown, header + table)
    write_text_atomic(figures, json.dumps({"rows": len(rows), **data}, indent=1) + "\n")
    return EvalReport(table, (markdown, figures), len(rows), shown, targets)


def _batches(rows: list[HeldOutRow]) -> Iterator[list[HeldOutRow]]:
    for start in range(0, len(rows), BATCH):
        yield rows[start : start + BATCH]


def _training_labels(config: Config, modalities: tuple[str, ...], tokenizer: Tokenizer, target: str) -> Iterator[Any]:
    """Pseudo-labels of ``target`` in the shards the run trained on (the baseline's only data)."""
    root = DatasetRoot(config.root)
    for shard in TokenShards(root.path, modalities, holdout=config.train.holdout_shards).shards:
        yield from (
            v for v in read_whole_view(root, target, int(shard.name), config, tokenizer).values if v is not None
        )


def _scored(modality: str, tokenizer: Tokenizer, label: Any) -> Any:
    """A pseudo-label in the form its metric compares: token ids for captions, the value otherwise."""
    return tokenizer.encode([label])[0] if MODALITIES[modality].kind in TOKEN_LEVEL else label


def _decoded(modality: str, tokenizer: Tokenizer, ids: Any) -> Any:
    return ids if MODALITIES[modality].kind in TOKEN_LEVEL else tokenizer.decode([ids])[0]
