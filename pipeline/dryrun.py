"""The production path at full size on a CPU: ``make dryrun``.

The production config (``configs/cc12m.yaml``) is turned into a dry run (:func:`dry_run_config`):
every labeler builds its production architecture at full size with random weights
(``random_size: production``, from configurations written offline), the tokenizers keep their
production codebooks and widths but train a few steps, 4M keeps its size (4M-B) and its masking but
trains a few steps, and everything runs on this machine's CPU over the embedded sample, through the
same stages as a real run. Then :func:`measure` prints, per labeler, VQ tokenizer and for 4M:
parameters, forward GFLOPs per image (``torch.utils.flop_counter`` at the production input size),
the peak memory of that work beyond the loaded weights, the bytes the run stored per image, and a projected
H100 throughput at a stated utilisation. Everything in it comes from random weights: costs and
shapes are real, the labels are not.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from torch.utils.flop_counter import FlopCounterMode

from four_m.core.config import Config, load_config
from four_m.core.dataset_root import DatasetRoot
from four_m.core.modalities import map_modalities
from four_m.labelers.base import LabelBatch
from four_m.labelers.pretrained import PretrainedLabeler
from four_m.labelers.registry import LABELERS
from four_m.pipeline.label import models_dir
from four_m.tokenize.registry import load_tokenizer
from four_m.tokenize.sources import read_whole_view
from four_m.train.data import TokenShards
from four_m.train.masking import Masker, modality_infos
from four_m.train.model import FourM, ModelConfig
from four_m.train.run import model_modalities

H100_BF16_FLOPS = 990e12
"""An H100 SXM's dense bf16 peak."""
UTILISATION = 0.4
"""The share of that peak the projection assumes: a well-fed inference or training job."""
DRY_ROOT = "data/dryrun"
LABEL = "dry run: random weights"


def dry_run_config(production: Config, root: str = DRY_ROOT) -> Config:
    """``production`` with random full-size labelers, short tokenizer and 4M training, on this
    machine's CPU over the embedded sample (its download, sample and Ray settings)."""
    embedded = load_config("default")
    label = production.label
    share = round(1.0 / max(len(label.labelers), 1), 3)  # one actor holds them all: a CPU between them
    sections = {
        n: dataclasses.replace(
            cfg, model=None, random_size="production", num_gpus=0.0, num_cpus=share, batch_size=2, concurrency=1
        )
        for n, cfg in label.sections.items()
    }
    vq = {n: dataclasses.replace(cfg, steps=3, batch_size=2) for n, cfg in production.tokenize.sections.items()}
    return dataclasses.replace(
        production,
        root=root,
        verify_checksums=True,
        ray=embedded.ray,
        sample=embedded.sample,
        download=embedded.download,
        label=dataclasses.replace(label, sections=sections, actor_groups=(tuple(label.labelers),), shards_per_run=2),
        tokenize=dataclasses.replace(
            production.tokenize, sections=vq, num_gpus=0.0, num_cpus=1.0, concurrency=1, batch_size=4
        ),
        train=dataclasses.replace(
            production.train,
            run="dryrun",
            batch_size=2,
            max_steps=3,
            warmup_steps=1,
            accelerator="cpu",
            devices=1,
            num_nodes=1,
            strategy="auto",
            precision="32-true",
            num_workers=0,
            shuffle_buffer=8,
            holdout_shards=0,
            checkpoint_every_n_steps=1_000_000,  # none: 4M-B's with AdamW state are 3.3 GB each
            log_every_n_steps=1,
        ),
    )


@dataclass(frozen=True)
class Cost:
    """One network's figures at its production size."""

    what: str
    parameters: int
    gflops: float
    """Per image (per sample, forward and backward, for 4M's training step)."""
    memory_gib: float
    """Peak resident memory of one image's (one batch's, for 4M) work beyond the loaded weights."""
    stored_bytes: float | None
    """Per image, as the dry run stored it (None: nothing stored per image)."""

    def row(self) -> str:
        per_second = UTILISATION * H100_BF16_FLOPS / (self.gflops * 1e9)
        stored = f"{self.stored_bytes / 1e3:,.1f} KB" if self.stored_bytes is not None else "-"
        weights = self.parameters * 4 / 2**30
        cells = [self.what, f"{self.parameters / 1e6:,.1f}M", f"{weights:.2f}", f"{self.gflops:,.1f}"]
        cells += [f"{self.memory_gib:.2f}", stored, f"{per_second:,.0f}"]
        return "| " + " | ".join(cells) + " |"


HEADER = (
    f"| {LABEL} | parameters | fp32 weights (GiB) | GFLOPs per image | peak memory beyond the weights (GiB) |"
    f" stored per image | projected H100 images/s at {UTILISATION:.0%} |\n|---|---|---|---|---|---|---|"
)
FORMULA = (
    f"projected images/s = {UTILISATION} x {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s (H100 dense bf16) / FLOPs per image;"
    " FLOPs counted by torch.utils.flop_counter on one image at the production input size (4M: one training"
    " step, forward and backward, per sample)"
)


def measure(config: Config) -> list[Cost]:
    """The figures of every labeler, VQ tokenizer and 4M of a finished dry run of ``config``."""
    root = DatasetRoot(config.root)
    return [*_labelers(config, root), *_tokenizers(config, root), _four_m(config, root)]


def _counted(run: Callable[[], object]) -> tuple[float, float]:
    """(GFLOPs, GiB of peak resident memory above the start) of ``run()``: what one image costs
    beyond the loaded weights.

    ``run`` goes once untimed first: weights load memory-mapped, and the first pass pages them in.
    Then freed memory is handed back to the system (``malloc_trim``, else a new peak could hide in
    it) and the kernel's high-water mark of resident memory is reset to now (``/proc/self/clear_refs``),
    so the mark after the run is this run's own peak. Linux only; elsewhere the memory is NaN.
    """
    run()
    gc.collect()
    status = Path("/proc/self/status")
    measurable = status.is_file() and Path("/proc/self/clear_refs").is_file()
    if measurable:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        before = _status_kib(status, "VmRSS")
    with FlopCounterMode(display=False) as counter:
        run()
    peak = (_status_kib(status, "VmHWM") - before) / 2**20 if measurable else float("nan")
    return counter.get_total_flops() / 1e9, max(0.0, peak)


def _status_kib(status: Path, field: str) -> int:
    line = next(line for line in status.read_text().splitlines() if line.startswith(f"{field}:"))
    return int(line.split()[1])


def _stored_per_row(folder: Path) -> float | None:
    files = [p for p in folder.glob("*.parquet") if not p.name.startswith(".")]
    if not files:
        return None
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
    return sum(p.stat().st_size for p in files) / max(rows, 1)


def _labelers(config: Config, root: DatasetRoot) -> Iterator[Cost]:
    """The networks among the labelers (algorithms have no weights and cost little beside them)."""
    for name in config.label.labelers:
        cfg = config.label.labeler(name)
        labeler = LABELERS[name](cfg, config.label.size, models_dir(root) / name, root.path)
        if not isinstance(labeler, PretrainedLabeler):
            continue
        labeler.setup()
        pixels = np.random.default_rng(0).integers(0, 256, (1, cfg.input_size, cfg.input_size, 3)).astype(np.uint8)
        gflops, memory = _counted(lambda labeler=labeler, pixels=pixels: labeler.labelled(LabelBatch(pixels)))
        parameters = sum(p.numel() for p in labeler.model.parameters())
        yield Cost(
            f"label/{name} @ {cfg.input_size} px",
            parameters,
            gflops,
            memory,
            _stored_per_row(root.path / f"labels/{name}"),
        )
        del labeler


def _tokenizers(config: Config, root: DatasetRoot) -> Iterator[Cost]:
    for modality in (m for m in map_modalities() if m in config.tokenize.modalities):
        tokenizer = load_tokenizer(root, modality)
        rows = read_whole_view(root, modality, 0, config, tokenizer)  # crop 0, as the tokenizer takes it
        value = next(v for v in rows.values if v is not None)
        gflops, memory = _counted(lambda tokenizer=tokenizer, value=value: tokenizer.encode([value]))
        parameters = sum(p.numel() for p in tokenizer.model.parameters())
        stored = _stored_per_row(root.path / f"tokens/{modality}")
        yield Cost(f"tokenize/{modality} (VQ, {tokenizer.vocab_size} codes)", parameters, gflops, memory, stored)


def _four_m(config: Config, root: DatasetRoot) -> Cost:
    """4M's training step at the run's size and budgets, on a batch the run's own masking draws."""
    cfg = config.train
    modalities = model_modalities(root, cfg.run_modalities)
    model = FourM(ModelConfig.named(cfg.model), modalities)
    masker = Masker(modality_infos(cfg.run_modalities), cfg.masking, seed=cfg.seed)
    shards = TokenShards(root.path, cfg.run_modalities)
    samples = [shards.view(s, 0) for _, s in itertools.islice(shards.read(shards.shards[0]), cfg.batch_size)]
    batch = masker.collate([masker(s, masker.sample_rng(i)) for i, s in enumerate(samples)])

    def step() -> None:
        loss, _ = model.loss(batch)
        loss.backward()

    gflops, memory = _counted(step)
    return Cost(
        f"train/4M-{cfg.model} (budgets {cfg.input_budget}/{cfg.target_budget})",
        model.parameter_count(),
        gflops / len(samples),
        memory,
        None,
    )


def report(costs: list[Cost]) -> str:
    return "\n".join([HEADER, *(c.row() for c in costs), "", FORMULA])
