"""A run's files read back by every reader (a fine-tune's source, the probe's backbone, sample and
eval): a ``model.json`` or ``model.safetensors`` this version did not write (edited, cut short,
another format) is refused in one line naming the file, never a traceback."""

from __future__ import annotations

import json
import re

import pytest

from four_m.cli import main
from four_m.core.config import load_config
from four_m.train.backbone import load_backbone
from four_m.train.finetune import FinetuneStart
from four_m.train.trained import RunFileError
from tests.train.test_backbone import save_run

pytestmark = pytest.mark.usefixtures("one_thread")


def _edit(described: dict, change: str) -> object:
    """``model.json``'s content with one thing wrong."""
    model, modalities = described["model"], described["modalities"]
    return {
        "unknown model key": {**described, "model": {**model, "flash_attention": True}},
        "unknown modality key": {**described, "modalities": [{**modalities[0], "shape": "map"}, *modalities[1:]]},
        "string dim": {**described, "model": {**model, "dim": "abc"}},
        "fractional dim": {**described, "model": {**model, "dim": 32.9}},
        "bool layers": {**described, "model": {**model, "encoder_layers": True}},
        "no modalities": {"model": model},
        "a list": [described],
    }[change]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("unknown model key", r"model has \['flash_attention'\], which this version's ModelConfig does not have"),
        ("unknown modality key", r"modalities\[0\] has \['shape'\], which this version's ModelModality"),
        ("string dim", r"model.dim is 'abc', not int"),
        ("fractional dim", r"model.dim is 32.9, not int"),
        ("bool layers", r"model.encoder_layers is True, not int"),
        ("no modalities", r"not a run's model.json"),
        ("a list", r"not a run's model.json"),
    ],
)
def test_a_fine_tune_source_with_a_model_json_this_version_did_not_write_stops_in_one_line(
    tmp_path, capsys, change, message
):
    run = tmp_path / "root/runs/source"
    run.parent.mkdir(parents=True)
    save_run(run)
    described = run / "model.json"
    described.write_text(json.dumps(_edit(json.loads(described.read_text()), change)))
    root = str(tmp_path / "root")
    assert main(["finetune", "--root", root, "--set", "finetune.from_run=source"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"four_m finetune: error: {described}")
    assert re.search(message, error), error
    assert not (tmp_path / "root/runs/tiny").exists()  # the fine-tune's own run: nothing written


def test_model_json_that_is_no_json_is_refused_naming_it(tmp_path):
    save_run(tmp_path / "run")
    (tmp_path / "run/model.json").write_text('{"model": {"dim": 32,')
    with pytest.raises(RunFileError, match=r"run/model.json: not JSON \(Expecting"):
        load_backbone(tmp_path / "run")


@pytest.mark.parametrize("damage", ["cut short", "a pickle renamed", "another model's shapes"])
def test_weights_that_are_not_the_runs_are_refused_naming_the_file(tmp_path, damage):
    run = tmp_path / "root/runs/source"
    run.parent.mkdir(parents=True)
    save_run(run)
    weights = run / "model.safetensors"
    if damage == "cut short":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "a pickle renamed":
        weights.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle's opening bytes: never unpickled
    else:  # model.json says a wider model than the weights hold: same names, other shapes
        described = json.loads((run / "model.json").read_text())
        described["model"]["dim"] = 64
        (run / "model.json").write_text(json.dumps(described))
    expected = {
        "cut short": r"model.safetensors: not a whole safetensors file \(.*incomplete metadata",
        "a pickle renamed": r"model.safetensors: not a whole safetensors file",
        "another model's shapes": r"model.safetensors: .* has shape \(.*32.*\), the model of model.json needs",
    }[damage]
    config = load_config("default", ["finetune.from_run=source"], root=str(tmp_path / "root"))
    with pytest.raises(RunFileError, match=expected):
        FinetuneStart(config).source()
    with pytest.raises(RunFileError, match=expected):
        load_backbone(run)
