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
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from torch.utils.flop_counter import FlopCounterMode

from four_m.core.config import Config, load_config
from four_m.core.dataset_root import DatasetRoot
from four_m.core.modalities import MODALITIES, map_modalities
from four_m.labelers.base import LabelBatch, Labeler
from four_m.labelers.pretrained import CostPart, PretrainedLabeler
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
PHOTOS = 2
"""Photos of the embedded sample the dry run labels: SAM-H alone takes minutes of CPU per image."""
CROPS = 2
"""Crops per image the dry run tokenizes (production: 10): the whole view and one random crop, so
the crop path runs; the table projects production's crops from the VQ encoders' cost per crop."""
VQ_STEPS = 1
"""Training steps of each VQ tokenizer: enough to run the training path, not to learn anything."""
CC12M_IMAGES = 10_000_000
"""CC12M's images that still download, of its 12.4M urls (docs/cc12m.md): the totals' scale."""


def dry_run_config(production: Config, root: str = DRY_ROOT) -> Config:
    """``production`` at the dry run's scale, on this machine's CPU over the embedded sample (its
    download, sample and Ray settings), every architecture and input size kept.

    The dry-run scale: each labeler builds its production network at full size with random weights
    and takes its ``at_dry_run_scale`` settings (SAM: a 4 x 4 prompt grid instead of 32 x 32, and
    the cost table scales the measured decoder pass to production's grid: ``cost_parts``);
    ``PHOTOS`` photos, ``CROPS`` crops, ``VQ_STEPS`` tokenizer steps and 3 steps of 4M on batches
    of 2. One actor holds the labelers of a level: their CPU shares add up to this machine's cores,
    and so do its torch threads (that sum, rounded up).
    """
    embedded = load_config("default")
    label = production.label
    share = embedded.ray.num_cpus / max(len(label.labelers), 1)
    sections = {
        n: dataclasses.replace(
            cfg.at_dry_run_scale(),
            model=None,
            random_size="production",
            num_gpus=0.0,
            num_cpus=share,
            batch_size=2,
            concurrency=1,
        )
        for n, cfg in label.sections.items()
    }
    vq = {n: dataclasses.replace(cfg, steps=VQ_STEPS, batch_size=2) for n, cfg in production.tokenize.sections.items()}
    crops = dataclasses.replace(production.tokenize.crops, n_crops=min(CROPS, production.tokenize.crops.n_crops))
    return dataclasses.replace(
        production,
        root=root,
        verify_checksums=True,
        ray=embedded.ray,
        sample=dataclasses.replace(embedded.sample, photos=PHOTOS),
        download=embedded.download,
        label=dataclasses.replace(label, sections=sections, actor_groups=(tuple(label.labelers),)),
        tokenize=dataclasses.replace(
            production.tokenize, sections=vq, crops=crops, num_gpus=0.0, num_cpus=1.0, concurrency=1, batch_size=4
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
    """One network's figures at its production size, or an algorithm's CPU time."""

    stage: str
    """label, tokenize or train: the line of :func:`totals` it adds to."""
    what: str
    parameters: int | None
    """None: an algorithm, no weights."""
    gflops: float | None
    """Per image (per sample, forward and backward, for 4M's training step); None: an algorithm."""
    memory_gib: float | None
    """Peak resident memory of one image's (one batch's, for 4M) work beyond the loaded weights."""
    stored_bytes: float | None
    """Per image, as the dry run stored it (None: nothing stored per image)."""
    runs: float
    """How many times production runs it for CC12M: per image, per crop, or per trained sample."""
    cpu_ms: float | None = None
    """An algorithm's CPU time per image on this machine, one thread."""

    def row(self) -> str:
        stored = f"{self.stored_bytes / 1e3:,.1f} KB" if self.stored_bytes is not None else "-"
        if self.gflops is None or self.parameters is None or self.memory_gib is None:
            cells = [self.what, "-", "-", "-", "-", stored, "-", f"{self.cpu_ms:,.1f}"]
            return "| " + " | ".join(cells) + " |"
        per_second = UTILISATION * H100_BF16_FLOPS / (self.gflops * 1e9)
        weights = self.parameters * 4 / 2**30
        cells = [self.what, f"{self.parameters / 1e6:,.1f}M", f"{weights:.2f}", f"{self.gflops:,.1f}"]
        cells += [f"{self.memory_gib:.2f}", stored, f"{per_second:,.0f}", "-"]
        return "| " + " | ".join(cells) + " |"

    @property
    def h100_hours(self) -> float:
        """At ``UTILISATION`` of an H100, for all of CC12M's ``runs``; 0 for an algorithm (CPU work)."""
        return (self.gflops or 0.0) * 1e9 * self.runs / (UTILISATION * H100_BF16_FLOPS) / 3600


HEADER = (
    f"| {LABEL} | parameters | fp32 weights (GiB) | GFLOPs per image | peak memory beyond the weights (GiB) |"
    f" stored per image | projected H100 images/s at {UTILISATION:.0%} | CPU ms per image (algorithms) |\n"
    "|---|---|---|---|---|---|---|---|"
)
FORMULA = (
    f"projected images/s = {UTILISATION} x {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s (H100 dense bf16) / FLOPs per image;"
    " FLOPs counted by torch.utils.flop_counter on one image at the production input size (4M: one training"
    " step, forward and backward, per sample); a labeler measured in parts (SAM) sums its parts, each scaled to"
    " production as its row says"
)


def measure(config: Config, production: Config) -> list[Cost]:
    """The figures of every labeler, VQ tokenizer and 4M of a finished dry run of ``config``, at
    ``production``'s scale (its prompts, crops and training steps)."""
    root = DatasetRoot(config.root)
    return [
        *_labelers(config, production, root),
        *_tokenizers(config, production, root),
        _four_m(config, production, root),
    ]


def totals(costs: list[Cost]) -> str:
    """H100-hours for CC12M by stage, at ``UTILISATION``, from the measured FLOPs."""
    lines = [f"| CC12M ({CC12M_IMAGES / 1e6:.0f}M images) | H100-hours at {UTILISATION:.0%} |", "|---|---|"]
    for stage in dict.fromkeys(c.stage for c in costs):
        lines.append(f"| {stage} | {sum(c.h100_hours for c in costs if c.stage == stage):,.1f} |")
    lines.append(f"| **total** | **{sum(c.h100_hours for c in costs):,.1f}** |")
    return "\n".join(lines)


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


def _labelers(config: Config, production: Config, root: DatasetRoot) -> Iterator[Cost]:
    """Every labeler: a network's FLOPs and memory at production's scale, an algorithm's CPU time."""
    for name in config.label.labelers:
        cfg = config.label.labeler(name)
        labeler = LABELERS[name](cfg, config.label.size, models_dir(root) / name, root.path)
        batch = _one_image(root, name, cfg.input_size)
        stored = _stored_per_row(root.path / f"labels/{name}")
        if not isinstance(labeler, PretrainedLabeler):
            yield Cost(
                "label", f"label/{name} (algorithm)", None, None, None, stored, CC12M_IMAGES, _cpu_ms(labeler, batch)
            )
            continue
        labeler.setup()
        parts = labeler.cost_parts(batch, production.label.labeler(name))
        gflops, memory = _counted_parts(parts)
        notes = "; ".join(p.what for p in parts if p.flops_times != 1.0 or p.memory_times != 1.0)
        what = f"label/{name} @ {cfg.input_size} px" + (f" ({notes})" if notes else "")
        parameters = sum(p.numel() for p in labeler.model.parameters())
        yield Cost("label", what, parameters, gflops, memory, stored, CC12M_IMAGES)
        del labeler, parts


def _one_image(root: DatasetRoot, name: str, size: int) -> LabelBatch:
    """One random image at ``size`` px, with the first stored row of each label it reads (the dry
    run's own) and a caption: enough for any labeler, derived ones included."""
    pixels = np.random.default_rng(0).integers(0, 256, (1, size, size, 3)).astype(np.uint8)
    labels = {}
    for source in MODALITIES[name].label_inputs:
        files = sorted(p for p in (root.path / f"labels/{source}").glob("*.parquet") if not p.name.startswith("."))
        if files:
            labels[source] = pq.read_table(files[0]).slice(0, 1).to_pylist()
    return LabelBatch(pixels, keys=["dryrun"], alt_texts=["a photo"], original_sizes=[(size, size)], labels=labels)


def _cpu_ms(labeler: Labeler, batch: LabelBatch, repeats: int = 3) -> float:
    """CPU milliseconds of one image through an algorithm (process CPU time, best of ``repeats``)."""
    labeler.setup()
    best = math.inf
    for _ in range(repeats):
        started = time.process_time()
        labeler.labelled(batch)
        best = min(best, time.process_time() - started)
    return best * 1e3


def _counted_parts(parts: list[CostPart]) -> tuple[float, float]:
    """(GFLOPs, GiB) of one image at production's scale: each part's FLOPs times its repeats, the
    largest of the parts' peaks, each scaled to production's pass."""
    counted = [(_counted(part.run), part) for part in parts]
    gflops = sum(flops * part.flops_times for (flops, _), part in counted)
    memory = max(peak * part.memory_times for (_, peak), part in counted)
    return gflops, memory


def _tokenizers(config: Config, production: Config, root: DatasetRoot) -> Iterator[Cost]:
    """Every VQ tokenizer on one crop; production runs it on every crop of every image."""
    for modality in (m for m in map_modalities() if m in config.tokenize.modalities):
        tokenizer = load_tokenizer(root, modality)
        rows = read_whole_view(root, modality, 0, config, tokenizer)  # crop 0, as the tokenizer takes it
        value = next(v for v in rows.values if v is not None)
        gflops, memory = _counted(lambda tokenizer=tokenizer, value=value: tokenizer.encode([value]))
        parameters = sum(p.numel() for p in tokenizer.model.parameters())
        stored = _stored_per_row(root.path / f"tokens/{modality}")
        crops = production.tokenize.crops.n_crops if MODALITIES[modality].cropped else 1
        what = f"tokenize/{modality} (VQ, {tokenizer.vocab_size} codes; per crop, {crops} per image)"
        yield Cost("tokenize", what, parameters, gflops, memory, stored, CC12M_IMAGES * crops)


def _four_m(config: Config, production: Config, root: DatasetRoot) -> Cost:
    """4M's training step at the run's size and budgets, on a batch the run's own masking draws;
    production trains ``max_steps`` of its global batch."""
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
    trained = production.train
    samples_trained = trained.max_steps * trained.batch_size * trained.devices * trained.num_nodes
    return Cost(
        "train",
        f"train/4M-{cfg.model} (budgets {cfg.input_budget}/{cfg.target_budget}; {samples_trained / 1e6:,.0f}M samples)",
        model.parameter_count(),
        gflops / len(samples),
        memory,
        None,
        samples_trained,
    )


def report(costs: list[Cost]) -> str:
    return "\n".join([HEADER, *(c.row() for c in costs), "", totals(costs), "", FORMULA])
