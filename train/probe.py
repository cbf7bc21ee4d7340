"""``make probe``: a trained run's encoder as an RGB backbone, with a small dense head trained on one
label folder of this root (``probe`` in the config), scored on the held-out shards.

The head is a linear map per patch (D -> ``width``), bilinearly upsampled from the patch grid to
``probe.side``, then the target's own output layer and loss: those of its VQ tokenizer's decoder
(``MapAdapter.head``/``loss``/``to_values``: a per-pixel classifier and cross-entropy for semseg,
a 3x3 convolution and L1 + L2 for depth). It trains against labels resized to that side (56 px by
default: at 224 px a step on two CPU cores costs 16 times more, for a head that sees 14x14
patches anyway); for scoring, its outputs are upsampled bilinearly to the label's own side. With
``finetune_backbone: false`` only the head trains, a linear probe of the frozen encoder; with
``true`` the encoder trains too, at its own rate.

Pixels and labels are those of the training shards and of the held-out shards of ``train.holdout_shards``,
as ``make eval`` splits them, crop 0 (the whole label view). A row without an image or without the
label is left out and counted in the report. The figure is ``make eval``'s metric of the target
(``train.metrics``) beside its baseline fitted on the training labels.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from four_m.core import storage
from four_m.core.config import Config, ProbeConfig
from four_m.core.crops import WHOLE
from four_m.core.dataset_root import DatasetRoot, write_text_atomic
from four_m.core.errors import UserError
from four_m.core.modalities import of_kind
from four_m.core.views import label_view
from four_m.tokenize.maps import ADAPTERS, MapAdapter
from four_m.tokenize.sources import crop_adapter, read_rows, source_file
from four_m.train.backbone import FourMBackbone, load_backbone
from four_m.train.data import TokenShards, image_rows
from four_m.train.metrics import BASELINES, METRICS, results_table


@dataclass
class ProbeRows:
    """Rows of some shards with both an image and the target's label, in memory."""

    images: Tensor
    """(N, 3, S, S) float in [0, 1], at the backbone's side."""
    labels: list[np.ndarray]
    """The target's values at the adapter's side."""
    missing: int
    """Rows left out: no image, or no label (its labeler failed)."""


class DenseHead(nn.Module):
    """(B, D, G, G) patch features -> (B, outputs, S, S): linear per patch, upsampled, the target's output layer."""

    def __init__(self, features: int, adapter: MapAdapter, width: int):
        super().__init__()
        self.side = adapter.size  # the side it predicts at
        self.linear = nn.Conv2d(features, width, 1)
        self.output = adapter.head(width)

    def forward(self, features: Tensor) -> Tensor:
        x = F.interpolate(self.linear(features), size=(self.side, self.side), mode="bilinear", align_corners=False)
        return self.output(x)


def frozen_features(backbone: FourMBackbone, images: Tensor, batch: int) -> Tensor:
    """(N, 3, S, S) images -> (N, D, G, G) features of the frozen backbone, computed once: the steps
    of a linear probe then cost the head's alone."""
    backbone.eval()
    with torch.no_grad():
        return torch.cat([backbone.dense(part) for part in images.split(batch)])


class ProbeTraining(L.LightningModule):
    """The head, and the backbone when it trains too (``backbone`` None: a linear probe, whose
    inputs are :func:`frozen_features`)."""

    def __init__(self, features: int, adapter: MapAdapter, cfg: ProbeConfig, backbone: FourMBackbone | None = None):
        super().__init__()
        self.adapter, self.cfg, self.backbone = adapter, cfg, backbone
        self.head = DenseHead(features, adapter, cfg.width)

    def forward(self, inputs: Tensor) -> Tensor:
        """Images (a trained backbone) or their frozen features -> the target's raw outputs."""
        return self.head(self.backbone.dense(inputs) if self.backbone is not None else inputs)

    def training_step(self, batch: tuple[Tensor, Tensor], index: int) -> Tensor:
        inputs, labels = batch
        loss = self.adapter.loss(self(inputs), labels)
        self.log("probe_loss", loss, prog_bar=False)
        return loss

    def configure_optimizers(self):
        groups = [{"params": self.head.parameters(), "lr": self.cfg.learning_rate}]
        if self.backbone is not None:
            groups.append({"params": self.backbone.parameters(), "lr": self.cfg.backbone_learning_rate})
        optimizer = torch.optim.AdamW(groups, weight_decay=0.05)
        steps = self.cfg.steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@dataclass(frozen=True)
class ProbeReport:
    table: str
    rows: tuple[int, int]
    """(training rows, held-out rows) with both an image and the label."""
    missing: int
    written: tuple[storage.RootPath, storage.RootPath]
    seconds: float
    description: str

    def lines(self) -> list[str]:
        trained, held_out = self.rows
        return [
            f"probe: {self.description}; {trained} training rows, {held_out} held-out rows"
            f" ({self.missing} without image or label left out); {self.seconds:.1f} s",
            *self.table.rstrip().splitlines(),
            f"probe: wrote {self.written[0]} and {self.written[1]}",
        ]


def run_probe(config: Config) -> ProbeReport:
    started = time.perf_counter()
    cfg, root = config.probe, DatasetRoot(config.root)
    run = root / f"runs/{config.train.run}"
    backbone = load_backbone(run)
    shards = TokenShards(root.path, (cfg.target,), holdout=config.train.holdout_shards)
    if not shards.held_out:
        raise UserError("train.holdout_shards is 0: nothing is held out to score a probe on; set it to 1 or more")
    first_labels = source_file(root, cfg.target, int(shards.shards[0].name))
    params = ADAPTERS[cfg.target].params_of(storage.read_schema(first_labels))
    adapter = crop_adapter(cfg.target, config, params)  # labels as the run's tokenizer takes them
    trained = replace(adapter, size=min(cfg.side, adapter.size))  # ... and as the head trains on them
    training = read_probe_rows(root, config, [int(s.name) for s in shards.shards], trained, backbone, cfg.max_rows)
    held_out = read_probe_rows(root, config, [int(s.name) for s in shards.held_out], adapter, backbone)
    if not len(training.images) or not len(held_out.images):
        raise UserError(f"no training or no held-out row has both an image and a {cfg.target} label")

    L.seed_everything(cfg.seed, verbose=False)
    tuned = backbone.train() if cfg.finetune_backbone else None
    module = ProbeTraining(backbone.num_features, trained, cfg, tuned)

    def inputs(images: Tensor) -> Tensor:
        return images if tuned is not None else frozen_features(backbone, images, cfg.batch_size)

    labels = torch.from_numpy(np.stack(training.labels))
    loader = DataLoader(
        TensorDataset(inputs(training.images), labels),
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    trainer = L.Trainer(
        max_steps=cfg.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=loader)

    baseline = BASELINES[cfg.target]()
    baseline.fit(training.labels)
    fixed = adapter.crop(baseline.predict(), WHOLE)  # fitted at the training side, scored at the label's
    scores = {"baseline": METRICS[cfg.target](), "probe": METRICS[cfg.target]()}
    module.eval()
    with torch.no_grad():
        for start in range(0, len(held_out.images), cfg.batch_size):
            outputs = module(inputs(held_out.images[start : start + cfg.batch_size]))
            outputs = F.interpolate(outputs, size=(adapter.size, adapter.size), mode="bilinear", align_corners=False)
            predicted = adapter.to_values(outputs).numpy()
            for value, label in zip(predicted, held_out.labels[start : start + cfg.batch_size], strict=True):
                scores["probe"].update(value, label)
                scores["baseline"].update(fixed, label)
    table, data = results_table({column: {cfg.target: metric.result()} for column, metric in scores.items()})
    kind = "fine-tuned encoder" if cfg.finetune_backbone else "linear probe, frozen encoder"
    description = f"{cfg.target} from run {run.name}'s encoder ({kind}, {cfg.steps} steps)"
    out = run / "probe"
    markdown, figures = out / f"{cfg.target}.md", out / f"{cfg.target}.json"
    write_text_atomic(markdown, f"# {description}\n\n{table}")
    summary = {"rows": {"training": len(training.images), "held_out": len(held_out.images)}, **data}
    write_text_atomic(figures, json.dumps({"probe": asdict(cfg), **summary}, indent=1) + "\n")
    missing = training.missing + held_out.missing
    rows = (len(training.images), len(held_out.images))
    return ProbeReport(table, rows, missing, (markdown, figures), time.perf_counter() - started, description)


def read_probe_rows(
    root: DatasetRoot,
    config: Config,
    shards: list[int],
    adapter: MapAdapter,
    backbone: FourMBackbone,
    limit: int | None = None,
) -> ProbeRows:
    """The rows of ``shards`` with an image (cut to the backbone's side) and a label (crop 0, at the
    adapter's side), the first ``limit`` of them."""
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    missing = 0
    image = of_kind("image")[0]
    for shard in shards:
        label_rows = read_rows(root, adapter.modality, shard, config)
        with storage.parquet_file(source_file(root, image, shard)) as file:
            photos = [data for _, data, _ in image_rows(file)]
        for data, value in zip(photos, label_rows.values, strict=True):
            view = label_view(data, backbone.image_size)  # None where the image is missing or broken
            if view is None or value is None:
                missing += 1
                continue
            images.append(view)
            labels.append(adapter.crop(value, WHOLE))
            if limit is not None and len(images) == limit:
                return _rows(images, labels, missing)
    return _rows(images, labels, missing)


def _rows(images: list[np.ndarray], labels: list[np.ndarray], missing: int) -> ProbeRows:
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255 if images else torch.empty(0)
    return ProbeRows(stacked, labels, missing)
