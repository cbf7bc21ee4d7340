"""Converting an apple/ml-4m checkpoint (synthetic, with ml-4m's key names and shapes): every key
used, each weight where it belongs, an incompatible checkpoint refused naming the key, and the
converted model runs forward and generates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from four_m.core.config import load_config
from four_m.core.errors import UserError
from four_m.train.generate import Decoding, Generator
from four_m.train.import_4m import Import4MError, convert
from four_m.train.import_run import run_import
from four_m.train.model import FourM, ModelConfig, ModelModality
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
        run_import(config, str(source))


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
