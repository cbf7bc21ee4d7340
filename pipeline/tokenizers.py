"""Tokenizer training on Ray (``make tokenizers``): one Ray task per tokenizer, placed by Ray.

Each task trains one group (``text``, or one map modality) with ``tokenize.fit.fit_group`` and
writes its folder under ``tokenizers/``; with ``tokenize.num_gpus`` the tasks go to GPUs, on this
machine or a cluster. Finished tokenizers are skipped; one trained with another config stops the
run (tokens made with it would no longer match); a failing task is reported, the others go on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

from four_m.core import storage
from four_m.core.config import Config
from four_m.core.dataset_root import DatasetRoot
from four_m.core.errors import UserError
from four_m.pipeline.executor import map_shards, ray_session
from four_m.pipeline.stage import downloaded_shards, write_summary
from four_m.tokenize.fit import TrainedFiles, fit_group, fit_hash, groups_of, members, trained_hash
from four_m.tokenize.registry import tokenizer_state

STAGE = "tokenizers"


class TokenizerTrainingError(UserError):
    """Training cannot start: nothing labelled, or finished tokenizers made with another config."""


@dataclass
class TrainingSummary:
    trained: dict[str, dict] = field(default_factory=dict)
    """Per modality: samples, seconds and the tokenizer's metrics."""
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        lines = [f"tokenizers/{m}: {_described(r)}" for m, r in self.trained.items()]
        lines += [f"tokenizers/{m}: already trained, skipped" for m in self.skipped]
        lines += [f"tokenizers/{m}: FAILED: {e}" for m, e in self.failed.items()]
        return lines + [f"tokenizers: {self.seconds:.1f} s"]


def run_tokenizer_training(config: Config) -> TrainingSummary:
    root = DatasetRoot(config.root)
    with root.lock(STAGE):
        return _train_tokenizers(root, config)


def _train_tokenizers(root: DatasetRoot, config: Config) -> TrainingSummary:
    started = time.perf_counter()
    shards = downloaded_shards(root, TokenizerTrainingError)
    summary = TrainingSummary()
    todo = []
    for group in groups_of(config.tokenize):
        done = {m: trained_hash(root, m) for m in members(group, config.tokenize)}
        stale = [m for m, h in done.items() if h is not None and h != fit_hash(config, group)]
        if stale:
            raise TokenizerTrainingError(
                f"tokenizers {stale} were trained with another config; delete tokenizers/<name>/ and"
                " tokens/<name>/ (or use a new root) to retrain"
            )
        if all(h is not None for h in done.values()):
            summary.skipped += list(done)
            for modality in done:  # finished before markers were written, or killed between the two
                if tokenizer_state(root, modality).read_marker(0) is None:
                    TrainedFiles.read(root, modality).mark(root)
        else:
            todo.append(group)
    for folder in {root / "tokenizers", storage.scratch(root / "tokenizers")}:
        for temp in folder.glob(".*.tmp"):
            storage.remove_tree(temp)  # left by a killed run
    if todo:
        with ray_session(config.ray):
            results, summary.failed = map_shards(
                todo,
                partial(fit_group, root, config=config, shards=shards),
                num_cpus=config.tokenize.num_cpus,
                num_gpus=config.tokenize.num_gpus,
                desc=STAGE,
                progress=False,
            )
        for trained in results.values():
            summary.trained.update(trained)
    summary.seconds = time.perf_counter() - started
    write_summary(root, STAGE, {"trained": summary.trained, "skipped": summary.skipped, "failed": summary.failed})
    return summary


def _described(result: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())
