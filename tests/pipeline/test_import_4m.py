"""ml-4m's released model and image tokenizers, imported (synthetic checkpoints with ml-4m's key
names and shapes) and run through this project's stages: make tokenizers imports a ViT VQ-VAE
(semseg) and a diffusion-decoder one (RGB), make tokenize writes their tokens, make import-4m
converts the model, make finetune trains it on a task and make sample draws from the result,
decoding RGB with the diffusion decoder."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import save_file

from four_m.core.config import load_config
from four_m.core.dataset_root import DatasetRoot
from four_m.pipeline.tokenize import run_tokenize
from four_m.pipeline.tokenizers import run_tokenizer_training
from four_m.tokenize.ml4m_tokenizer import ML4MTokenizer
from four_m.tokenize.registry import load_tokenizer, tokenizer_id
from four_m.train.import_run import run_import
from four_m.train.run import run_finetune
from four_m.train.sample import write_samples
from tests.tokenize import ml4m_tokenizer_checkpoint as tokenizer_checkpoint
from tests.train import ml4m_checkpoint as model_checkpoint

VOCABS = {"tok_semseg@224": tokenizer_checkpoint.CODES, "tok_rgb@224": tokenizer_checkpoint.CODES}


@pytest.mark.slow  # about a minute of stages (make test-all): the converters' own tests run in make test
def test_an_imported_tokenizer_and_model_run_through_tokenize_finetune_and_sample(tokenized, tiny_tokenizers, tmp_path):
    labelled, _, _, _ = tokenized
    root = tmp_path / "root"
    shutil.copytree(labelled.root, root)
    for modality in ("semseg", "rgb"):  # the imports replace them
        for stale in (f"tokenizers/{modality}", f"tokens/{modality}", f"_state/tokenize/{modality}"):
            shutil.rmtree(root / stale)
    semseg = tokenizer_checkpoint.write(tmp_path / "4M_tokenizers_semseg", tokenizer_checkpoint.weights(grid=28))
    rgb_weights = tokenizer_checkpoint.divae_weights()
    rgb = tokenizer_checkpoint.write(tmp_path / "4M_tokenizers_rgb", rgb_weights, **tokenizer_checkpoint.DIVAE_CONFIG)
    base = [
        f"label.size={labelled.label.size}",
        "ray.num_cpus=2",
        *tiny_tokenizers,
        f"tokenize.semseg.source={semseg}",
        f"tokenize.rgb.source={rgb}",
    ]
    config = load_config("default", base, root=str(root))
    trained = run_tokenizer_training(config)
    assert "imported_from" in json.loads((root / "tokenizers/semseg/trained.json").read_text())["metrics"]
    run_tokenize(config, progress=False)
    for modality in ("semseg", "rgb"):
        imported = load_tokenizer(DatasetRoot(root), modality)
        assert isinstance(imported, ML4MTokenizer) and imported.vocab_size == tokenizer_checkpoint.CODES
    assert trained.trained  # the stage ran and reported

    model = tmp_path / "4M-tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(model_checkpoint.config(VOCABS)))
    weights = model_checkpoint.weights(vocabs=VOCABS)
    save_file(model_checkpoint.saved(weights, VOCABS), str(model / "model.safetensors"))
    report = run_import(load_config("default", [*base, "train.run=imported"], root=str(root)), str(model))
    described = json.loads((root / "runs/imported/model.json").read_text())
    for modality in ("semseg", "rgb"):  # the root's imports
        assert described["tokenizers"][modality] == tokenizer_id(DatasetRoot(root), modality)
    assert report.modalities == {"semseg": "tok_semseg@224", "rgb": "tok_rgb@224", "rgb_pixels": "rgb@224"}

    task = "{inputs: [rgb_pixels], targets: [semseg, rgb]}"
    recipe = f"{{run: tuned, task: {task}, input_budget: 196, target_budget: 32}}"
    options = [
        *base,
        "finetune.from_run=imported",
        f"finetune.train={recipe}",
        "train.max_steps=2",
        "train.batch_size=2",
    ]
    summary = run_finetune(load_config("default", [*options, "train.warmup_steps=0"], root=str(root)))
    lines = "\n".join(summary.lines())
    assert summary.steps == 2 and "modalities kept ['rgb_pixels', 'semseg', 'rgb']" in lines
    assert "another token grid than the source's" in lines and "semseg (196 -> 16 positions)" in lines  # 64 px crops
    tuned = json.loads((root / "runs/tuned/model.json").read_text())
    assert tuned["model"]["context_token"] is False and tuned["model"]["norm_eps"] == 1e-6  # the source's build

    grid = write_samples(load_config("default", [*base, "train.run=tuned", "generate.samples=1"], root=str(root)))
    assert grid.name == "rgb-to-semseg+rgb.png" and grid.stat().st_size > 0
