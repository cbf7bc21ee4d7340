import pickle
from collections import Counter

import numpy as np
import pytest
import torch

from four_m.core.config import ConfigError, MaskingConfig, TaskConfig, TextTokenizerConfig
from four_m.tokenize.text import reserved_tokens
from four_m.train.masking import (
    Masker,
    Mixtures,
    ModalityInfo,
    chunk_view,
    draw_keep_probability,
    fit_target,
    mask_sequence,
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
        elif info.layout == "map":
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
    masker = Masker(RUN, MaskingConfig(input_budget=24, target_budget=24))
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
            if info.layout == "map":
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
    steep = {info.name: 50.0 if info.name == "rgb" else 1.0 for info in RUN}
    cfg = MaskingConfig(
        input_budget=16, target_budget=16, input_alphas={"all2all": steep}, target_alphas={"all2all": steep}
    )
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
    steep = {"m0": 200.0, "m1": 1.0, "m2": 1.0}
    cfg = MaskingConfig(
        input_budget=12, target_budget=4, input_alphas={"all2all": steep}, target_alphas={"all2all": steep}
    )
    masker = Masker(synthetic_maps(3), cfg)
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


def sentinel(j: int) -> int:
    return CAPTION.first_sentinel_id + j


def whole_target(out, index: int) -> np.ndarray:
    """A sequence's trained target as the decoder reads it: its leading sentinel, then what it predicts."""
    keep = out.target_modality == index
    return np.concatenate([out.decoder_input_ids[keep][:1], out.target_ids[keep]])


def test_unmask_spans_by_hand():
    a, b, c, d, e, eos = 100, 101, 102, 103, 104, CAPTION.eos_id
    restored = unmask_spans(
        [a, sentinel(0), d, sentinel(1)], [sentinel(0), b, c, sentinel(1), e, eos, sentinel(2)], CAPTION
    )
    assert restored.tolist() == [a, b, c, d, e, eos]
    assert unmask_spans([], [sentinel(0), a, b, eos, sentinel(1)], CAPTION).tolist() == [a, b, eos]  # wholly hidden
    assert unmask_spans([a, b, eos], [sentinel(0)], CAPTION).tolist() == [a, b, eos]  # wholly visible


def test_span_mask_follows_4m_and_masks_eos_too():
    sequence = np.array([100, 101, 102, 103, CAPTION.eos_id])
    inputs, target = span_mask(sequence, 0.0, CAPTION, np.random.default_rng(0))
    assert inputs.tolist() == [sentinel(0)] and target.tolist() == [sentinel(0), *sequence, sentinel(1)]
    inputs, target = span_mask(sequence, 1.0, CAPTION, np.random.default_rng(0))
    assert inputs.tolist() == sequence.tolist() and target.tolist() == [sentinel(0)]  # nothing to predict
    eos_hidden = 0
    for seed in range(300):
        inputs, target = mask_sequence(sequence, 3, "random", CAPTION, np.random.default_rng(seed))
        assert len(inputs) <= 3 and target[0] == sentinel(0)
        eos_hidden += CAPTION.eos_id in target
        assert (unmask_spans(inputs, target, CAPTION) == sequence).all()
    assert eos_hidden > 100  # EOS is a target about as often as any token


def test_spans_never_need_more_sentinels_than_the_vocabulary_has():
    sequence = np.arange(1000, 1200)  # 200 tokens, keep 0.5: ~50 spans against 8 sentinels
    for seed in range(50):
        inputs, target = span_mask(sequence, 0.5, CAPTION, np.random.default_rng(seed))
        assert {t for t in target.tolist() if t < 1000} <= set(CAPTION.sentinel_ids)
        assert (unmask_spans(inputs, target, CAPTION) == sequence).all()


def test_keep_schemes():
    rng = np.random.default_rng(0)
    draws = [draw_keep_probability("random", rng) for _ in range(2000)]
    assert 0 <= min(draws) and max(draws) <= 1 and np.mean(draws) == pytest.approx(0.5, abs=0.03)
    assert {draw_keep_probability("binary", rng) for _ in range(50)} == {0.0, 1.0}
    sequence = np.append(np.arange(100, 110), CAPTION.eos_id)
    inputs, target = mask_sequence(sequence, 11, "all", CAPTION, rng)
    assert inputs.tolist() == sequence.tolist() and target.tolist() == [sentinel(0)]
    inputs, _ = mask_sequence(sequence, 6, "all", CAPTION, rng)  # lowered by 0.9 until it fits
    assert 1 <= len(inputs) <= 6


def test_over_budget_targets_start_at_a_sentinel_never_the_last():
    rng = np.random.default_rng(1)
    sequence = np.append(np.arange(100, 130), CAPTION.eos_id)
    starts = set()
    for seed in range(300):
        _, target = mask_sequence(sequence, 15, "random", CAPTION, rng)
        allotment = int(rng.integers(1, 8))
        piece = fit_target(target, allotment, CAPTION, np.random.default_rng(seed))
        assert piece[0] in CAPTION.sentinel_ids and len(piece) - 1 <= allotment
        if len(target) - 1 > allotment:
            at = int(np.flatnonzero(target == piece[0])[0])
            assert at < len(target) - 1 and (target[at : at + len(piece)] == piece).all()
            starts.add(int(piece[0]))
    assert len(starts) > 2  # not always the first sentinel


def test_sequences_decode_back_through_the_masker():
    # a target budget larger than everything a sample can offer: no target is ever cut
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
            target = whole_target(out, index)
            if len(target) and (out.target_modality == index).any():
                assert (unmask_spans(ids_in, target, info) == sample[info.name]).all()
                hidden_some += bool(len(ids_in))
            assert sentinel(0) not in out.target_ids[out.target_modality == index]  # S_0 is never predicted
    assert hidden_some > 20  # the partly visible case is exercised, not only all-or-nothing


def share_with_target(masker: Masker, names: tuple[str, ...], samples: int, length: int = 15) -> dict[str, float]:
    rng = np.random.default_rng(12)
    hits = dict.fromkeys(names, 0)
    for seed in range(samples):
        sample = random_sample(rng, BENCH_RUN)
        for name in names:
            sample[name] = random_sequence(rng, CAPTION, length=length)
        targets = masked(masker, sample, seed).target_modality
        for name in names:
            hits[name] += [m.name for m in BENCH_RUN].index(name) in targets
    return {name: count / samples for name, count in hits.items()}


BENCH_RUN = (*(ModalityInfo(n, "map", 196) for n in ("rgb", "depth", "normal", "semseg", "clip")), CAPTION, DET)


def test_captions_and_boxes_are_targets_in_almost_every_all2all_sample():
    # issue 16: was 52-54 % with 16-token sequences, when the input allotment could cover a sequence
    masker = Masker(BENCH_RUN, MaskingConfig(input_budget=128, target_budget=128, alpha=1.0))
    assert min(share_with_target(masker, ("caption", "det"), 1000).values()) >= 0.95


def test_per_mixture_alphas_are_used():
    cfg = MaskingConfig(
        input_budget=16,
        target_budget=16,
        mixtures=("to_caption", "to_det"),
        mixture_weights=(3.0, 1.0),
        input_alphas={"to_caption": {"rgb": 1.0}, "to_det": {"rgb": 1.0}},
        target_alphas={"to_caption": {"caption": 1.0}, "to_det": {"det": 1.0}},
    )
    shares = share_with_target(Masker(BENCH_RUN, cfg), ("caption", "det"), 400)
    assert shares["caption"] == pytest.approx(0.75, abs=0.07) and shares["det"] == pytest.approx(0.25, abs=0.07)


@pytest.mark.parametrize("count", [3, 14])
def test_batch_shapes_depend_on_the_budgets_only(count):
    infos = synthetic_maps(count)
    masker = Masker(infos, MaskingConfig(input_budget=32, target_budget=24))
    rng = np.random.default_rng(count)
    batch = masker.collate([masked(masker, random_sample(rng, infos), seed) for seed in range(5)])
    assert batch.pixels == {}  # no pixel input in this run
    for name, value in vars(batch).items():
        if name != "pixels":
            assert value.shape == ((5, 32) if name.startswith("input") else (5, 24)), name
    assert batch.input_mask.dtype == torch.bool and batch.input_ids.dtype == torch.long
    assert (batch.decoder_input_ids == 0).all()  # map targets are predicted from a mask token


def test_min_and_max_token_counts_are_respected_on_each_side():
    cfg = MaskingConfig(
        input_budget=30,
        target_budget=30,
        max_input_tokens={"rgb": 3, "caption": 5, "normal": 7},  # normal keeps >= 9 of 16 for its target
        max_target_tokens={"rgb": 4, "det": 6},
        min_input_tokens={"depth": 7},
        min_target_tokens={"normal": 9},
    )
    masker = Masker(RUN, cfg)
    rng = np.random.default_rng(9)
    for seed in SEEDS:
        sample = random_sample(rng, RUN)
        sample["depth"] = sample["normal"] = np.zeros(GRID, np.uint16)
        out = masked(masker, sample, seed)
        for index, most in ((0, 3), (3, 5)):
            assert (out.input_modality == index).sum() <= most
        for index, most in ((0, 4), (4, 6)):
            assert (out.target_modality == index).sum() <= most
        assert (out.input_modality == 1).sum() >= 7 and (out.target_modality == 2).sum() >= 9


def test_same_seed_same_masks_also_after_pickling():
    masker = Masker(RUN, MaskingConfig(input_budget=16, target_budget=16, mixtures=("all2all", "rgb2all")), seed=7)
    in_worker = pickle.loads(pickle.dumps(masker))
    sample = random_sample(np.random.default_rng(10), RUN)
    first = masker.collate([masker(sample, masker.sample_rng(i, epoch=1)) for i in range(4)])
    again = in_worker.collate([in_worker(sample, in_worker.sample_rng(i, epoch=1)) for i in range(4)])
    other = masker.collate([masker(sample, masker.sample_rng(i, epoch=2)) for i in range(4)])
    for name, tensor in first.tensors().items():
        assert torch.equal(tensor, again.tensors()[name]), name
    assert not torch.equal(first.input_position, other.input_position)


def test_modality_infos_follow_the_registry_and_the_text_vocabulary():
    text = TextTokenizerConfig(sentinels=8, max_tokens=64)
    rgb, caption = modality_infos(["rgb", "caption"], text)
    assert (rgb.layout, rgb.num_tokens) == ("map", 14 * 14)
    assert (caption.layout, caption.num_tokens, caption.num_sentinels) == ("sequence", 64, 8)
    vocabulary = reserved_tokens(text)
    assert [vocabulary[i] for i in (caption.pad_id, caption.sos_id, caption.eos_id)] == ["[PAD]", "[SOS]", "[EOS]"]
    assert [vocabulary[i] for i in caption.sentinel_ids] == [f"[S_{i}]" for i in range(8)]
    with pytest.raises(ValueError, match="unknown modality"):
        modality_infos(["rgb", "sketch"])


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"input_budget": 0}, "train.input_budget"),
        ({"target_budget": 0}, "train.target_budget"),
        ({"alpha": 0.0}, "train.alpha"),
        ({"min_input_budget": 0}, "train.min_input_budget"),
        ({"unconditional_rate": 1.0}, "train.unconditional_rate"),
        ({"mixtures": ("rgb2depth",)}, "train.input_alphas.rgb2depth"),
        ({"mixtures": ()}, "train.mixtures"),
        ({"max_input_tokens": {"rgb": -1}}, "train.max_input_tokens.rgb"),
        ({"min_target_tokens": {"rgb": 200}}, "train.min_target_tokens"),
        ({"mixtures": ("mine",)}, "train.input_alphas.mine"),
        ({"mixture_weights": (1.0, 2.0)}, "train.mixture_weights"),
        ({"keep": {"all2all": {"caption": "some"}}}, "train.keep.all2all.caption"),
        ({"target_alphas": {"rgb2all": {"rgb": 1.0}}}, "train.target_alphas"),
    ],
)
def test_config_errors_name_the_field(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        MaskingConfig(**kwargs)


def test_masker_rejects_settings_that_do_not_fit_the_run():
    with pytest.raises(ConfigError, match=r"train.input_alphas.all2all: modalities \['sketch'\]"):
        Masker(synthetic_maps(2), MaskingConfig(input_alphas={"all2all": {"sketch": 1.0}}))
    with pytest.raises(ConfigError, match=r"max_target_tokens: modalities \['rgb'\]"):
        Masker(synthetic_maps(2), MaskingConfig(max_target_tokens={"rgb": 2}))
    with pytest.raises(ConfigError, match="rgb2all"):
        Masker(synthetic_maps(2), MaskingConfig(mixtures=("rgb2all",)))
    masker = Masker(synthetic_maps(1))
    with pytest.raises(ValueError, match="m0: 15 tokens"):
        masker({"m0": np.zeros(GRID - 1, np.uint16)}, np.random.default_rng(0))


def _chunked(kind_name: str) -> tuple[ModalityInfo, range]:
    (info,) = modality_infos([kind_name], TextTokenizerConfig(sentinels=8, coordinate_bins=1000))
    return info, info.chunk_openers


def test_a_palette_sample_shows_one_of_its_palettes_each_drawn_about_as_often():
    info, openers = _chunked("color_palette")
    assert info.chunks == "one_of"
    values = 5000  # far from the opener ids: any id not an opener is a value here
    stored = np.array([i for k in range(1, 8) for i in [openers[k], *[values + k] * (3 * k)]] + [info.eos_id])
    seen = Counter()
    for seed in range(700):
        shown, chunks = chunk_view(info, stored, np.random.default_rng(seed))
        k = int(shown[0] - openers.start)
        assert shown.tolist() == [openers[k], *[values + k] * (3 * k), info.eos_id]
        assert chunks.tolist() == [0] * (1 + 3 * k) + [1]
        seen[k] += 1
    assert set(seen) == set(range(1, 8)) and min(seen.values()) > 60
    shown, _ = chunk_view(info, stored, None)
    assert shown[0] == openers[7], "given as an input, a palette is the seven-colour one"


def test_metadata_pairs_are_shuffled_per_sample_and_masked_as_whole_pairs():
    info, openers = _chunked("metadata")
    assert info.chunks == "shuffled"
    pairs = [[openers[key], 100 + key] for key in (0, 3, 9, 10, 13)]
    stored = np.array([i for pair in pairs for i in pair] + [info.eos_id])
    orders = set()
    for seed in range(40):
        rng = np.random.default_rng(seed)
        shown, chunks = chunk_view(info, stored, rng)
        shown_pairs = [shown[i : i + 2].tolist() for i in range(0, len(shown) - 1, 2)]
        assert sorted(shown_pairs) == sorted(pairs) and shown[-1] == info.eos_id
        orders.add(tuple(p[0] for p in shown_pairs))
        inputs, target = span_mask(shown, 0.5, info, rng, chunks)
        for ids in (inputs, target):
            values = [i for i, token in enumerate(ids) if 100 <= token < 200]
            assert all(ids[i - 1] in openers for i in values), "a value was shown or hidden without its key"
        assert np.array_equal(unmask_spans(inputs, target, info), shown)
    assert len(orders) > 20
    assert np.array_equal(chunk_view(info, stored, None)[0], stored), "given as an input, the stored order"


def test_unchunked_sequences_keep_their_random_stream():
    (caption,) = modality_infos(["caption"])
    sequence = np.array([50, 51, 52, caption.eos_id])
    rng = np.random.default_rng(0)
    assert chunk_view(caption, sequence, rng) == (sequence, None)
    assert rng.random() == np.random.default_rng(0).random()


def test_a_task_shows_its_inputs_whole_and_asks_its_targets_whole():
    run = RUN[:3] + (CAPTION,)  # rgb, depth, normal, caption
    budget = GRID + CAPTION.num_tokens
    task = TaskConfig(inputs=("rgb", "caption"), targets=("depth",))
    masker = Masker(run, MaskingConfig(input_budget=budget, target_budget=GRID, task=task))
    rng = np.random.default_rng(0)
    for seed in range(50):
        sample = random_sample(rng, run)
        out = masked(masker, sample, seed)
        rgb_ids, rgb_positions = tokens_of(out.input_ids, out.input_modality, out.input_position, 0)
        assert rgb_positions.tolist() == list(range(GRID))  # the whole grid, every example
        assert rgb_ids.tolist() == sample["rgb"].tolist()
        caption, _ = tokens_of(out.input_ids, out.input_modality, out.input_position, 3)
        assert caption.tolist() == sample["caption"].tolist()  # kept whole (scheme all), EOS included
        depth_ids, depth_positions = tokens_of(out.target_ids, out.target_modality, out.target_position, 1)
        assert depth_positions.tolist() == list(range(GRID)) and depth_ids.tolist() == sample["depth"].tolist()
        assert set(out.target_modality.tolist()) == {1}  # normal is neither shown nor asked
        assert 2 not in out.input_modality.tolist()


def test_a_task_sample_without_its_inputs_is_shown_nothing_rather_than_falling_back_to_all2all():
    task = MaskingConfig(input_budget=GRID, target_budget=GRID, task=TaskConfig(("rgb",), ("depth",)))
    masker = Masker(RUN[:2], task)
    sample = {"rgb": None, "depth": np.arange(GRID, dtype=np.uint16)}
    out = masked(masker, sample, 0)
    assert len(out.input_ids) == 0  # all2all would have shown part of depth
    assert sorted(out.target_position.tolist()) == list(range(GRID))


def test_a_task_needs_budgets_that_hold_its_grids_and_replaces_the_mixtures():
    with pytest.raises(ConfigError, match=r"input_budget: 8 cannot hold the task's \['rgb'\] whole: 16"):
        Masker(RUN[:2], MaskingConfig(input_budget=8, task=TaskConfig(("rgb",), ("depth",))))
    inherited = {
        "mixtures": ("rgb2all", "mine"),
        "input_alphas": {"mine": {"det": 1.0}},
        "target_alphas": {"mine": {"det": 1.0}},
    }
    task = MaskingConfig(**inherited, task=TaskConfig(("rgb",), ("depth",)))  # a pre-training's settings
    drawn = Mixtures(("task",), (), {"task": {"rgb": 1.0}}, {"task": {"depth": 1.0}}, {"task": {"rgb": "all"}})
    assert Mixtures.of(task) == drawn
    assert Masker(RUN[:2], task).mixtures == drawn  # "mine" names det, which is not among the task's modalities
    with pytest.raises(ConfigError, match="needs both inputs and targets"):
        MaskingConfig(task=TaskConfig(inputs=("rgb",)))


def test_token_count_ranges_draw_each_samples_budgets_uniformly_within_them():
    cfg = MaskingConfig(input_budget=24, target_budget=20, min_input_budget=4, min_target_budget=10)
    masker = Masker(RUN[:3], cfg)
    rng = np.random.default_rng(0)
    inputs, targets = Counter(), Counter()
    for seed in range(600):
        out = masked(masker, random_sample(rng, RUN[:3]), seed)  # three full grids: every budget fills
        inputs[len(out.input_ids)] += 1
        targets[len(out.target_ids)] += 1
    assert set(inputs) == set(range(4, 25)) and set(targets) == set(range(10, 21))
    assert max(inputs.values()) < 3 * min(inputs.values())  # uniform: no count far more frequent
    fixed = Masker(RUN[:3], MaskingConfig(input_budget=24, target_budget=20))
    assert {len(masked(fixed, random_sample(rng, RUN[:3]), s).input_ids) for s in range(20)} == {24}
    with pytest.raises(ConfigError, match="min_input_budget"):
        MaskingConfig(input_budget=8, min_input_budget=9)
