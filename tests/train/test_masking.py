import dataclasses
import pickle

import numpy as np
import pytest
import torch

from four_m.core.config import ConfigError, TextTokenizerConfig
from four_m.tokenize.text import reserved_tokens
from four_m.train.masking import (
    Masker,
    MaskingConfig,
    ModalityInfo,
    modality_infos,
    span_mask,
    split_budget,
    unmask_spans,
)

GRID = 16
CAPTION = ModalityInfo("caption", "sequence", 32, num_sentinels=8)
DET = ModalityInfo("det", "sequence", 32, num_sentinels=8)
RUN = (
    ModalityInfo("rgb", "map", GRID),
    ModalityInfo("depth", "map", GRID),
    ModalityInfo("normal", "map", GRID),
    CAPTION,
    DET,
)
SEEDS = range(200)


def synthetic_maps(count: int) -> tuple[ModalityInfo, ...]:
    return tuple(ModalityInfo(f"m{i}", "map", GRID) for i in range(count))


def random_sequence(rng: np.random.Generator, info: ModalityInfo, length: int | None = None) -> np.ndarray:
    """Stored form: word ids (above the reserved blocks), then EOS; at most the cap, EOS included."""
    length = int(rng.integers(0, info.num_tokens)) if length is None else length
    words = rng.integers(info.sentinel_ids.stop, 1000, size=length)
    return np.array([*words, info.eos_id], dtype=np.uint16)


def random_sample(rng: np.random.Generator, infos, present_probability: float = 1.0) -> dict:
    """Absent modalities are None or missing, half and half."""
    sample = {}
    for info in infos:
        if rng.random() >= present_probability:
            if rng.random() < 0.5:
                sample[info.name] = None
        elif info.kind == "map":
            sample[info.name] = rng.integers(0, 4096, size=info.num_tokens).astype(np.uint16)
        else:
            sample[info.name] = random_sequence(rng, info)
    return sample


def masked(masker: Masker, sample: dict, seed: int):
    return masker(sample, np.random.default_rng(seed))


def tokens_of(ids, modality, position, index):
    keep = modality == index
    return ids[keep], position[keep]


def test_split_budget_rounds_by_largest_remainder_and_redistributes():
    big = np.array([100, 100, 100])
    assert split_budget(10, [0.46, 0.34, 0.20], big).tolist() == [5, 3, 2]
    # rgb can give only 2: the 8 left follow the other shares (0.3 : 0.2 -> 4.8, 3.2).
    assert split_budget(10, [0.5, 0.3, 0.2], [2, 100, 100]).tolist() == [2, 5, 3]
    assert split_budget(10, [0.5, 0.3, 0.2], [1, 2, 3]).tolist() == [1, 2, 3]  # fewer tokens than budget
    assert split_budget(6, [1.0, 0.0, 0.0], [2, 5, 5]).tolist() == [2, 2, 2]  # zero shares: evenly
    rng = np.random.default_rng(0)
    for _ in range(300):
        m = int(rng.integers(1, 8))
        shares, available = rng.dirichlet(np.full(m, 0.5)), rng.integers(0, 30, size=m)
        budget = int(rng.integers(1, 100))
        counts = split_budget(budget, shares, available)
        assert counts.sum() == min(budget, available.sum())
        assert (counts >= 0).all() and (counts <= available).all()
        if (shares * budget <= available).all() and budget <= available.sum():
            assert np.abs(counts - shares * budget).max() < 1  # no cap binds: plain largest remainder


def test_budgets_are_used_exactly_when_the_sample_has_the_tokens():
    masker = Masker(RUN, MaskingConfig(input_budget=24, target_budget=24, span_mean=2.5))
    rng = np.random.default_rng(1)
    samples = [masked(masker, random_sample(rng, RUN), seed) for seed in SEEDS]
    batch = masker.collate(samples)
    assert (batch.input_mask.sum(1) == 24).all()
    assert (batch.target_mask.sum(1) == 24).all()
    # sequences take part: some samples spend budget on caption/det inputs and targets
    assert (batch.input_modality[batch.input_mask] >= 3).any()
    assert (batch.target_modality[batch.target_mask] >= 3).any()


def test_an_unconditional_share_of_samples_gets_no_input_but_full_targets():
    masker = Masker(RUN, MaskingConfig(input_budget=24, target_budget=24, unconditional_rate=0.25))
    rng = np.random.default_rng(2)
    batch = masker.collate([masked(masker, random_sample(rng, RUN), seed) for seed in SEEDS])
    empty = batch.input_mask.sum(1) == 0
    assert 0.15 < empty.float().mean() < 0.35  # 200 samples at 25 %
    assert (batch.input_mask.sum(1)[~empty] == 24).all() and (batch.target_mask.sum(1) == 24).all()


def test_a_sample_with_too_few_tokens_is_padded():
    infos = synthetic_maps(2)
    masker = Masker(infos, MaskingConfig(input_budget=12, target_budget=12))
    sample = {"m0": np.arange(GRID, dtype=np.uint16), "m1": None}
    batch = masker.collate([masked(masker, sample, seed) for seed in range(5)])
    assert batch.input_mask.sum(1).tolist() == [12] * 5
    assert batch.target_mask.sum(1).tolist() == [GRID - 12] * 5  # what the inputs left of the grid
    for name in ("target_ids", "target_modality", "target_position", "decoder_input_ids"):
        assert (getattr(batch, name)[~batch.target_mask] == 0).all()


def test_map_inputs_and_targets_are_disjoint_in_range_and_carry_the_right_ids():
    masker = Masker(RUN, MaskingConfig(input_budget=20, target_budget=20, mixtures=("all2all", "rgb2all")))
    rng = np.random.default_rng(2)
    for seed in SEEDS:
        sample = random_sample(rng, RUN, present_probability=0.8)
        out = masked(masker, sample, seed)
        for index, info in enumerate(RUN):
            ids_in, pos_in = tokens_of(out.input_ids, out.input_modality, out.input_position, index)
            ids_tgt, pos_tgt = tokens_of(out.target_ids, out.target_modality, out.target_position, index)
            for positions in (pos_in, pos_tgt):
                assert ((positions >= 0) & (positions < info.num_tokens)).all()
            if info.kind == "map":
                assert len(set(pos_in)) == len(pos_in) and len(set(pos_tgt)) == len(pos_tgt)
                assert not set(pos_in) & set(pos_tgt)
                if len(pos_in) or len(pos_tgt):
                    grid = sample[info.name]
                    assert (ids_in == grid[pos_in]).all() and (ids_tgt == grid[pos_tgt]).all()
            else:  # sequence positions run 0..len-1
                assert pos_in.tolist() == list(range(len(pos_in)))
                assert pos_tgt.tolist() == list(range(len(pos_tgt)))


def test_absent_modalities_are_never_drawn():
    # rgb gets a huge concentration: if absent modalities were drawn, rgb would show up constantly
    cfg = MaskingConfig(input_budget=16, target_budget=16, alphas={"rgb": 50.0})
    masker = Masker(RUN, cfg)
    rng = np.random.default_rng(3)
    seen = set()
    for seed in range(300):
        sample = random_sample(rng, RUN, present_probability=0.5)
        present = {i for i, info in enumerate(RUN) if sample.get(info.name) is not None}
        out = masked(masker, sample, seed)
        drawn = set(out.input_modality.tolist()) | set(out.target_modality.tolist())
        assert drawn <= present
        seen |= drawn
    assert seen == set(range(len(RUN)))


def test_per_modality_alpha_steers_the_split():
    masker = Masker(synthetic_maps(3), MaskingConfig(input_budget=12, target_budget=4, alphas={"m0": 200.0}))
    sample = {f"m{i}": np.zeros(GRID, np.uint16) for i in range(3)}
    share = np.mean([(masked(masker, sample, seed).input_modality == 0).mean() for seed in range(50)])
    assert share > 0.9


def test_rgb2all_puts_the_input_on_rgb_and_never_targets_it():
    masker = Masker(RUN, MaskingConfig(input_budget=12, target_budget=24, mixtures=("rgb2all",)))
    rng = np.random.default_rng(4)
    for seed in range(100):
        sample = random_sample(rng, RUN)
        out = masked(masker, sample, seed)
        assert out.input_modality.tolist() == [0] * 12
        assert 0 not in out.target_modality
    # without rgb the sample falls back to all2all
    sample = random_sample(rng, RUN)
    sample["rgb"] = None
    out = masked(masker, sample, 0)
    assert len(out.input_ids) == 12 and 0 not in out.input_modality


def test_mixtures_are_drawn_per_sample():
    masker = Masker(RUN, MaskingConfig(input_budget=12, target_budget=12, mixtures=("all2all", "rgb2all")))
    rng = np.random.default_rng(5)
    rgb_only = [set(masked(masker, random_sample(rng, RUN), seed).input_modality.tolist()) == {0} for seed in SEEDS]
    assert 0.3 < np.mean(rgb_only) < 0.8  # about half rgb2all, plus all2all draws that happen to pick rgb only


def test_unmask_spans_by_hand():
    s0, s1, eos = CAPTION.first_sentinel_id, CAPTION.first_sentinel_id + 1, CAPTION.eos_id
    a, b, c, d, e = 100, 101, 102, 103, 104
    restored = unmask_spans([a, s0, d, s1], [s0, b, c, s1, e, eos], CAPTION)
    assert restored.tolist() == [a, b, c, d, e, eos]
    assert unmask_spans([], [s0, a, b, eos], CAPTION).tolist() == [a, b, eos]  # wholly hidden
    assert unmask_spans([a, b], [], CAPTION).tolist() == [a, b, eos]  # wholly visible


def test_span_masking_round_trips_and_fills_its_input_exactly():
    rng = np.random.default_rng(6)
    for seed in range(400):
        stored = random_sequence(rng, CAPTION)
        content = stored[:-1].astype(np.int64)
        input_tokens = int(rng.integers(0, len(content) + 2))
        inputs, target = span_mask(content, input_tokens, CAPTION, 3.0, np.random.default_rng(seed))
        assert len(inputs) == min(input_tokens, len(content))
        sentinels = [t for t in inputs.tolist() if t in CAPTION.sentinel_ids]
        assert sentinels == list(CAPTION.sentinel_ids[: len(sentinels)])  # S_0, S_1, ... in order
        if len(target):
            assert target[0] == CAPTION.first_sentinel_id and target[-1] == CAPTION.eos_id
        assert (unmask_spans(inputs, target, CAPTION) == stored).all()


def test_spans_average_span_mean():
    info = ModalityInfo("caption", "sequence", 512)
    content = np.arange(1000, 1400)
    inputs, target = span_mask(content, 200, info, 3.0, np.random.default_rng(0))
    spans = sum(t in info.sentinel_ids for t in inputs.tolist())
    hidden = len(target) - spans - 1
    assert spans == 100 and hidden / spans == pytest.approx(3.0, abs=0.05)  # 100 spans: the sentinel limit


def test_sequences_decode_back_through_the_masker():
    # a target budget larger than everything a sample can offer: no target is ever truncated
    cfg = MaskingConfig(input_budget=24, target_budget=3 * GRID + 2 * 34, mixtures=("all2all", "rgb2all"))
    masker = Masker(RUN, cfg)
    rng = np.random.default_rng(7)
    hidden_some = 0
    for seed in SEEDS:
        sample = random_sample(rng, RUN)
        out = masked(masker, sample, seed)
        for index in (3, 4):
            info = RUN[index]
            ids_in, _ = tokens_of(out.input_ids, out.input_modality, out.input_position, index)
            ids_tgt, _ = tokens_of(out.target_ids, out.target_modality, out.target_position, index)
            assert (unmask_spans(ids_in, ids_tgt, info) == sample[info.name]).all()
            hidden_some += bool(len(ids_in)) and bool(len(ids_tgt))
    assert hidden_some > 20  # the partly visible case is exercised, not only all-or-nothing


def test_a_truncated_sequence_target_is_a_prefix_with_teacher_forcing():
    infos = (CAPTION,)
    sample = {"caption": random_sequence(np.random.default_rng(8), CAPTION, length=25)}
    whole = Masker(infos, MaskingConfig(input_budget=10, target_budget=64))
    cut = Masker(infos, MaskingConfig(input_budget=10, target_budget=6))
    for seed in range(20):
        full, short = masked(whole, sample, seed), masked(cut, sample, seed)
        assert (full.input_ids == short.input_ids).all()
        assert len(short.target_ids) == 6 and (short.target_ids == full.target_ids[:6]).all()
        assert short.target_position.tolist() == list(range(6))
        assert short.decoder_input_ids.tolist() == [CAPTION.sos_id, *short.target_ids[:-1].tolist()]


@pytest.mark.parametrize("count", [3, 14])
def test_batch_shapes_depend_on_the_budgets_only(count):
    infos = synthetic_maps(count)
    masker = Masker(infos, MaskingConfig(input_budget=32, target_budget=24))
    rng = np.random.default_rng(count)
    batch = masker.collate([masked(masker, random_sample(rng, infos), seed) for seed in range(5)])
    for name, value in vars(batch).items():
        assert value.shape == ((5, 32) if name.startswith("input") else (5, 24)), name
    assert batch.input_mask.dtype == torch.bool and batch.input_ids.dtype == torch.long
    assert (batch.decoder_input_ids == 0).all()  # map targets are predicted from a mask token


def test_caps_are_respected_on_each_side():
    cfg = MaskingConfig(input_budget=30, target_budget=30, max_tokens_per_modality={"rgb": 3, "caption": 5})
    masker = Masker(RUN, cfg)
    rng = np.random.default_rng(9)
    for seed in SEEDS:
        out = masked(masker, random_sample(rng, RUN), seed)
        for index, cap in ((0, 3), (3, 5)):
            assert (out.input_modality == index).sum() <= cap
            assert (out.target_modality == index).sum() <= cap


def test_same_seed_same_masks_also_after_pickling():
    masker = Masker(RUN, MaskingConfig(input_budget=16, target_budget=16, mixtures=("all2all", "rgb2all"), seed=7))
    in_worker = pickle.loads(pickle.dumps(masker))
    sample = random_sample(np.random.default_rng(10), RUN)
    first = masker.collate([masker(sample, masker.sample_rng(i, epoch=1)) for i in range(4)])
    again = in_worker.collate([in_worker(sample, in_worker.sample_rng(i, epoch=1)) for i in range(4)])
    other = masker.collate([masker(sample, masker.sample_rng(i, epoch=2)) for i in range(4)])
    for field in dataclasses.fields(first):
        assert torch.equal(getattr(first, field.name), getattr(again, field.name))
    assert not torch.equal(first.input_position, other.input_position)


def test_modality_infos_follow_the_registry_and_the_text_vocabulary():
    text = TextTokenizerConfig(sentinels=8, max_tokens=64)
    rgb, caption = modality_infos(["rgb", "caption"], text)
    assert (rgb.kind, rgb.num_tokens) == ("map", 14 * 14)
    assert (caption.kind, caption.num_tokens, caption.num_sentinels) == ("sequence", 64, 8)
    vocabulary = reserved_tokens(text)
    assert [vocabulary[i] for i in (caption.pad_id, caption.sos_id, caption.eos_id)] == ["[PAD]", "[SOS]", "[EOS]"]
    assert [vocabulary[i] for i in caption.sentinel_ids] == [f"[S_{i}]" for i in range(8)]
    with pytest.raises(ValueError, match="unknown modality"):
        modality_infos(["rgb", "sketch"])


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"input_budget": 0}, "train.masking.input_budget"),
        ({"target_budget": 0}, "train.masking.target_budget"),
        ({"alphas": 0.0}, "train.masking.alphas"),
        ({"alphas": {"rgb": -1.0}}, "train.masking.alphas.rgb"),
        ({"mixtures": ("rgb2depth",)}, "train.masking.mixtures"),
        ({"mixtures": ()}, "train.masking.mixtures"),
        ({"max_tokens_per_modality": {"rgb": 0}}, "train.masking.max_tokens_per_modality.rgb"),
        ({"span_mean": 0.5}, "train.masking.span_mean"),
    ],
)
def test_config_errors_name_the_field(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        MaskingConfig(**kwargs)


def test_masker_rejects_settings_that_do_not_fit_the_run():
    with pytest.raises(ConfigError, match="train.masking.alphas"):
        Masker(synthetic_maps(2), MaskingConfig(alphas={"rgb": 2.0}))
    with pytest.raises(ConfigError, match="rgb2all"):
        Masker(synthetic_maps(2), MaskingConfig(mixtures=("rgb2all",)))
    masker = Masker(synthetic_maps(1))
    with pytest.raises(ValueError, match="m0: 15 tokens"):
        masker({"m0": np.zeros(GRID - 1, np.uint16)}, np.random.default_rng(0))
