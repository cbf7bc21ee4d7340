"""Converting an apple/ml-4m checkpoint (synthetic, with ml-4m's key names and shapes): every key
used, each weight where it belongs, an incompatible checkpoint refused naming the key, and the
converted model runs forward and generates. The command never loses a run: it takes the run's
lock, refuses an existing run unless asked to replace it, and swaps a new run in whole; a malformed
source is refused in one line."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save, save_file

from four_m.cli import main
from four_m.core import storage
from four_m.core.config import load_config
from four_m.core.dataset_root import DatasetRoot
from four_m.core.errors import UserError
from four_m.core.stage_lock import StageLocked
from four_m.train import import_run
from four_m.train.generate import Decoding, Generator
from four_m.train.import_4m import Import4MError, convert
from four_m.train.import_run import RunExistsError, run_import
from four_m.train.model import FourM, ModelConfig, ModelModality
from four_m.train.run import _run_lock
from four_m.train.trained import RunMismatchError, load_trained, load_weights
from tests.train import ml4m_checkpoint as ml4m

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def imported():
    return ml4m.weights(), convert(ml4m.config(), ml4m.weights())


def test_every_key_is_used_and_each_weight_lands_where_ml4m_reads_it(imported):
    weights, result = imported
    model, ours = result.model, result.model.state_dict()
    assert [m.name for m in model.modalities] == ["rgb", "depth", "caption", "det", "rgb_pixels"]
    assert {m.name: m.vocab_size for m in model.modalities if m.layout != "pixels"} == {
        "rgb": 64,
        "depth": 48,
        "caption": 300,
        "det": 300,
    }
    assert model.config.context_token is False and model.config.norm_eps == 1e-6
    qkv = weights["encoder.1.attn.qkv.weight"]
    assert torch.equal(ours["encoder.1.attention.query.weight"], qkv[: ml4m.DIM])
    assert torch.equal(ours["encoder.1.attention.key_value.weight"], qkv[ml4m.DIM :])
    gate_up = ours["decoder.0.mlp.gate_up.weight"]
    assert torch.equal(gate_up[: ml4m.HIDDEN], weights["decoder.0.mlp.fc1.weight"])  # fc1 is the gated one
    assert torch.equal(gate_up[ml4m.HIDDEN :], weights["decoder.0.mlp.fc3.weight"])
    assert torch.equal(ours["decoder.1.cross_attention_norm.weight"], weights["decoder.1.query_norm.weight"])
    # One table and one head per modality, as ml-4m: caption and det no longer share the text vocabulary's.
    assert torch.equal(ours["token_embeddings.det.weight"], weights["encoder_embeddings.det.token_emb.weight"])
    assert torch.equal(
        ours["decoder_token_embeddings.caption.weight"], weights["decoder_embeddings.caption.token_emb.weight"]
    )
    assert torch.equal(ours["heads.depth.weight"], weights["decoder_embeddings.tok_depth@224.to_logits.weight"])
    depth = model.modality_index("depth")
    shared = weights["encoder_embeddings.tok_depth@224.mod_emb"].reshape(-1)
    assert torch.equal(ours["input_modality_embedding.weight"][depth], shared)
    assert torch.equal(ours["target_modality_embedding.weight"][depth], shared)
    assert torch.equal(ours["patch_embeddings.rgb_pixels.weight"], weights["encoder_embeddings.rgb@224.proj.weight"])
    # A map target's decoder table: never read by ml-4m (it asks with the mask token), left behind by name.
    assert result.left_behind == (
        "decoder_embeddings.tok_depth@224.token_emb.weight",
        "decoder_embeddings.tok_rgb@224.token_emb.weight",
    )


def test_the_converted_model_generates_from_pixels_and_from_a_caption(imported):
    _, result = imported
    generator = Generator(result.model)
    rng = np.random.default_rng(0)
    photos = [rng.integers(0, 256, (ml4m.IMAGE, ml4m.IMAGE, 3), dtype=np.uint8) for _ in range(2)]
    greedy = Decoding(steps=2, temperature=0.0)
    out = generator.generate(
        {"rgb_pixels": photos}, [("depth", greedy), ("caption", Decoding(temperature=0.0, max_tokens=5))]
    )
    assert [grid.shape for grid in out["depth"]] == [(ml4m.GRID**2,)] * 2
    assert all(grid.max() < 48 for grid in out["depth"]) and all(1 <= len(c) <= 5 for c in out["caption"])
    caption = [np.array([400 % 300, 17, 2], dtype=np.uint16)] * 2
    unconditional = generator.generate({"caption": [None, None]}, [("rgb", greedy)])  # no inputs: no NaN
    assert all(np.all(grid < 64) for grid in unconditional["rgb"])
    assert generator.generate({"caption": caption}, [("rgb", greedy)])["rgb"][0].shape == (ml4m.GRID**2,)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"config": {"qkv_bias": True}}, "config qkv_bias = True: only ml-4m's qkv_bias = False converts exactly"),
        ({"config": {"num_register_tokens": 4}}, "config num_register_tokens = 4"),
        ({"config": {"domains_in": ["rgb@224", "tok_lidar@224"]}}, r"config domains \['tok_lidar@224'\]"),
        ({"add": "encoder.0.attn.q_norm.weight"}, "checkpoint key encoder.0.attn.q_norm.weight has no counterpart"),
        ({"drop": "decoder.1.cross_attn.kv.weight"}, "checkpoint lacks decoder.1.cross_attn.kv.weight"),
        ({"bias": "encoder_norm.bias"}, "encoder_norm.bias is not zero"),
        (
            {"learned": "encoder_embeddings.caption.pos_emb"},
            "encoder_embeddings.caption.pos_emb: not the fixed sin-cos",
        ),
    ],
)
def test_an_incompatible_checkpoint_is_refused_naming_the_key(change, message):
    config, weights = ml4m.config(**change.get("config", {})), ml4m.weights()
    if "add" in change:
        weights[change["add"]] = torch.zeros(ml4m.DIM)
    if "drop" in change:
        del weights[change["drop"]]
    if "bias" in change:
        weights[change["bias"]] = torch.full((ml4m.DIM,), 0.1)
    if "learned" in change:
        weights[change["learned"]] = torch.randn_like(weights[change["learned"]])
    with pytest.raises(Import4MError, match=message):
        convert(config, weights)


def test_import_4m_writes_a_run_that_loads_as_any_run_and_names_the_tokenizers_it_needs(tmp_path, imported):
    source = tmp_path / "4M-tiny"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(ml4m.config()))
    save_file(ml4m.saved(ml4m.weights()), str(source / "model.safetensors"))  # one name per shared tensor
    config = load_config("default", ["train.run=imported"], root=str(tmp_path / "root"))
    report = run_import(config, str(source))
    assert report.modalities["rgb_pixels"] == "rgb@224" and "import-4m: " in report.lines()[0]
    described = json.loads((tmp_path / "root/runs/imported/model.json").read_text())
    assert described["tokenizers"]["depth"] == "ml-4m:tok_depth@224" and described["imported_from"] == str(source)
    model = FourM(ModelConfig(**described["model"]), [ModelModality.from_dict(m) for m in described["modalities"]])
    load_weights(model, tmp_path / "root/runs/imported/model.safetensors", "imported")
    _, result = imported
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    with pytest.raises(RunMismatchError, match="tokenizers/rgb"):  # this root has no ml-4m tokenizers (yet)
        load_trained(config)
    with pytest.raises(UserError, match="has no model.safetensors"):
        (source / "model.safetensors").unlink()
        run_import(load_config("default", ["train.run=other"], root=str(tmp_path / "root")), str(source))


def four_m_21(weights: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """The tiny checkpoint with two 4M-21 modalities this project lacks, laid out as ml-4m's: T5-XXL
    caption embeddings in (a projection, no token table), human poses in and out."""
    D, rand = ml4m.DIM, torch.randn
    extra = {
        "encoder_embeddings.t5_caption.emb_proj.weight": rand(D, 4096),
        "encoder_embeddings.t5_caption.pos_emb": ml4m.sincos_1d(77, D),
        "encoder_embeddings.t5_caption.mod_emb": rand(1, 1, D),
    }
    for side in ("encoder", "decoder"):
        prefix = f"{side}_embeddings.human_poses"
        extra |= {f"{prefix}.pos_emb": ml4m.sincos_1d(263, D), f"{prefix}.token_emb.weight": rand(300, D)}
    extra |= {"decoder_embeddings.human_poses.to_logits.weight": rand(300, D)}
    extra |= {"decoder_embeddings.human_poses.mod_emb": rand(1, 1, D)}  # shared: stored under one name
    config = ml4m.config()
    config["domains_in"] += ["t5_caption", "human_poses"]
    config["domains_out"] += ["human_poses"]
    return config, weights | extra


def test_modalities_this_project_lacks_are_refused_unless_left_out_then_the_rest_converts_exactly():
    weights = ml4m.weights()
    config, extended = four_m_21(weights)
    with pytest.raises(Import4MError, match=r"\['t5_caption', 'human_poses'\].*LEAVE_OUT=t5_caption,human_poses"):
        convert(config, extended)
    with pytest.raises(Import4MError, match=r"leave out \['sam_instance'\]: not among the checkpoint's domains"):
        convert(config, extended, ["t5_caption", "human_poses", "sam_instance"])
    result = convert(config, extended, ["t5_caption", "human_poses"])
    assert result.left_out == {"t5_caption": 3, "human_poses": 6}
    plain = convert(ml4m.config(), weights).model.state_dict()
    converted = result.model.state_dict()
    assert converted.keys() == plain.keys() and all(torch.equal(converted[k], plain[k]) for k in plain)


def test_import_4m_records_and_reports_what_it_left_out(tmp_path):
    config, weights = four_m_21(ml4m.weights())
    source = tmp_path / "4M-21-tiny"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(config))
    save_file(ml4m.saved(weights), str(source / "model.safetensors"))  # one name per shared tensor
    settings = load_config("default", ["train.run=imported"], root=str(tmp_path / "root"))
    report = run_import(settings, str(source), ["human_poses", "t5_caption"])
    assert "import-4m: left out as asked (LEAVE_OUT): human_poses (6 tensors), t5_caption (3 tensors)" in report.lines()
    described = json.loads((tmp_path / "root/runs/imported/model.json").read_text())
    assert described["left_out"] == ["human_poses", "t5_caption"] and "human_poses" not in described["tokenizers"]


def test_a_modality_only_among_the_targets_imports_without_an_input_table_and_is_only_predicted():
    """ml-4m builds no encoder embedding for a modality only in ``domains_out``: the converted model
    has no token table for it, predicts it exactly as the same weights with the table do, and
    refuses to be given it."""
    weights = ml4m.weights()
    config = ml4m.config()
    config["domains_in"].remove("det")
    target_only = {k: v for k, v in weights.items() if not k.startswith("encoder_embeddings.det.")}
    model = convert(config, target_only).model
    det = model.modalities[model.modality_index("det")]
    assert (det.as_input, det.as_target) == (False, True)
    assert "token_embeddings.det.weight" not in model.state_dict() and "heads.det.weight" in model.state_dict()
    both = convert(ml4m.config(), weights).model  # the same weights, det an input too
    generator, reference = Generator(model), Generator(both)
    photos = [np.random.default_rng(0).integers(0, 256, (ml4m.IMAGE, ml4m.IMAGE, 3), dtype=np.uint8)]
    greedy = Decoding(temperature=0.0, max_tokens=6)
    got = generator.generate({"rgb_pixels": photos}, [("det", greedy), ("caption", greedy)])
    expected = reference.generate({"rgb_pixels": photos}, [("det", greedy)])
    assert np.array_equal(got["det"][0], expected["det"][0])
    with pytest.raises(UserError, match="given 'det': this model only predicts it"):
        generator.generate({"det": [got["det"][0]]}, [("caption", greedy)])
    described = ModelModality(**dataclasses.asdict(det))  # as model.json writes and reads it
    assert described == det


# --- the command never loses a run ---


def _source(folder: Path, seed: int = 0, config: str | None = None, weights: bytes | None = None) -> Path:
    """An ml-4m model folder: the tiny checkpoint (``seed``), or the ``config`` text and raw ``weights`` given."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(ml4m.config()) if config is None else config)
    if weights is None:
        save_file(ml4m.saved(ml4m.weights(seed)), str(folder / "model.safetensors"))
    else:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


def _digests(run: Path) -> dict[str, str]:
    return {str(f.relative_to(run)): hashlib.sha256(f.read_bytes()).hexdigest() for f in run.rglob("*") if f.is_file()}


def _imported_run(tmp_path: Path) -> tuple[object, Path]:
    """A root with run ``imported`` (seed 0) that training left logs and samples in: a finished run."""
    config = load_config("default", ["train.run=imported"], root=str(tmp_path / "root"))
    run_import(config, str(_source(tmp_path / "old")))
    run = tmp_path / "root/runs/imported"
    for extra in ("logs/version_0/metrics.csv", "samples/rgb-to-depth.png", "config.yaml"):
        (run / extra).parent.mkdir(parents=True, exist_ok=True)
        (run / extra).write_text("written for the old model")
    return config, run


def test_an_existing_run_is_refused_and_replaced_whole_only_when_asked(tmp_path):
    config, run = _imported_run(tmp_path)
    before = _digests(run)
    new = _source(tmp_path / "new", seed=1)
    with pytest.raises(RunExistsError, match=r"runs/imported exists: .*REPLACE=1 \(--replace\)"):
        run_import(config, str(new))
    assert _digests(run) == before
    report = run_import(config, str(new), replace=True)
    assert report.replaced and "replaced the run that was in" in report.lines()[1]
    assert sorted(_digests(run)) == ["model.json", "model.safetensors"]  # the old run's logs went with it
    assert _digests(run)["model.safetensors"] != before["model.safetensors"]
    assert [p.name for p in run.parent.iterdir()] == ["imported"]  # nothing left beside it


def test_the_cli_refuses_an_existing_run_in_one_line_and_replaces_it_with_replace(tmp_path, capsys):
    config, run = _imported_run(tmp_path)
    argv = ["import-4m", "--root", config.root, "--set", "train.run=imported", "--source", str(tmp_path / "old")]
    assert main(argv) == 2
    assert capsys.readouterr().err.count("\n") == 1 and (run / "config.yaml").is_file()
    assert main([*argv, "--replace"]) == 0
    assert "replaced the run" in capsys.readouterr().out and not (run / "config.yaml").exists()


def test_import_4m_is_refused_while_the_run_is_being_trained(tmp_path):
    """The lock ``make train`` and ``make finetune`` hold, held here as a training holds it."""
    config = load_config("default", ["train.run=imported"], root=str(tmp_path / "root"))
    source = _source(tmp_path / "4M-tiny")
    with _run_lock(DatasetRoot(config.root), "imported"):
        with pytest.raises(StageLocked, match="another train/imported run holds"):
            run_import(config, str(source), replace=True)
    assert not (tmp_path / "root/runs/imported").exists()
    run_import(config, str(source))  # the lock released: it imports


def test_a_crash_while_writing_or_swapping_leaves_the_old_run_whole(tmp_path, monkeypatch):
    config, run = _imported_run(tmp_path)
    before = _digests(run)
    new = str(_source(tmp_path / "new", seed=1))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as a Ctrl-C while the new weights are written

    monkeypatch.setattr(import_run, "save_model", killed)
    with pytest.raises(KeyboardInterrupt):
        run_import(config, new, replace=True)
    assert _digests(run) == before and [p.name for p in run.parent.iterdir()] == ["imported"]
    monkeypatch.undo()

    # Killed between the swap's two renames (after the old run moved aside): the next import puts it back.
    monkeypatch.setattr(storage, "publish_folder", killed)
    with pytest.raises(KeyboardInterrupt):
        run_import(config, new, replace=True)
    assert not run.exists() and (run.parent / ".imported.replaced").is_dir()
    (run.parent / ".imported.importing-0123abcd").mkdir()  # as a SIGKILL leaves a folder being written
    monkeypatch.undo()
    with pytest.raises(RunExistsError):  # put back first, then refused as any existing run
        run_import(config, new)
    assert _digests(run) == before and [p.name for p in run.parent.iterdir()] == ["imported"]


def test_a_swap_killed_after_the_new_run_arrived_keeps_the_new_run(tmp_path):
    config, run = _imported_run(tmp_path)
    aside = run.parent / ".imported.replaced"
    aside.mkdir()
    (aside / "model.json").write_text("{}")  # the old run, not yet deleted when the import was killed
    run_import(config, str(_source(tmp_path / "new", seed=1)), replace=True)
    assert not aside.exists() and (run / "model.json").is_file()


def _cut_weights() -> bytes:
    data = save(ml4m.saved(ml4m.weights()))
    return data[: len(data) // 2]


def _pickled_weights() -> bytes:
    """A torch checkpoint renamed: safetensors reads its header as such, never unpickles it."""
    buffer = io.BytesIO()
    torch.save(ml4m.weights(), buffer)
    return buffer.getvalue()


def _int8_weights() -> bytes:
    weights = ml4m.saved(ml4m.weights())
    weights["encoder.0.attn.qkv.weight"] = (weights["encoder.0.attn.qkv.weight"] * 1000).to(torch.int8)
    return save(weights)


@pytest.mark.parametrize(
    ("config", "weights", "message"),
    [
        ({"dim": "abc"}, None, r"config.json dim = 'abc': not a whole number >= 1"),
        ({"dim": [32]}, None, r"config.json dim = \[32\]: not a whole number >= 1"),
        ({"dim": 32.9}, None, r"config.json dim = 32.9: not a whole number >= 1"),
        ({"num_heads": True}, None, r"config.json num_heads = True: not a whole number"),
        ({"dim": 10**7}, None, r"config.json dim = 10000000, the weights are 32 wide"),
        ({"encoder_depth": 10**6}, None, r"config.json encoder_depth = 1000000, the weights have 2 encoder blocks"),
        ({"mlp_ratio": 1e9}, None, r"config.json mlp_ratio = 1000000000.0: not a number in \(0, 64\]"),
        ({"mlp_ratio": 3.0}, None, r"config.json mlp_ratio = 3.0 makes MLPs 64 wide, the weights' are 85"),
        ({"num_heads": 5}, None, r"config.json num_heads = 5 does not divide dim 32"),
        ({"domains_in": "rgb@224"}, None, r"config.json domains_in = 'rgb@224': not a list of ml-4m modality names"),
        ("[1, 2]", None, r"config.json is a JSON list, not an object"),
        ("{dim: 32", None, r"config.json: not JSON"),
        (None, "cut", r"model.safetensors: not a whole safetensors file \(.*incomplete metadata"),
        (None, b"\x00garbage" * 100, r"model.safetensors: not a whole safetensors file"),
        (None, "pickle", r"model.safetensors: not a whole safetensors file"),
        (None, "int8", r"model.safetensors encoder.0.attn.qkv.weight is torch.int8: only floating-point"),
    ],
)
def test_a_malformed_source_is_refused_in_one_line_naming_the_file_and_writes_nothing(
    tmp_path, capsys, config, weights, message
):
    folder = tmp_path / "source"
    made = {"cut": _cut_weights, "pickle": _pickled_weights, "int8": _int8_weights}
    raw = made[weights]() if isinstance(weights, str) else weights
    _source(folder, config=json.dumps(ml4m.config(**config)) if isinstance(config, dict) else config, weights=raw)
    root = tmp_path / "root"
    assert main(["import-4m", "--root", str(root), "--set", "train.run=x", "--source", str(folder)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"four_m import-4m: error: {folder}")
    assert re.search(message, error), error
    assert not (root / "runs/x").exists()


def test_an_import_into_a_remote_root_refuses_and_replaces_as_a_local_one(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the run is built in this user's scratch
    config = load_config("default", ["train.run=imported"], root=f"memory://imports/{tmp_path.name}")
    source = str(_source(tmp_path / "4M-tiny"))
    run_import(config, source)
    run = storage.location(f"{config.root}/runs/imported")
    (run / "logs").mkdir()
    (run / "logs/metrics.csv").write_text("written for the old model")
    with pytest.raises(RunExistsError):
        run_import(config, source)
    assert run_import(config, source, replace=True).replaced
    assert sorted(p.name for p in run.iterdir()) == ["model.json", "model.safetensors"]
    assert [p.name for p in run.parent.iterdir()] == ["imported"]
