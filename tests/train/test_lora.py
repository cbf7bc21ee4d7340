"""LoRA on the 4M model: which parameters train, the update's shapes, and that the merged export
computes exactly what the adapted model computes, in the original layout."""

from __future__ import annotations

import pytest
import torch

from four_m.core.errors import UserError
from four_m.train.lora import TARGETS, LoRALinear, add_lora, merge_lora
from tests.train.test_model import assert_same_logits, make_model, random_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def test_only_the_adapters_train_and_start_as_the_pretrained_model():
    model, batch = make_model(), random_batch()
    before = model(batch)
    wrapped = add_lora(model, rank=2, alpha=4.0)
    layers = len(model.encoder) + len(model.decoder)
    assert len(wrapped) == layers * len(TARGETS) + len(model.decoder) * 3  # decoders' cross-attention: 3 more
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
    adapter = model.encoder[0].attention.query
    assert isinstance(adapter, LoRALinear)
    assert adapter.lora_a.shape == (2, 32) and adapter.lora_b.shape == (32, 2) and adapter.scale == 2.0
    assert_same_logits(before, model(batch))  # B starts at zero: the pretrained model's outputs


def test_the_merged_export_equals_the_adapted_model_and_has_the_original_layout():
    model, batch = make_model(), random_batch()
    names = set(model.state_dict())
    add_lora(model, rank=4, alpha=8.0)
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(3):  # move the adapters away from zero
        optimiser.zero_grad()
        model.loss(batch)[0].backward()
        optimiser.step()
    model.eval()
    adapted = model(batch)
    assert set(dict(model.named_parameters())) - names  # the adapters are extra parameters
    merged = merge_lora(model)
    assert set(merged.state_dict()) == names  # loads as any run's weights
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    after = merged(batch)
    for modality, logits in adapted.items():
        assert torch.allclose(logits, after[modality], atol=1e-5), modality
    assert not torch.equal(adapted[0], make_model()(batch)[0])  # training did change the model


def test_unknown_targets_are_refused_by_name():
    with pytest.raises(UserError, match="unknown LoRA targets \\['qkv'\\]"):
        add_lora(make_model(), rank=2, alpha=2.0, targets=["qkv"])
