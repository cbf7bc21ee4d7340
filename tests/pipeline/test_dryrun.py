"""``make dryrun``'s config: the production architectures and sizes, random weights, this CPU."""

from __future__ import annotations

from four_m.core.config import load_config
from four_m.pipeline.dryrun import dry_run_config


def test_the_dry_run_keeps_every_production_size_and_swaps_only_weights_scale_and_devices():
    production = load_config("cc12m")
    dry = dry_run_config(production, root="/tmp/dry")
    assert dry.root == "/tmp/dry" and dry.sample.enabled and dry.ray.address is None  # the embedded sample, here
    for name in production.label.labelers:
        made, real = dry.label.labeler(name), production.label.labeler(name)
        assert (made.model, made.random_size, made.num_gpus) == (None, "production", 0.0)
        assert made.input_size == real.input_size
    assert dry.label.labeler("caption").num_beams == production.label.labeler("caption").num_beams
    for modality, vq in production.tokenize.sections.items():
        made = dry.tokenize.vq(modality)
        assert (made.codebook_size, made.width, made.code_dim) == (vq.codebook_size, vq.width, vq.code_dim)
        assert made.steps < vq.steps
    assert dry.tokenize.num_gpus == 0 and dry.tokenize.text == production.tokenize.text
    train = dry.train
    assert (train.model, train.input_budget, train.target_budget, train.mixtures, train.input_alphas) == (
        production.train.model,
        production.train.input_budget,
        production.train.target_budget,
        production.train.mixtures,
        production.train.input_alphas,
    )
    assert (train.accelerator, train.devices, train.max_steps) == ("cpu", 1, 3)
