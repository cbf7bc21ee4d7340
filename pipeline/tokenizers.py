"""Tokenizer training on Ray (``make tokenizers``): one Ray task per tokenizer, placed by Ray.

Each task trains one group (``text``, or one map modality) with ``tokenize.fit.fit_group`` and
writes its folder under ``tokenizers/``; with ``tokenize.num_gpus`` the tasks go to GPUs, on this
machine or a cluster. Finished tokenizers are skipped; one trained with another config stops the
run (tokens made with it would no longer match); a failing task is reported, the others go on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import ray

from four_m.core import storage
from four_m.core.config import Config
from four_m.core.dataset_root import DatasetRoot, write_text_atomic
from four_m.core.errors import UserError
from four_m.pipeline.executor import ray_session, worker_options
from four_m.tokenize.fit import fit_group, fit_hash, groups_of, members, trained_hash


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
    with root.lock("tokenizers"):
        return _train_tokenizers(root, config)


def _train_tokenizers(root: DatasetRoot, config: Config) -> TrainingSummary:
    started = time.perf_counter()
    shards = sorted(int(p.name.split(".")[0]) for p in root.stage("download").folder.glob("*.done.json"))
    if not shards:
        raise TokenizerTrainingError(f"no finished download shards under {root.path}: run download and label first")
    summary = TrainingSummary()
    todo = []
    for group in groups_of(config.tokenize.modalities):
        done = {m: trained_hash(root, m) for m in members(group)}
        stale = [m for m, h in done.items() if h is not None and h != fit_hash(config, group)]
        if stale:
            raise TokenizerTrainingError(
                f"tokenizers {stale} were trained with another config; delete tokenizers/<name>/ and"
                " tokens/<name>/ (or use a new root) to retrain"
            )
        if all(h is not None for h in done.values()):
            summary.skipped += list(done)
        else:
            todo.append(group)
    for folder in {root / "tokenizers", storage.scratch(root / "tokenizers")}:
        for temp in folder.glob(".*.tmp"):
            storage.remove_tree(temp)  # left by a killed run
    if todo:
        with ray_session(config.ray):
            task = ray.remote(fit_group).options(
                num_cpus=config.tokenize.num_cpus, num_gpus=config.tokenize.num_gpus or None, **worker_options()
            )
            running = {task.remote(root, g, config, shards): g for g in todo}
            while running:
                ready, _ = ray.wait(list(running), num_returns=1)
                group = running.pop(ready[0])
                try:
                    summary.trained.update(ray.get(ready[0]))
                except ray.exceptions.RayTaskError as err:
                    cause = err.cause if err.cause is not None else err
                    summary.failed[group] = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0]}"
    summary.seconds = time.perf_counter() - started
    record = {"trained": summary.trained, "skipped": summary.skipped, "failed": summary.failed}
    write_text_atomic(root / "_state/tokenizers/summary.json", json.dumps(record, indent=1))
    return summary


def _described(result: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())
