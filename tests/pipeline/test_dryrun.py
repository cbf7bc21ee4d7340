"""``make dryrun``'s config: the production architectures and sizes, random weights, this CPU."""

from __future__ import annotations

import dataclasses
import math

from four_m.core.config import load_config
from four_m.pipeline.dryrun import H100_BF16_FLOPS, UTILISATION, Cost, dry_run_config, totals
from four_m.pipeline.label import label_levels

SWAPPED = {"model", "random_size", "num_gpus", "num_cpus", "batch_size", "concurrency"}
"""What the dry run changes in every labeler's section: weights, devices and scheduling."""


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


def test_the_dry_run_scale_cuts_sams_prompts_photos_and_crops_but_no_architecture():
    production = load_config("cc12m")
    dry = dry_run_config(production)
    for name in production.label.labelers:
        made, real = dry.label.labeler(name), production.label.labeler(name)
        changed = {f.name for f in dataclasses.fields(real) if getattr(made, f.name) != getattr(real, f.name)}
        expected = {"points_per_side", "points_per_batch"} if name == "sam_instance" else set()
        assert changed - SWAPPED == expected, name
    sam = dry.label.labeler("sam_instance")
    assert sam.points_per_side < production.label.labeler("sam_instance").points_per_side
    assert dry.sample.photos is not None and dry.sample.photos >= 2  # 4M's batch of 2 needs two samples
    assert 1 < dry.tokenize.crops.n_crops < production.tokenize.crops.n_crops  # a random crop still runs


def test_the_labelers_actor_runs_on_every_core_and_leaves_the_read_tasks_room():
    dry = dry_run_config(load_config("cc12m"))
    cores = dry.ray.num_cpus
    for level in label_levels(dry.label.labelers):
        (pool,) = dry.label.pools(level)
        cpus = dry.label.pool_settings(pool).num_cpus
        assert cpus <= cores  # the label stage's own check (_check_resources)
    first = dry.label.pool_settings(label_levels(dry.label.labelers)[0]).num_cpus
    assert math.ceil(first) == cores  # the actor's torch threads


def test_totals_turn_flops_into_h100_hours_per_stage():
    hour = UTILISATION * H100_BF16_FLOPS * 3600 / 1e9  # GFLOPs one H100 does in an hour at that share
    costs = [
        Cost("label", "a", 1, hour / 10, 0.0, None, runs=10),
        Cost("label", "b (algorithm)", None, None, None, None, runs=10, cpu_ms=1.0),
        Cost("tokenize", "c", 1, hour / 20, 0.0, None, runs=60),
    ]
    lines = totals(costs).splitlines()
    assert lines[2:] == ["| label | 1.0 |", "| tokenize | 3.0 |", "| **total** | **4.0** |"]
