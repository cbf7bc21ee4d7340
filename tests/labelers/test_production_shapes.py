"""The dry run's full-size random-init labelers have the named checkpoints' shapes: their parameter
counts are the published ones (slow: about a gigabyte of random weights is written and read)."""

from __future__ import annotations

import dataclasses

import pytest

from four_m.core.config import load_config
from four_m.labelers.base import LabelBatch
from four_m.labelers.registry import LABELERS

PUBLISHED = {
    "depth": 123e6,  # Intel/dpt-hybrid-midas (DPT-Hybrid)
    "normal": 123e6,  # Omnidata's DPT-Hybrid
    "semseg": 107e6,  # Mask2Former Swin-B, COCO panoptic
    "det": 68.2e6,  # YOLOv8x
    "caption": 470e6 - 30524 * 768,  # BLIP-large; the published count holds the tied word embeddings twice
    "clip": 86e6,  # CLIP ViT-B/16's vision tower and projection
    "dinov2": 86.6e6,  # DINOv2 ViT-B/14
    "sam_instance": 641e6,  # SAM ViT-H
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_the_full_size_random_labelers_have_the_production_parameter_counts(name, tmp_path, batch):
    production = load_config("cc12m").label.labeler(name)
    cfg = dataclasses.replace(production, model=None, random_size="production", num_gpus=0.0)
    labeler = LABELERS[name](cfg, 224, tmp_path / name)
    labeler.setup()
    assert labeler.provenance()["random_size"].startswith("production (dry run")
    parameters = sum(p.numel() for p in labeler.model.parameters())
    assert parameters == pytest.approx(PUBLISHED[name], rel=0.02)
    (payload,) = labeler.labelled(LabelBatch(batch(cfg.input_size)[:1]))
    assert set(payload) == set(labeler.schema().names)
