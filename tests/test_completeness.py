"""Every registered modality has everything each stage needs, through its kind: a forgotten
renderer or metric would otherwise drop the modality from a preview or from `make eval` silently."""

from __future__ import annotations

from dataclasses import replace

import pytest

from four_m.core.config import Config
from four_m.core.modalities import MODALITIES, ModalityError, labelled_modalities
from four_m.datasets_cards.stats import LABEL_DETAILS
from four_m.labelers.registry import LABELERS
from four_m.tokenize import label_preview, preview
from four_m.tokenize.maps import ADAPTER_KINDS
from four_m.tokenize.registry import KIND_TOKENIZERS
from four_m.tokenize.sources import READERS
from four_m.train.metrics import BASELINES, METRICS

SPECS = list(MODALITIES.values())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_every_modality_has_a_tokenizer_a_reader_and_token_previews(spec):
    if not spec.tokenized:
        assert spec.no_metric, f"{spec.name}: a label-only kind must say why it has no metric"
        assert spec.name not in Config().tokenize.modalities, f"{spec.name}: label-only, but tokenized by default"
        return
    assert spec.kind in KIND_TOKENIZERS, f"{spec.name}: no tokenizer for kind {spec.kind}"
    assert spec.kind in READERS, f"{spec.name}: nothing reads kind {spec.kind} from its folder"
    assert spec.kind in preview.RENDERERS, f"{spec.name}: the token preview cannot draw kind {spec.kind}"
    if spec.layout == "map":
        assert spec.kind in ADAPTER_KINDS, f"{spec.name}: no VQ adapter for kind {spec.kind}"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_every_modality_has_a_metric_and_a_baseline_unless_its_spec_says_why_not(spec):
    if spec.no_metric is not None:
        assert spec.no_metric.strip(), f"{spec.name}: an exemption needs its reason"
        assert spec.name not in METRICS
        return
    assert spec.name in METRICS and spec.name in BASELINES, f"{spec.name}: `make eval` would leave it out"
    assert METRICS[spec.name].name == BASELINES[spec.name].name == spec.name


@pytest.mark.parametrize("name", labelled_modalities())
def test_every_labelled_modality_has_a_labeler_a_label_preview_a_card_task_and_config_section(name):
    spec = MODALITIES[name]
    assert LABELERS[name].name == name, f"{spec.labeler} does not label {name}"
    assert spec.kind in label_preview.RENDERERS, f"{name}: `make preview` cannot draw kind {spec.kind}"
    assert spec.card_tasks, f"{name}: the dataset card would list no task for it"
    assert isinstance(Config().label.labeler(name), type(spec.labeler_config))


def test_label_statistics_exist_for_the_kinds_that_have_a_statistic_worth_reading():
    """Not every kind needs one (a direction map's statistics say little): the ones that do are listed."""
    assert set(LABEL_DETAILS) == {"boxes", "class_map", "continuous_map", "text", "edge_map", "metadata", "instances"}


def test_every_map_has_a_tokenizer_config_section_with_its_declared_defaults():
    config = Config()
    for name, spec in MODALITIES.items():
        if spec.layout == "map":
            assert config.tokenize.vq(name) == spec.tokenizer_config


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": "../up"}, "lower-case letters, digits, '_'"),
        ({"folder": "labels/elsewhere"}, "folder must be images or labels/depth"),
        ({"kind": "sound"}, "unknown kind 'sound'"),
        ({"tokenizer_config": None}, "a map needs tokenizer_config"),
        ({"labeler": "no_colon"}, "labeler must be 'module:Class'"),
    ],
)
def test_a_bad_declaration_stops_in_one_line_naming_the_modality(changes, message):
    with pytest.raises(ModalityError, match=message):
        replace(MODALITIES["depth"], **changes)
