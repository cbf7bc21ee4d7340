"""A modality from outside the repository: a user's own package adds one, and every stage runs it.

The package is written here, as a user would ship it: a module with a ``MODALITY`` spec (a
per-pixel luminance map of the existing ``continuous_map`` kind) and its algorithmic labeler, and
a distribution whose entry point in the ``four_m.modalities`` group names the module. Nothing
outside this file knows the modality. The stages run as the CLI runs them, in a new process (its Ray
workers included) that finds the package on ``PYTHONPATH``, over a copy of the session's labelled
and tokenized sample.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from four_m.core.label_codec import decode_png
from four_m.core.modalities import labelled_modalities
from four_m.core.views import label_view

PLUGIN = '''
"""luminance: Rec. 601 luma of the label view, in [0, 1] (a real label: an algorithm, no weights)."""

import numpy as np
import pyarrow as pa

from four_m.core.config import LabelerConfig, VQConfig
from four_m.core.label_codec import encode_png
from four_m.core.modalities import ModalitySpec
from four_m.labelers.base import AlgorithmicLabeler

WEIGHTS = np.array([0.299, 0.587, 0.114])


class LuminanceLabeler(AlgorithmicLabeler):
    name = "luminance"
    version = "1"

    def schema(self):
        return pa.schema([pa.field("luminance", pa.binary())])

    def label(self, pixels):
        luma = pixels.astype(np.float64) @ WEIGHTS / 255.0  # (B, S, S)
        return [{"luminance": encode_png(np.round(value * 65535).astype(np.uint16))} for value in luma]


MODALITY = ModalitySpec(
    name="luminance",
    kind="continuous_map",
    folder="labels/luminance",
    column="luminance",
    max_tokens=14 * 14,
    labeler="luminance_plugin:LuminanceLabeler",
    labeler_config=LabelerConfig(),
    tokenizer_config=VQConfig(),
    card_tasks=("image-to-image",),
    order=45,
)
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The user's package, installed the way pip lays out a distribution: module + dist-info."""
    site = tmp_path_factory.mktemp("site")
    (site / "luminance_plugin.py").write_text(PLUGIN)
    info = site / "luminance_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: luminance-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[four_m.modalities]\nluminance = luminance_plugin\n")
    return site


VERBS = ("label", "tokenizers", "tokenize", "train", "preview", "preview-tokens", "eval", "card")
RUN_VERBS = """
import sys
from four_m.cli import main

config, *verbs = sys.argv[1:]
for verb in verbs:
    print(f"=== {verb}", flush=True)
    status = main([verb, "--config", config, "--no-progress"])
    if status:
        sys.exit(f"{verb} exited with {status}")
"""
"""The CLI's own entry point, verb after verb in one new process (one torch import, not eight)."""


def _run_verbs(site: Path, config_file: Path) -> dict[str, str]:
    """Each verb's stdout, run as the CLI runs it in a process that finds the user's package."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", RUN_VERBS, str(config_file), *VERBS]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    parts = run.stdout.split("=== ")[1:]
    return {part.split("\n", 1)[0]: part.split("\n", 1)[1] for part in parts}


@pytest.mark.slow  # a minute: make test-all (make test keeps the plugin registry and config tests)
def test_a_modality_from_a_users_package_runs_through_every_stage(site, labelled, tokenized, tmp_path):
    sample_config, keys, _, _ = tokenized
    root = tmp_path / "root"
    shutil.copytree(sample_config.root, root)
    config_file = tmp_path / "luminance.yaml"
    config_file.write_text(yaml.safe_dump(_with_luminance(labelled[0], sample_config, root), sort_keys=False))

    out = _run_verbs(site, config_file)

    line = next(line for line in out["label"].splitlines() if line.startswith("label/luminance:"))
    assert line.startswith("label/luminance: rows 10, labelled 8, failed 2 (no_image: 2); shards done 3")
    assert "RANDOM-INIT" not in line, "an algorithm's labels are real"
    _check_luminance_labels(root, keys)

    crops = sample_config.tokenize.crops.n_crops  # a plugin map is cropped like the built-in ones
    assert f"tokenizers/luminance: samples {8 * crops}" in out["tokenizers"]
    assert "tokenize/luminance: rows in 10, rows out 8" in out["tokenize"]
    tokens = pq.read_table(root / "tokens/luminance/00000.parquet")["tokens"].to_pylist()
    assert all(len(t) == crops and all(len(c) == 16 for c in t) for t in tokens if t is not None)

    described = json.loads((root / "runs/plugin/model.json").read_text())
    assert [m["name"] for m in described["modalities"]] == ["rgb", "luminance", "caption"]

    columns = 1 + len(labelled_modalities()) + 1  # the image, every built-in label, luminance
    assert Image.open(root / "preview/labels.png").width == 64 * columns
    assert (root / "preview/tokens.png").is_file()

    assert "luminance" in out["eval"]
    metrics = json.loads((root / "runs/plugin/eval/metrics.json").read_text())
    assert "abs_rel" in json.dumps(metrics), "luminance is scored with its kind's metric"

    card = (root / "README.md").read_text()
    assert "config_name: labels-luminance" in card and "image-to-image" in card
    assert (root / "card/luminance_values.png").is_file(), "its kind's label plot"


def _with_luminance(label_config, sample_config, root: Path) -> dict:
    """The session's sample configs (the labels' and the tokens') with luminance added to each
    stage: the user's only edit."""
    data = yaml.safe_load(sample_config.to_yaml())
    data["root"] = str(root)
    data["label"] = yaml.safe_load(label_config.to_yaml())["label"]
    data["label"]["labelers"].append("luminance")
    data["label"]["luminance"] = {"input_size": 64}
    data["tokenize"]["modalities"].append("luminance")
    data["tokenize"]["luminance"] = {"grid": 4, "width": 8, "steps": 12, "codebook_size": 32, "batch_size": 4}
    data["train"].update(
        run="plugin",
        modalities=["rgb", "luminance", "caption"],
        model="nano",
        batch_size=4,
        input_budget=24,
        target_budget=24,
        max_steps=4,
        warmup_steps=1,
        holdout_shards=1,
        shuffle_buffer=8,
    )
    return data


def _check_luminance_labels(root: Path, keys: list[list[str]]) -> None:
    """The stored maps are the luma of the label view, as the formula gives it."""
    images = pq.read_table(root / "images/00000.parquet").to_pylist()
    labels = pq.read_table(root / "labels/luminance/00000.parquet").to_pylist()
    assert [r["key"] for r in labels] == keys[0]
    row = next(i for i, r in enumerate(labels) if r["error"] is None)
    view = np.asarray(label_view(images[row]["jpg"], 64), np.float64)
    expected = np.round(view @ np.array([0.299, 0.587, 0.114]) / 255.0 * 65535)
    stored = decode_png(labels[row]["luminance"]).astype(np.float64)
    assert stored.shape == (64, 64) and np.abs(stored - expected).max() <= 1
