"""Training one map modality's VQ tokenizer with Lightning, on values already in memory.

``train_vq`` is the whole job: seed, train ``cfg.steps`` steps of AdamW with a short linear warmup
on random batches (horizontally flipped at random where the adapter allows), then measure the
reconstruction metric, codebook usage and perplexity on the training values, and write the
tokenizer, ``metrics.json`` and the CSV training log into one folder.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset, RandomSampler

from four_m.core.config import VQConfig
from four_m.core.dataset_root import write_text_atomic
from four_m.core.errors import UserError
from four_m.core.precision import lightning_precision
from four_m.tokenize.maps import MapAdapter
from four_m.tokenize.vq import INFERENCE_BATCH, VQModel, VQTokenizer

METRICS_FILE = "metrics.json"
LOG_DIR = "train_log"
"""The CSV log's folder inside the output folder (``metrics.csv``, one row per logged step)."""


class MapValues(Dataset):
    """Checked values as tensors, each flipped left-right with probability 1/2 if the adapter allows."""

    def __init__(self, values: Sequence[np.ndarray], adapter: MapAdapter):
        self.values = values
        self.flip = adapter.flippable

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: int) -> torch.Tensor:
        value = self.values[index]
        if self.flip and torch.rand(()) < 0.5:  # torch's generator: seeded with the run
            value = np.ascontiguousarray(value[..., ::-1])  # the last axis is width for every map
        return torch.from_numpy(value)


class VQTraining(L.LightningModule):
    """Reconstruction loss of the adapter plus the quantizer's commitment loss, by AdamW."""

    def __init__(self, model: VQModel, cfg: VQConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.losses: list[torch.Tensor] = []
        """Each step's loss, kept on the device: no host sync per step."""

    def training_step(self, batch: torch.Tensor, batch_index: int) -> torch.Tensor:
        output, quantized = self.model(batch)
        reconstruction = self.model.adapter.loss(output, batch)
        loss = reconstruction + quantized.loss
        self.log_dict(
            {
                "train/loss": loss,
                "train/reconstruction": reconstruction,
                "train/usage": quantized.usage,
                "train/active": quantized.active,
                "train/perplexity": quantized.perplexity,
            },
            on_step=True,
            on_epoch=False,
        )
        self.losses.append(loss.detach())
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.cfg.learning_rate)
        # A linear warmup over the first 5% of steps: Adam's first updates rest on moment
        # estimates from a handful of batches.
        warmup = max(1, self.cfg.steps // 20)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def train_vq(
    modality: str,
    values: Sequence[np.ndarray],
    cfg: VQConfig,
    image_size: int,
    out_dir: Path,
    adapter_params: Mapping[str, Any] | None = None,
    accelerator: str = "cpu",
    precision: str = "auto",
) -> dict[str, Any]:
    """Train, evaluate and save one VQ tokenizer; returns what ``metrics.json`` holds.

    Args:
        values: the modality's values (none absent), checked before training starts.
        image_size: the values' side: the label view for maps, the feature grid for clip.
        out_dir: receives ``config.json``, ``model.safetensors``, ``metrics.json`` and the CSV log.
        adapter_params: the adapter's settings besides size, as ``ADAPTERS[modality].params_of``
            reads them from a label file: ``{"classes": C}`` for semseg, ``{"dim": D}`` for clip.
        accelerator: Lightning's accelerator name ("cpu", "gpu", "auto"); one device either way,
            since the quantizer's EMA updates are not synchronised across replicas.
        precision: ``core.precision``'s setting: mixed precision on a GPU under ``auto``.
    """
    if not values:
        raise UserError(f"{modality}: no values to train a VQ tokenizer on")
    out_dir = Path(out_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # before the model: its init is seeded too
    tokenizer = VQTokenizer(modality, cfg, image_size, adapter_params)
    for value in values:
        tokenizer.adapter.check(value)
    dataset = MapValues(values, tokenizer.adapter)
    # One "epoch" of exactly steps * batch_size draws, reshuffled whenever the values run out.
    sampler = RandomSampler(dataset, num_samples=cfg.steps * cfg.batch_size)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler)
    training = VQTraining(tokenizer.model, cfg)
    # Lightning's INFO lines (no GPU, max_steps reached) repeat per tokenizer and drown the summary.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=lightning_precision(precision, "cuda" if accelerator == "gpu" else "cpu"),
        max_steps=cfg.steps,
        max_epochs=1,
        logger=CSVLogger(out_dir, name="", version=LOG_DIR),
        log_every_n_steps=min(10, cfg.steps),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        # Deterministic where torch has such kernels; a warning (not an error) where it has none.
        deterministic="warn",
    )
    # Lightning keeps the modes modules enter fit with, and a tokenizer's model starts in eval mode.
    trainer.fit(training.train(), loader)
    tokenizer.model.eval().to(trainer.strategy.root_device)
    losses = torch.stack(training.losses).cpu().numpy()
    window = max(1, len(losses) // 10)  # single steps are noisy: compare the first and last tenths
    metrics = {
        "modality": modality,
        "samples": len(values),
        "steps": len(losses),
        "loss_first": float(losses[:window].mean()),
        "loss_last": float(losses[-window:].mean()),
        **evaluate(tokenizer, values),
    }
    tokenizer.to("cpu").save(out_dir)
    write_text_atomic(out_dir / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    return metrics


def evaluate(tokenizer: VQTokenizer, values: Sequence[np.ndarray]) -> dict[str, Any]:
    """Reconstruction metric, codebook usage and perplexity of ``values`` through their tokens."""
    adapter = tokenizer.adapter
    sums = []
    counts = np.zeros(tokenizer.vocab_size, np.int64)
    for start in range(0, len(values), INFERENCE_BATCH):
        chunk = values[start : start + INFERENCE_BATCH]
        ids = tokenizer.encode(chunk)
        reconstructed = tokenizer.decode(ids)
        sums.append(adapter.metric_sums(np.stack(reconstructed), np.stack(chunk)))
        counts += np.bincount(np.concatenate(ids), minlength=tokenizer.vocab_size)
    probs = counts[counts > 0] / counts.sum()
    return {
        "reconstruction_metric": adapter.metric_name,
        "reconstruction": adapter.metric(np.sum(sums, axis=0)),
        "codebook_usage": float((counts > 0).mean()),
        "perplexity": float(math.exp(-(probs * np.log(probs)).sum())),
    }
