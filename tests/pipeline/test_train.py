"""Training a 4M model for real on the token store the pipeline made: Lightning, checkpoints, DDP."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from four_m.core.config import load_config
from four_m.core.errors import UserError
from four_m.core.halt import halt_after
from four_m.core.modalities import token_modalities
from four_m.core.runs import read_losses
from four_m.train.data import TokenStoreError
from four_m.train.evaluate import run_eval
from four_m.train.probe import run_probe
from four_m.train.run import TrainingMismatchError, run_finetune, run_train
from four_m.train.sample import write_samples
from four_m.train.trained import load_trained

NO_RECIPE = "finetune.train={}"
"""Fine-tune with the config's own train section (default.yaml's recipe is the demo's task)."""
NANO = [
    "train.model=nano",
    "train.batch_size=4",
    "train.input_budget=24",
    "train.target_budget=24",
    "train.warmup_steps=2",
    "train.log_every_n_steps=1",
    "train.shuffle_buffer=8",
]


@pytest.fixture
def root(tokenized, tmp_path) -> Path:
    """A private copy of the tokenized root: runs write under it."""
    config, _, _, _ = tokenized
    copy = tmp_path / "root"
    shutil.copytree(config.root, copy)
    return copy


def _config(root: Path, *extra: str):
    return load_config("default", ["label.size=64", "ray.num_cpus=2", *NANO, *extra], root=str(root))


def test_training_lowers_the_loss_writes_the_curve_and_weights(root):
    summary = run_train(_config(root, "train.max_steps=60", "train.learning_rate=0.003"))
    losses = [loss for _, loss in summary.losses]
    assert summary.steps == 60 and len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10, "the loss should fall by 30 % on 14 samples"
    run = root / "runs/tiny"
    assert (run / "loss.png").stat().st_size > 0 and (run / "model.safetensors").is_file()


def test_a_run_killed_after_a_checkpoint_resumes_with_the_uninterrupted_losses(root, tmp_path, run_ended, kill_session):
    """SIGKILL once the step-5 checkpoint exists; the rerun must continue exactly (same batches, same
    optimiser and schedule state), so steps 5..7 have the losses of a run never interrupted.

    The run halts before its final weights (core/halt.py): however fast it trains, the kill lands
    between the checkpoint and the end."""
    whole = run_train(_config(root, "train.max_steps=8", "train.run=whole"))
    config = _config(root, "train.max_steps=8", "train.run=split", "train.checkpoint_every_n_steps=5")
    config_file = tmp_path / "split.yaml"
    config_file.write_text(config.to_yaml())
    run_dir = root / "runs/split"
    halt = halt_after(0, f"{glob.escape(str(run_dir))}/model.safetensors", tmp_path / "halt")
    run = subprocess.Popen(
        [sys.executable, "-m", "four_m", "train", "--config", str(config_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, **halt},
    )
    last = run_dir / "checkpoints/last.ckpt"  # what a rerun resumes from: the step-5 checkpoint's copy
    deadline = time.monotonic() + 300
    while not last.is_file() and not run_ended(run) and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_session(run)
    assert last.is_file() and not (run_dir / "model.safetensors").exists(), "the kill should land mid-run"
    resumed = run_train(config)
    assert resumed.steps == 8
    split = dict(read_losses(root / "runs/split/logs"))
    assert [split[s] for s in (5, 6, 7)] == pytest.approx([dict(whole.losses)[s] for s in (5, 6, 7)], rel=1e-5)


def test_store_tokenizer_and_checkpoint_mismatches_stop_before_training(root):
    run_train(_config(root, "train.max_steps=2", "train.warmup_steps=0"))
    with pytest.raises(TrainingMismatchError, match="trained on rgb .* the token store now has rgb"):
        run_train(_config(root, "train.max_steps=3", "train.warmup_steps=0", "train.modalities=[rgb, depth]"))
    trained = root / "tokenizers/depth/trained.json"
    trained.write_text(trained.read_text().replace('"samples"', '"samples_"'))  # another tokenizer now
    with pytest.raises(TrainingMismatchError, match="tokens/depth were made by tokenizer depth-.* tokenizers/depth"):
        run_train(_config(root, "train.max_steps=3", "train.run=other"))


def test_a_token_store_alone_trains_once_the_pixel_input_is_left_out(root):
    """Runs include rgb_pixels (read from images/) by default; tokens copied without images/ still train."""
    shutil.rmtree(root / "images")
    short = ["train.max_steps=2", "train.warmup_steps=0"]
    with pytest.raises(TokenStoreError, match="leave rgb_pixels out of train.modalities"):
        run_train(_config(root, *short))
    summary = run_train(_config(root, *short, f"train.modalities=[{', '.join(token_modalities())}]"))
    assert summary.steps == 2


def test_two_process_ddp_on_cpu_finishes_with_equal_steps(root, tmp_path):
    config_file = tmp_path / "ddp.yaml"
    extra = ["train.max_steps=4", "train.strategy=ddp", "train.devices=2", "train.accelerator=cpu", "train.run=ddp"]
    config_file.write_text(_config(root, *extra).to_yaml())
    run = subprocess.run(
        [sys.executable, "-m", "four_m", "train", "--config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "train: 4 steps of any-to-any masking on " in run.stdout
    assert (root / "runs/ddp/checkpoints/last.ckpt").is_file()


def test_a_finetune_starts_from_a_run_adds_a_modality_trains_lora_and_saves_merged_weights(root):
    source = run_train(_config(root, "train.max_steps=3", "train.run=source", "train.modalities=[rgb,depth,caption]"))
    assert source.steps == 3
    options = ["train.max_steps=4", "train.run=tuned", "train.modalities=[rgb,depth,caption,canny_edge]"]
    options += ["finetune.from_run=source", "finetune.lora_rank=2", "finetune.freeze_encoder_steps=2", NO_RECIPE]
    summary = run_finetune(_config(root, *options, "finetune.new_learning_rate=0.01"))
    lines = "\n".join(summary.lines())
    assert (
        "modalities kept ['rgb', 'depth', 'caption']" in lines and "new (freshly initialised) ['canny_edge']" in lines
    )
    assert "LoRA rank 2" in lines and "encoder frozen for the first 2 steps" in lines and summary.steps == 4
    described = json.loads((root / "runs/tuned/model.json").read_text())
    assert described["finetuned_from"] == "source"
    tuned = load_trained(_config(root, "train.run=tuned")).model  # merged: it loads as any run's weights
    before = load_trained(_config(root, "train.run=source")).model
    assert set(tuned.state_dict()) - set(before.state_dict()) == {
        "token_embeddings.canny_edge.weight",
        "heads.canny_edge.weight",
    }
    query = "decoder.0.self_attention.query.weight"
    assert not torch.equal(tuned.state_dict()[query], before.state_dict()[query])  # LoRA's update, merged in
    norm = "encoder_norm.weight"
    assert torch.equal(tuned.state_dict()[norm], before.state_dict()[norm])  # LoRA leaves other weights alone


def test_a_finetune_from_a_missing_run_or_onto_itself_stops_in_one_line(root):
    with pytest.raises(UserError, match="no finished run in .*runs/nowhere"):
        run_finetune(_config(root, "finetune.from_run=nowhere", "train.run=tuned", NO_RECIPE))
    with pytest.raises(UserError, match="name a new run"):
        run_finetune(_config(root, "finetune.from_run=tiny", "train.run=tiny", NO_RECIPE))


def test_a_task_finetune_trains_the_task_alone_and_eval_scores_that_task_and_a_probe_reads_the_encoder(root):
    pretrained = "train.modalities=[rgb_pixels,rgb,canny_edge,semseg]"
    run_train(_config(root, "train.max_steps=3", "train.run=source", pretrained))
    recipe = "{run: edges, task: {inputs: [rgb_pixels], targets: [canny_edge]}, input_budget: 196, target_budget: 196}"
    summary = run_finetune(_config(root, "finetune.from_run=source", f"finetune.train={recipe}", "train.max_steps=3"))
    lines = "\n".join(summary.lines())
    assert "train: 3 steps of task rgb_pixels -> canny_edge (inputs whole, targets whole)" in lines
    assert "modalities kept ['rgb_pixels', 'canny_edge']" in lines and "left behind ['rgb', 'semseg']" in lines
    described = json.loads((root / "runs/edges/model.json").read_text())
    assert described["task"] == {"inputs": ["rgb_pixels"], "targets": ["canny_edge"]}
    assert [m["name"] for m in described["modalities"]] == ["rgb_pixels", "canny_edge"]

    report = run_eval(_config(root, "train.run=edges"))
    assert report.shown == ("rgb_pixels",) and report.targets == ("canny_edge",) and report.rows > 0
    scored = json.loads((root / "runs/edges/eval/metrics.json").read_text())["results"]
    assert set(scored) == {"canny_edge"} and scored["canny_edge"]["edge_f1"]["model"] is not None
    grid = write_samples(_config(root, "train.run=edges", "generate.samples=2", "generate.steps=2"))
    assert grid.name == "rgb-to-canny_edge.png"  # without FROM/TO a task run samples its task

    probe = run_probe(_config(root, "train.run=source", "probe.steps=3", "probe.target=semseg"))
    assert probe.rows[0] > 0 and probe.rows[1] > 0
    figures = json.loads((root / "runs/source/probe/semseg.json").read_text())
    assert 0.0 <= figures["results"]["semseg"]["miou"]["probe"] <= 1.0
    assert figures["rows"] == {"training": probe.rows[0], "held_out": probe.rows[1]}
    tuned = run_probe(_config(root, "train.run=source", "probe.steps=2", "probe.finetune_backbone=true"))
    assert "(fine-tuned encoder, 2 steps)" in tuned.description
