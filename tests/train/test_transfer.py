"""Starting a model from another run's weights: copied by meaning (modality names, vocabularies), new
modalities left freshly initialised and named, a resized vocabulary refused by name."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from four_m.train.model import FourM, ModelModality
from four_m.train.transfer import TransferError, transfer_weights
from tests.train.test_model import MODALITIES_4, TINY, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

EDGES = ModelModality("canny_edge", "map", vocab_size=10, positions=16)
# Another order, one modality dropped (rgb), one added (canny_edge): indices no longer match names.
TARGET = (MODALITIES_4[3], EDGES, MODALITIES_4[1], MODALITIES_4[2])


def test_weights_follow_modality_names_and_new_modalities_stay_fresh():
    source = make_model(seed=0)
    torch.manual_seed(1)
    target = FourM(TINY, TARGET)
    fresh = {n: w.clone() for n, w in target.state_dict().items()}
    report = transfer_weights(source, target)
    assert report.kept_modalities == ["det", "depth", "caption"] and report.new_modalities == ["canny_edge"]
    assert report.dropped_modalities == ["rgb"]
    ours, theirs = target.state_dict(), source.state_dict()
    for name in ("encoder.0.attention.query.weight", "decoder.1.mlp.down.weight", "context_projection.bias"):
        assert torch.equal(ours[name], theirs[name]), name
    for vocabulary in ("depth", "text"):  # tables and heads by vocabulary
        assert torch.equal(
            ours[f"token_embeddings.{vocabulary}.weight"], theirs[f"token_embeddings.{vocabulary}.weight"]
        )
        assert torch.equal(ours[f"heads.{vocabulary}.weight"], theirs[f"heads.{vocabulary}.weight"])
    for name in ("input_modality_embedding.weight", "target_modality_embedding.weight"):
        for modality in ("det", "depth", "caption"):  # rows by name, wherever the modality now sits
            row = ours[name][target.modality_index(modality)]
            assert torch.equal(row, theirs[name][source.modality_index(modality)]), (name, modality)
        new_row = target.modality_index("canny_edge")
        assert torch.equal(ours[name][new_row], fresh[name][new_row])  # freshly initialised
    assert torch.equal(ours["token_embeddings.canny_edge.weight"], fresh["token_embeddings.canny_edge.weight"])


def test_a_resized_vocabulary_or_another_model_size_is_refused_by_name():
    source = make_model()
    resized = tuple(dataclasses.replace(m, vocab_size=24) if m.name == "depth" else m for m in MODALITIES_4)
    with pytest.raises(TransferError, match=r"depth \(12 -> 24 ids\)"):
        transfer_weights(source, FourM(TINY, resized))
    with pytest.raises(TransferError, match="keeps the size"):
        transfer_weights(source, FourM(dataclasses.replace(TINY, encoder_layers=3), MODALITIES_4))


def test_a_kept_map_on_another_grid_is_named():
    """An imported 224 px model fine-tuned on smaller crops: depth's 16 positions become 4."""
    target = tuple(dataclasses.replace(m, positions=4) if m.name == "depth" else m for m in MODALITIES_4)
    report = transfer_weights(make_model(), FourM(TINY, target))
    assert report.regridded == ["depth (16 -> 4 positions)"]
    assert report.lines()[-1] == "transfer: another token grid than the source's: depth (16 -> 4 positions)"
    assert transfer_weights(make_model(), FourM(TINY, MODALITIES_4)).regridded == []


def test_the_input_table_of_a_modality_the_source_only_predicted_is_named_new():
    """An imported ml-4m model with depth only among its targets has no depth token table: a fine-tune
    reading depth starts that table fresh and says so."""
    config = dataclasses.replace(TINY, context_token=False, decoder_tables=True)  # as an imported model
    predicted_only = tuple(dataclasses.replace(m, as_input=False) if m.name == "depth" else m for m in MODALITIES_4)
    torch.manual_seed(0)
    source = FourM(config, predicted_only)
    assert "token_embeddings.depth.weight" not in source.state_dict()
    torch.manual_seed(1)
    target = FourM(config, MODALITIES_4)
    fresh = target.state_dict()["token_embeddings.depth.weight"].clone()
    report = transfer_weights(source, target)
    assert report.fresh == ["token_embeddings.depth.weight"]
    assert (
        report.lines()[-1] == "transfer: kept modalities' weights the source lacks, new: token_embeddings.depth.weight"
    )
    assert torch.equal(target.state_dict()["token_embeddings.depth.weight"], fresh)
    assert torch.equal(target.state_dict()["heads.depth.weight"], source.state_dict()["heads.depth.weight"])
