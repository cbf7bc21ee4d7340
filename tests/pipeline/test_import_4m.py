"""ml-4m's released model and image tokenizer, imported (synthetic checkpoints with ml-4m's key
names and shapes) and run through this project's stages: make tokenizers imports the tokenizer,
make tokenize writes its tokens, make import-4m converts the model, make finetune trains it on a
task and make sample draws from the result."""

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

SEMSEG = {"tok_semseg@224": tokenizer_checkpoint.CODES}


@pytest.mark.slow  # about a minute of stages (make test-all): the converters' own tests run in make test
def test_an_imported_tokenizer_and_model_run_through_tokenize_finetune_and_sample(tokenized, tiny_tokenizers, tmp_path):
    labelled, _, _, _ = tokenized
    root = tmp_path / "root"
    shutil.copytree(labelled.root, root)
    for stale in ("tokenizers/semseg", "tokens/semseg", "_state/tokenize/semseg"):  # the import replaces them
        shutil.rmtree(root / stale)
    tokenizer = tokenizer_checkpoint.write(tmp_path / "4M_tokenizers_semseg", tokenizer_checkpoint.weights(grid=28))
    base = [
        f"label.size={labelled.label.size}",
        "ray.num_cpus=2",
        *tiny_tokenizers,
        f"tokenize.semseg.source={tokenizer}",
    ]
    config = load_config("default", base, root=str(root))
    trained = run_tokenizer_training(config)
    assert "imported_from" in json.loads((root / "tokenizers/semseg/trained.json").read_text())["metrics"]
    run_tokenize(config, progress=False)
    imported = load_tokenizer(DatasetRoot(root), "semseg")
    assert isinstance(imported, ML4MTokenizer) and imported.vocab_size == tokenizer_checkpoint.CODES
    assert trained.trained  # the stage ran and reported

    model = tmp_path / "4M-tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(model_checkpoint.config(SEMSEG)))
    weights = model_checkpoint.weights(vocabs=SEMSEG)
    save_file(model_checkpoint.saved(weights, SEMSEG), str(model / "model.safetensors"))
    report = run_import(load_config("default", [*base, "train.run=imported"], root=str(root)), str(model))
    described = json.loads((root / "runs/imported/model.json").read_text())
    assert described["tokenizers"]["semseg"] == tokenizer_id(DatasetRoot(root), "semseg")  # the root's import
    assert report.modalities == {"semseg": "tok_semseg@224", "rgb_pixels": "rgb@224"}

    recipe = "{run: tuned, task: {inputs: [rgb_pixels], targets: [semseg]}, input_budget: 196, target_budget: 16}"
    options = [
        *base,
        "finetune.from_run=imported",
        f"finetune.train={recipe}",
        "train.max_steps=2",
        "train.batch_size=2",
    ]
    summary = run_finetune(load_config("default", [*options, "train.warmup_steps=0"], root=str(root)))
    assert summary.steps == 2 and "modalities kept ['rgb_pixels', 'semseg']" in "\n".join(summary.lines())
    tuned = json.loads((root / "runs/tuned/model.json").read_text())
    assert tuned["model"]["context_token"] is False and tuned["model"]["norm_eps"] == 1e-6  # the source's build

    grid = write_samples(load_config("default", [*base, "train.run=tuned", "generate.samples=1"], root=str(root)))
    assert grid.name == "rgb-to-semseg.png" and grid.stat().st_size > 0
