"""The 4M encoder-decoder, made tiny: shapes, masking of padding, the decoder's attention pattern and
context, that it can learn (overfits a few samples), bf16 autocast, its config, and refusing the
weights of an older version of it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file, save_model

from four_m.core.config import ConfigError
from four_m.core.errors import UserError
from four_m.core.modalities import MODALITIES
from four_m.train.batch import MaskedBatch
from four_m.train.model import (
    SIZES,
    FourM,
    ModelConfig,
    ModelModality,
    OutdatedWeightsError,
    check_weight_names,
    decoder_attention_mask,
)
from four_m.train.run import check_checkpoint
from four_m.train.trained import load_weights

TINY = ModelConfig(dim=32, encoder_layers=2, decoder_layers=2, heads=4)
MODALITIES_4 = (
    ModelModality("rgb", "map", vocab_size=16, positions=16),  # a 4 x 4 grid
    ModelModality("depth", "map", vocab_size=12, positions=16),
    ModelModality("caption", "sequence", vocab_size=20, positions=8, vocabulary="text"),
    ModelModality("det", "sequence", vocab_size=20, positions=8, vocabulary="text"),
)
RGB, DEPTH, CAPTION, DET = range(4)
SOS = 1


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed: int = 0, config: ModelConfig = TINY) -> FourM:
    torch.manual_seed(seed)
    return FourM(config, MODALITIES_4).eval()


def _sample(generator: torch.Generator, tgt_caption_len: int = 4, tgt_det_len: int = 3) -> tuple[list, list]:
    """One sample: inputs = some rgb tokens + a caption prefix; targets = other rgb tokens, some depth
    tokens, a caption and a det sequence. Tokens are (id, modality, position[, decoder input])."""

    def randint(high: int, n: int) -> list[int]:
        return torch.randint(2, high, (n,), generator=generator).tolist()

    grid = torch.randperm(16, generator=generator).tolist()
    inputs = [(i, RGB, p) for i, p in zip(randint(16, 5), grid[:5], strict=True)]
    inputs += [(i, CAPTION, p) for p, i in enumerate(randint(20, 3))]
    targets = [(i, RGB, p, 0) for i, p in zip(randint(16, 4), grid[5:9], strict=True)]
    depth_cells = torch.randperm(16, generator=generator)[:3].tolist()
    targets += [(i, DEPTH, p, 0) for i, p in zip(randint(12, 3), depth_cells, strict=True)]
    for modality, length in ((CAPTION, tgt_caption_len), (DET, tgt_det_len)):
        ids = randint(20, length)
        targets += [(i, modality, p, prev) for p, (i, prev) in enumerate(zip(ids, [SOS] + ids[:-1], strict=True))]
    return inputs, targets


def make_batch(samples: list[tuple[list, list]], n_in: int = 12, n_tgt: int = 18) -> MaskedBatch:
    """Pad by hand, as the masking will: ids 0, modality 0, position 0, mask False."""
    B = len(samples)
    batch = MaskedBatch(
        input_ids=torch.zeros(B, n_in, dtype=torch.long),
        input_modality=torch.zeros(B, n_in, dtype=torch.long),
        input_position=torch.zeros(B, n_in, dtype=torch.long),
        input_mask=torch.zeros(B, n_in, dtype=torch.bool),
        target_ids=torch.zeros(B, n_tgt, dtype=torch.long),
        target_modality=torch.zeros(B, n_tgt, dtype=torch.long),
        target_position=torch.zeros(B, n_tgt, dtype=torch.long),
        target_mask=torch.zeros(B, n_tgt, dtype=torch.bool),
        decoder_input_ids=torch.zeros(B, n_tgt, dtype=torch.long),
    )
    for b, (inputs, targets) in enumerate(samples):
        for j, (i, m, p) in enumerate(inputs):
            batch.input_ids[b, j], batch.input_modality[b, j], batch.input_position[b, j] = i, m, p
            batch.input_mask[b, j] = True
        for j, (i, m, p, prev) in enumerate(targets):
            batch.target_ids[b, j], batch.target_modality[b, j], batch.target_position[b, j] = i, m, p
            batch.decoder_input_ids[b, j] = prev
            batch.target_mask[b, j] = True
    return batch


def random_batch(seed: int = 0, size: int = 3) -> MaskedBatch:
    generator = torch.Generator().manual_seed(seed)
    # Samples of different lengths, so every sample but the longest has padding.
    return make_batch([_sample(generator, tgt_caption_len=2 + b, tgt_det_len=3 - b % 2) for b in range(size)])


def copy(batch: MaskedBatch) -> MaskedBatch:
    fields = {f.name: getattr(batch, f.name).clone() for f in dataclasses.fields(batch) if f.name != "pixels"}
    return MaskedBatch(**fields, pixels={name: images.clone() for name, images in batch.pixels.items()})


def assert_same_logits(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor], modalities=None) -> None:
    for m in modalities if modalities is not None else a:
        torch.testing.assert_close(a[m], b[m], atol=1e-5, rtol=1e-5)


def test_output_shapes():
    model, batch = make_model(), random_batch()
    with torch.no_grad():
        memory, memory_real = model.encode(batch)
        hidden = model.decode(batch, memory, memory_real)
        logits = model(batch)
    assert memory.shape == (3, 1 + 12, 32) and memory_real.shape == (3, 13)
    assert hidden.shape == (3, 18, 32)
    assert sorted(logits) == [RGB, DEPTH, CAPTION, DET]
    for m, modality in enumerate(MODALITIES_4):
        n_m = int(((batch.target_modality == m) & batch.target_mask).sum())
        assert logits[m].shape == (n_m, modality.vocab_size)
        assert torch.isfinite(logits[m]).all()


def test_padding_does_not_change_the_real_tokens_outputs():
    model, batch = make_model(), random_batch()
    with torch.no_grad():
        before = model(batch)
        changed = copy(batch)
        pad_in, pad_tgt = ~batch.input_mask, ~batch.target_mask
        assert pad_in.any() and pad_tgt.any()
        changed.input_ids[pad_in] = 7
        changed.input_modality[pad_in] = DEPTH
        changed.input_position[pad_in] = 3
        changed.target_modality[pad_tgt] = CAPTION
        changed.target_position[pad_tgt] = 0
        changed.decoder_input_ids[pad_tgt] = 5
        changed.target_ids[pad_tgt] = 9
        assert_same_logits(before, model(changed))
        # More padding on both sides changes nothing either.
        wider = make_batch([], 0, 0)
        for f in dataclasses.fields(batch):
            if f.name != "pixels":
                value = getattr(batch, f.name)
                setattr(wider, f.name, torch.cat([value, torch.zeros_like(value)[:, :5]], dim=1))
        assert_same_logits(before, model(wider))


def test_decoder_attends_only_within_a_modality():
    model, batch = make_model(), random_batch()
    with torch.no_grad():
        before = model(batch)
        # A different caption to teacher-force: only the caption's own logits may change.
        changed = copy(batch)
        caption = batch.target_modality == CAPTION
        changed.decoder_input_ids[caption] = (batch.decoder_input_ids[caption] + 3) % 20
        after = model(changed)
        assert_same_logits(before, after, [RGB, DEPTH, DET])
        assert not torch.allclose(before[CAPTION], after[CAPTION])
        # rgb targets at other grid cells: depth and the sequences do not see it.
        changed = copy(batch)
        rgb = batch.target_modality == RGB
        changed.target_position[rgb] = (batch.target_position[rgb] + 1) % 16
        after = model(changed)
        assert_same_logits(before, after, [DEPTH, CAPTION, DET])
        assert not torch.allclose(before[RGB], after[RGB])


def test_sequences_are_causal():
    model = make_model()
    generator = torch.Generator().manual_seed(1)
    batch = make_batch([_sample(generator, tgt_caption_len=6)])
    caption = ((batch.target_modality == CAPTION) & batch.target_mask)[0].nonzero().squeeze(1)  # flat slots
    with torch.no_grad():
        before = model(batch)[CAPTION]  # (6, V), in position order
        changed = copy(batch)
        changed.decoder_input_ids[0, caption[3]] = (batch.decoder_input_ids[0, caption[3]] + 1) % 20
        after = model(changed)[CAPTION]
    torch.testing.assert_close(before[:3], after[:3], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before[3], after[3])


def test_decoder_attention_mask():
    #              rgb rgb cap cap cap pad
    modality = torch.tensor([[0, 0, 2, 2, 2, 0]])
    position = torch.tensor([[5, 1, 2, 0, 1, 0]])  # a sequence given out of order on purpose
    real = torch.tensor([[True] * 5 + [False]])
    allowed = decoder_attention_mask(modality, position, modality == 0, real)[0].int()
    assert allowed.tolist() == [
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [1, 1, 0, 0, 0, 1],  # padding: sees itself, so never a fully masked (NaN) row
    ]


def test_a_sample_without_inputs_or_targets_stays_finite():
    model, batch = make_model(), random_batch()
    batch.input_mask[1] = False  # unconditional: nothing to encode
    batch.target_mask[2] = False  # nothing to predict
    total, _ = model.loss(batch)
    total.backward()
    assert torch.isfinite(total)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("context_token", [False, True])
def test_a_sample_without_inputs_attends_to_nothing_but_zeros_as_ml4m(context_token):
    """ml-4m zeroes a masked slot's token and embeddings and masks with the lowest float, not -inf:
    an all-masked sample attends to zeros alike, its encoder stays at zero and its decoder reads the
    context projection's bias alone (plus the context token, where there is one). So neither its
    padding's content nor its length may change what it predicts."""
    model = make_model(config=dataclasses.replace(TINY, context_token=context_token))
    with torch.no_grad():
        model.context_projection.bias.normal_()  # zero-initialised: give it values the check can see
    reference = random_batch(size=2)
    reference.input_mask[1] = False  # sample 1: unconditional
    with torch.no_grad():
        expected = model(reference)
        context, context_real = model.encode(reference)
        if not context_token:
            torch.testing.assert_close(context[1], model.context_projection.bias.expand_as(context[1]))
        for n_in, fill in ((12, 7), (3, 2), (0, 0)):
            batch = copy(reference)
            batch.input_mask[1] = False
            batch.input_ids[1], batch.input_modality[1], batch.input_position[1] = fill, DEPTH, fill
            if n_in == 0:  # the whole batch unconditional, with no input slot at all
                batch.input_mask[0] = False
            for name in ("input_ids", "input_modality", "input_position", "input_mask"):
                setattr(batch, name, getattr(batch, name)[:, :n_in])
            got = model(batch)
            for m in expected:  # logits run sample by sample: sample 1's follow sample 0's
                first = int(((reference.target_modality[0] == m) & reference.target_mask[0]).sum())
                torch.testing.assert_close(got[m][first:], expected[m][first:], atol=1e-5, rtol=1e-5)


def test_loss_is_the_mean_over_modalities_of_their_mean_cross_entropy():
    model, batch = make_model(), random_batch()
    with torch.no_grad():
        total, metrics = model.loss(batch)
        logits = model(batch)
    per_modality = []
    for m, modality in enumerate(MODALITIES_4):
        target = batch.target_ids[(batch.target_modality == m) & batch.target_mask]
        per_modality.append(torch.nn.functional.cross_entropy(logits[m], target))
        torch.testing.assert_close(metrics[f"loss/{modality.name}"], per_modality[-1])
        assert 0.0 <= metrics[f"accuracy/{modality.name}"] <= 1.0
    torch.testing.assert_close(total, torch.stack(per_modality).mean())
    # A modality absent from the batch is left out of the mean, not counted as zero.
    batch.target_mask &= batch.target_modality != DEPTH
    with torch.no_grad():
        total, metrics = model.loss(batch)
    assert "loss/depth" not in metrics
    torch.testing.assert_close(total, torch.stack([metrics[f"loss/{n}"] for n in ("rgb", "caption", "det")]).mean())


def test_runs_under_bf16_autocast():
    model, batch = make_model().train(), random_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, metrics = model.loss(batch)
        assert model(batch)[RGB].dtype == torch.bfloat16
    total.backward()
    assert torch.isfinite(total) and model.heads["rgb"].weight.grad is not None


def test_overfits_a_few_samples():
    model, batch = make_model().train(), random_batch(seed=3, size=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(100):
        total, metrics = model.loss(batch)
        first = first if first is not None else total.item()
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    # From ~ln(vocab) = 2.8 to ~0.02 in practice; ask for 10x.
    assert total.item() < first / 10, (first, total.item())
    assert all(metrics[f"accuracy/{m.name}"] == 1.0 for m in MODALITIES_4)


def test_named_sizes():
    expected = {
        "tiny": (6, 384, 6),
        "small": (8, 512, 8),
        "base": (12, 768, 12),
        "large": (24, 1024, 16),
        "xlarge": (24, 2048, 32),
    }
    for name, (layers, dim, heads) in expected.items():
        config = ModelConfig.named(name)
        assert config is SIZES[name]
        assert (config.encoder_layers, config.decoder_layers, config.dim, config.heads) == (layers, layers, dim, heads)
    with torch.device("meta"):  # shapes only: skips the seconds random init takes at this size
        model = FourM(ModelConfig.named("tiny"), MODALITIES_4)
    assert len(model.encoder) == len(model.decoder) == 6
    assert model.parameter_count() == sum(p.numel() for p in model.parameters())
    assert 15e6 < model.parameter_count() < 40e6


def test_xlarge_builds_with_the_parameters_4m_xl_has():
    """4M-XL (24+24 layers, 2048 wide, 32 heads): counted by hand, built on the meta device (no 11 GB of weights)."""
    config = ModelConfig.named("xlarge")
    with torch.device("meta"):
        model = FourM(config, MODALITIES_4)
    D, hidden, M = config.dim, int(2 * config.mlp_ratio * config.dim / 3), len(MODALITIES_4)
    mlp = 3 * D * hidden  # SwiGLU: gate, up, down
    encoder_block = 4 * D * D + mlp + 2 * D  # q, k, v, out; 2 norms
    decoder_block = 8 * D * D + mlp + 4 * D  # self- and cross-attention; 4 norms (one for the context)
    body = 24 * (encoder_block + decoder_block) + 2 * D + (D * D + D)  # + final norms + context projection
    vocabularies = 16 + 12 + 20  # rgb, depth, text: a table and a head each
    assert model.parameter_count() == body + 2 * vocabularies * D + 2 * M * D + 2 * D  # + modality emb., mask, context
    assert 2.7e9 < body < 2.9e9
    assert model.decoder[0].cross_attention.heads == 32


def test_the_registry_modalities_fit():
    modalities = [ModelModality.from_spec(spec, vocab_size=64) for spec in MODALITIES.values() if spec.tokenized]
    assert [m.grid for m in modalities[:5]] == [14] * 5 and modalities[5].positions == 256
    with pytest.raises(ConfigError, match="caption.vocab_size"):
        ModelModality.from_spec(MODALITIES["caption"])


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"dim": 30}, "model.dim"),
        ({"dim": 32, "heads": 5}, "model.heads"),
        ({"encoder_layers": 0}, "model.encoder_layers"),
        ({"decoder_layers": -1}, "model.decoder_layers"),
        ({"mlp_ratio": 0}, "model.mlp_ratio"),
        ({"dropout": 1.0}, "model.dropout"),
    ],
)
def test_config_errors_name_the_field(fields, key):
    with pytest.raises(ConfigError, match=key):
        ModelConfig(**fields)


def test_other_errors_name_what_is_wrong():
    with pytest.raises(ConfigError, match="model.size"):
        ModelConfig.named("huge")
    with pytest.raises(ConfigError, match="rgb.positions"):
        ModelModality("rgb", "map", vocab_size=16, positions=15)
    with pytest.raises(ConfigError, match="model.modalities"):
        FourM(TINY, [MODALITIES_4[0], MODALITIES_4[0]])


def test_modalities_of_one_vocabulary_share_its_table_and_head():
    model = FourM(TINY, MODALITIES_4)
    assert list(model.heads) == list(model.token_embeddings) == ["rgb", "depth", "text"]
    assert model.head(CAPTION) is model.head(DET) is model.heads["text"]
    assert model.table(CAPTION) is model.table(DET) and model.table(RGB) is not model.table(DEPTH)
    # A caption token and a det token with the same id differ only by their modality embedding.
    ids = torch.tensor([[5, 5]])
    tokens = model.embed_tokens(ids, torch.tensor([[CAPTION, DET]]))
    assert torch.equal(tokens[0, 0], tokens[0, 1])


def test_a_vocabulary_has_one_size():
    with pytest.raises(ConfigError, match="det.vocab_size"):
        FourM(TINY, [MODALITIES_4[2], dataclasses.replace(MODALITIES_4[3], vocab_size=21)])


# ---------------------------------------------------------------------------------------------
# The decoder's context, as 4M builds it


def test_the_decoder_reads_the_encoder_through_the_context_projection():
    model, batch = make_model(), random_batch()
    with torch.no_grad():
        before = model(batch)
        model.context_projection.weight.mul_(2.0)
        after = model(batch)
    assert all(not torch.allclose(before[m], after[m]) for m in before)


def test_the_context_carries_the_inputs_modality_and_position_embeddings():
    """With the projection zeroed, the context is exactly what was added back after it: each input's
    modality + position embedding (nothing for the leading context token). The decoder still tells
    where the inputs are; without the add-back it would see a context of zeros."""
    model, batch = make_model(), random_batch()
    with torch.no_grad():
        model.context_projection.weight.zero_()
        model.context_projection.bias.zero_()
        context, real = model.encode(batch)  # (B, S, D)
        modality, position = batch.input_modality, batch.input_position  # (B, N_in)
        labels = model.input_modality_embedding(modality) + model.embed_positions(modality, position)
        torch.testing.assert_close(context[:, 1:][batch.input_mask], labels[batch.input_mask])
        assert torch.equal(context[:, 0], torch.zeros_like(context[:, 0]))

        before = model(batch)
        moved = copy(batch)
        rgb = batch.input_modality == RGB
        moved.input_position[rgb] = (batch.input_position[rgb] + 1) % 16  # same ids, other grid cells
        after = model(moved)
    assert all(not torch.allclose(before[m], after[m]) for m in before)


def test_every_decoder_block_normalises_the_context():
    """A bias-free layer norm on the context in each block, before cross-attention: scaling the
    context (all its features by one factor) changes no output."""
    model, batch = make_model(), random_batch()
    for block in model.decoder:
        assert isinstance(block.context_norm, torch.nn.LayerNorm) and block.context_norm.bias is None
    with torch.no_grad():
        context, real = model.encode(batch)
        torch.testing.assert_close(
            model.decode(batch, 5.0 * context, real), model.decode(batch, context, real), atol=1e-4, rtol=1e-4
        )
        before = model.decode(batch, context, real)
        model.decoder[1].context_norm.weight.mul_(3.0)  # the norm is the one the cross-attention reads
        assert not torch.allclose(model.decode(batch, context, real), before)


# ---------------------------------------------------------------------------------------------
# Weights saved by an older version of the model


def older_weights(model: FourM) -> dict[str, torch.Tensor]:
    """``model``'s weights as a run trained before the context projection and norms saved them."""
    return {k: v for k, v in model.state_dict().items() if "context_projection." not in k and "context_norm." not in k}


def test_weights_of_an_older_model_stop_with_one_line_naming_the_run():
    model = make_model()
    check_weight_names(model, model.state_dict(), "current")  # this version's own: no complaint
    with pytest.raises(OutdatedWeightsError, match=r"^run old was trained by an older version of the model") as err:
        check_weight_names(model, older_weights(model), "old")
    message = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in message
    assert (
        "lack context_projection.bias, context_projection.weight, decoder.0.context_norm.weight and 1 more" in message
    )
    assert "must be retrained" in message
    with pytest.raises(OutdatedWeightsError, match="add patch_embedding.weight"):
        check_weight_names(model, [*model.state_dict(), "patch_embedding.weight"], "future")


def test_make_train_refuses_to_resume_a_checkpoint_of_an_older_model(tmp_path):
    model = make_model()

    def save_checkpoint(path, state: dict[str, torch.Tensor]) -> None:
        """As Lightning saves ``FourMTraining``: plain hyperparameters, the module's ``model.`` weights."""
        hyper = {"model": dataclasses.asdict(TINY), "modalities": [dataclasses.asdict(m) for m in MODALITIES_4]}
        torch.save({"hyper_parameters": hyper, "state_dict": {f"model.{k}": v for k, v in state.items()}}, path)

    save_checkpoint(tmp_path / "current.ckpt", model.state_dict())
    save_checkpoint(tmp_path / "old.ckpt", older_weights(model))
    check_checkpoint(tmp_path / "current.ckpt", list(MODALITIES_4), "current")
    with pytest.raises(OutdatedWeightsError, match="run old was trained by an older version .* must be retrained"):
        check_checkpoint(tmp_path / "old.ckpt", list(MODALITIES_4), "old")


def test_modalities_written_before_layout_had_its_name_still_load(tmp_path):
    """Runs and checkpoints made before the trainer's ``kind`` became ``layout`` keep loading and resuming."""
    written = [dataclasses.asdict(m) for m in MODALITIES_4]
    older = [{("kind" if k == "layout" else k): v for k, v in m.items()} for m in written]
    assert (
        [ModelModality.from_dict(m) for m in older]
        == [ModelModality.from_dict(m) for m in written]
        == list(MODALITIES_4)
    )
    hyper = {"model": dataclasses.asdict(TINY), "modalities": older}
    state = {f"model.{k}": v for k, v in make_model().state_dict().items()}
    torch.save({"hyper_parameters": hyper, "state_dict": state}, tmp_path / "last.ckpt")
    check_checkpoint(tmp_path / "last.ckpt", list(MODALITIES_4), "older")


def test_sample_and_eval_refuse_the_final_weights_of_an_older_model(tmp_path):
    trained, fresh = make_model(seed=0), make_model(seed=1)
    save_model(trained, str(tmp_path / "model.safetensors"))
    load_weights(fresh, tmp_path / "model.safetensors", "current")
    assert torch.equal(fresh.context_projection.weight, trained.context_projection.weight)
    save_file(older_weights(trained), str(tmp_path / "old.safetensors"))
    with pytest.raises(OutdatedWeightsError, match="run old was trained by an older version .* must be retrained"):
        load_weights(fresh, tmp_path / "old.safetensors", "old")
