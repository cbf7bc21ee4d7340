"""Any-to-any generation on a tiny random 4M: 4M's and MaskGIT's schedules, MaskGIT/ROAR fill each grid
position once in exactly `steps` steps, confidence after filtering, temperature schedules, guidance
by one or several conditions, in-painting, sequences stop at EOS or the cap and never emit special
tokens, seeding, chaining, samples without a modality, and the error messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from four_m.core.config import ConfigError, GenerateConfig
from four_m.core.errors import UserError
from four_m.train.batch import MaskedBatch
from four_m.train.generate import (
    TO_GENERATE,
    Decoding,
    Generator,
    commit_schedule,
    guided,
    keep_share,
    sample,
    temperatures,
)
from four_m.train.masking import ModalityInfo
from four_m.train.model import FourM, ModelConfig, ModelModality

TINY = ModelConfig(dim=32, encoder_layers=2, decoder_layers=2, heads=4)
MODALITIES = (
    ModelModality("rgb", "map", vocab_size=16, positions=16),  # a 4 x 4 grid
    ModelModality("depth", "map", vocab_size=12, positions=16),
    ModelModality("caption", "sequence", vocab_size=32, positions=8, vocabulary="text"),
)
RGB, DEPTH, CAPTION = range(3)
G = 16
# The text layout of tokenize.text, made small: PAD 0, UNK 1, SOS 2, EOS 3, sentinels 4..7, words 8..31.
PAD, UNK, SOS, EOS = range(4)
SENTINELS = range(4, 8)
A, B, C = 10, 11, 12
INFOS = (
    ModalityInfo("rgb", "map", G),
    ModalityInfo("depth", "map", G),
    ModalityInfo("caption", "sequence", 8, num_sentinels=len(SENTINELS)),
)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed: int = 0) -> FourM:
    """A random tiny 4M whose outputs depend on its inputs' ids. At initialisation they barely do
    (ids' embeddings are small next to the positions', cross-attention writes little), so every
    sample would decode alike and guidance, chaining and padding bugs could hide: scale both up."""
    torch.manual_seed(seed)
    model = FourM(TINY, MODALITIES).eval()
    with torch.no_grad():
        for table in model.token_embeddings.values():
            table.weight.mul_(50)
        for block in model.decoder:
            block.cross_attention.key_value.weight.mul_(5)
            block.cross_attention.out.weight.mul_(100)
    return model


def rgb_grids(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 16, G).astype(np.uint16) for _ in range(count)]


def record(monkeypatch: pytest.MonkeyPatch, model: FourM) -> list[tuple[str, MaskedBatch]]:
    """Every encode and decode call of ``model``, in order, with its batch."""
    calls: list[tuple[str, MaskedBatch]] = []
    encode, decode = model.encode, model.decode

    def recording_encode(batch):
        calls.append(("encode", batch))
        return encode(batch)

    def recording_decode(batch, *memory):
        calls.append(("decode", batch))
        return decode(batch, *memory)

    monkeypatch.setattr(model, "encode", recording_encode)
    monkeypatch.setattr(model, "decode", recording_decode)
    return calls


def inputs_of(batch: MaskedBatch, b: int, m: int) -> dict[int, int]:
    """Sample ``b``'s real encoder inputs of modality ``m``: {position: id}."""
    here = batch.input_mask[b] & (batch.input_modality[b] == m)
    return dict(zip(batch.input_position[b][here].tolist(), batch.input_ids[b][here].tolist(), strict=True))


def targets_of(batch: MaskedBatch, b: int) -> set[int]:
    return set(batch.target_position[b][batch.target_mask[b]].tolist())


# ---------------------------------------------------------------------------------------------
# Schedules and sampling


# 4M's cosine_schedule and linear_schedule (ml-4m fourm/utils/generation.py), run on these pairs.
FOURM_COSINE = {
    (196, 8): [7, 21, 32, 38, 38, 32, 21, 7],
    (16, 4): [2, 6, 6, 2],
    (16, 5): [2, 4, 5, 4, 1],
    (10, 8): [0, 1, 2, 2, 2, 2, 1, 0],
    (256, 12): [4, 13, 20, 27, 31, 33, 33, 31, 27, 20, 13, 4],
    (16, 16): [0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0],
}
FOURM_LINEAR = {(196, 8): [25, 25, 25, 25, 24, 24, 24, 24], (16, 5): [4, 3, 3, 3, 3], (256, 12): [22] * 4 + [21] * 8}


@pytest.mark.parametrize(("positions", "steps"), list(FOURM_COSINE))
def test_cosine_is_4ms_symmetric_schedule(positions, steps):
    assert commit_schedule(positions, steps, "cosine") == FOURM_COSINE[positions, steps]


@pytest.mark.parametrize(("positions", "steps"), list(FOURM_LINEAR))
def test_linear_is_4ms_even_schedule(positions, steps):
    assert commit_schedule(positions, steps, "linear") == FOURM_LINEAR[positions, steps]


def test_cosine_is_the_default_schedule_of_the_config_and_of_decoding():
    assert GenerateConfig().schedule == Decoding().schedule == "cosine"


@pytest.mark.parametrize("schedule", ["cosine", "linear", "maskgit_cosine"])
@pytest.mark.parametrize(
    ("positions", "steps"), [(16, 1), (16, 8), (16, 16), (196, 12), (196, 195), (7, 3), (6, 5), (256, 25)]
)
def test_commit_schedules_sum_to_the_grid_in_exactly_steps_steps(schedule, positions, steps):
    counts = commit_schedule(positions, steps, schedule)
    assert len(counts) == steps and sum(counts) == positions
    # 4M's cosine may leave a step empty (and its own rounding would go negative at 6 in 5, 256 in 25).
    assert min(counts) >= (0 if schedule == "cosine" else 1)


def test_maskgit_cosine_rises():
    for positions, steps in [(196, 8), (196, 12), (256, 16)]:
        counts = commit_schedule(positions, steps, "maskgit_cosine")
        assert counts == sorted(counts) and counts[0] < counts[-1]
    assert commit_schedule(196, 12, "maskgit_cosine")[:3] == [2, 5, 8]  # 196 * (1 - cos(pi/2 * t/12)), rounded
    with pytest.raises(ConfigError, match=r"decoding\.steps: must be in \[1, 16\]"):
        commit_schedule(16, 17)


def test_temperature_schedules_follow_the_tokens_decoded():
    counts = FOURM_COSINE[196, 8]
    done = np.cumsum(counts)  # 7, 28, 60, 98, 136, 168, 189, 196
    assert temperatures(Decoding(temperature=2.0), counts) == [2.0] * 8
    linear = temperatures(Decoding(temperature=2.0, temperature_schedule="linear"), counts)
    # The full temperature, then 2 * (masked before the step) / 196: 2 * 189/196, 2 * 168/196, ...
    np.testing.assert_allclose(
        linear, [2.0, 2 * 189 / 196, 2 * 168 / 196, 2 * 136 / 196, 1.0, 2 * 60 / 196, 2 * 28 / 196, 2 * 7 / 196]
    )
    onex = temperatures(Decoding(temperature=2.0, temperature_schedule="onex:0.5:0.5"), counts)
    # y_s = x_s^-0.5 over x = linspace(1, 100, 196), scaled to [0, 1] (y_0 = 1, y_195 = 0); read at step s.
    y = [((1 + 99 * s / 195) ** -0.5 - 0.1) / 0.9 for s in range(8)]
    np.testing.assert_allclose(onex, [0.5 + 1.5 * y[s] * (1 - done[s] / 196) for s in range(8)])
    np.testing.assert_allclose(onex[:2], [0.5 + 1.5 * 189 / 196, 1.5205871684685082])  # ml-4m's onex_temp_schedule
    assert onex[-1] == 0.5  # ends at min_t
    per_token = temperatures(Decoding(temperature=1.0, temperature_schedule="linear"), [1] * 4)  # a sequence
    assert per_token == [1.0, 0.75, 0.5, 0.25]


def test_sampling_draws_the_distribution_and_its_filters():
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.5, 0.3, 0.0, 0.2]).log().expand(20_000, 2, 4)  # any leading shape
    ids, probability = sample(logits, 1.0, generator=generator)
    frequency = torch.bincount(ids.flatten(), minlength=4) / ids.numel()
    torch.testing.assert_close(frequency, torch.tensor([0.5, 0.3, 0.0, 0.2]), atol=0.01, rtol=0)  # ~4 sigma
    hot, probability = sample(logits, 0.5, generator=generator)  # temperature 0.5 squares the odds: 25:9:4 of 38
    assert abs((hot == 0).float().mean().item() - 25 / 38) < 0.01
    torch.testing.assert_close(probability[hot == 0], torch.full_like(probability[hot == 0], 25 / 38))
    ids, probability = sample(logits, 1.0, top_p=0.6, generator=generator)
    assert set(ids.unique().tolist()) == {0, 1}  # 0.5 + 0.3 holds 0.6; 0.2 is never drawn
    # The confidence is under the filtered distribution drawn from: 0.5 of the 0.8 kept.
    torch.testing.assert_close(probability[ids == 0], torch.full_like(probability[ids == 0], 0.5 / 0.8))
    assert set(sample(logits, 1.0, top_k=2, generator=generator)[0].unique().tolist()) == {0, 1}
    random = torch.randn(50, 9, generator=generator)
    assert torch.equal(sample(random, 1.0, top_k=1, generator=generator)[0], random.argmax(dim=-1))
    assert torch.equal(sample(random, 0.0)[0], random.argmax(dim=-1))


def test_confidence_is_taken_after_filtering():
    """Position 0 is surer of its argmax (0.6 against 0.5); after top-2 filtering position 1 is
    (0.5 of 0.7 kept, against 0.6 of 1.0), so the filtered ranking commits position 1 first."""
    logits = torch.tensor([[0.6, 0.4, 0.0, 0.0, 0.0, 0.0], [0.5, 0.2, 0.1, 0.1, 0.1, 0.0]]).log()
    _, unfiltered = sample(logits, 0.0)
    ids, filtered = sample(logits, 0.0, top_k=2)
    assert ids.tolist() == [0, 0]
    torch.testing.assert_close(unfiltered, torch.tensor([0.6, 0.5]))
    torch.testing.assert_close(filtered, torch.tensor([0.6, 0.5 / 0.7]))
    assert unfiltered.argmax() == 0 and filtered.argmax() == 1


def test_guidance_weights_each_condition():
    uncond, cond_a, cond_b = torch.randn(3, 2, 5)
    torch.testing.assert_close(guided(uncond, [cond_a], [3.0]), uncond + 3.0 * (cond_a - uncond))
    torch.testing.assert_close(guided(uncond, [cond_a], [1.0]), cond_a)
    # 4M's multi-condition guidance: uncond + sum_i w_i (cond_i - uncond).
    expected = uncond + 3.0 * (cond_a - uncond) + 1.5 * (cond_b - uncond)
    torch.testing.assert_close(guided(uncond, [cond_a, cond_b], [3.0, 1.5]), expected)
    assert not torch.allclose(guided(uncond, [cond_a, cond_b], [3.0, 1.5]), guided(uncond, [cond_a], [3.0]))


# ---------------------------------------------------------------------------------------------
# Maps: MaskGIT and ROAR


@pytest.mark.parametrize(("schedule", "steps"), [("cosine", 5), ("maskgit_cosine", 6)])
def test_maskgit_commits_every_position_once_in_exactly_steps_steps(monkeypatch, schedule, steps):
    model = make_model()
    calls = record(monkeypatch, model)
    decoding = Decoding(steps=steps, schedule=schedule)
    out = Generator(model, INFOS).generate({"rgb": rgb_grids(2)}, [("depth", decoding)])["depth"]
    decodes = [batch for kind, batch in calls if kind == "decode"]
    assert len(decodes) == steps  # one encoder + decoder pass per step for the whole batch, no guidance pass
    counts = commit_schedule(G, steps, schedule)
    for b in range(2):
        assert out[b].shape == (G,) and out[b].dtype == np.uint16 and out[b].max() < 12
        committed: dict[int, int] = {}
        for step, batch in enumerate(decodes):
            masked = targets_of(batch, b)
            # The decoder asks for exactly the positions not yet committed; the encoder sees the
            # committed ones, with the ids they were committed with (never changed afterwards).
            assert masked == set(range(G)) - set(committed)
            assert inputs_of(batch, b, DEPTH) == committed
            assert inputs_of(batch, b, RGB) == dict(enumerate(rgb_grids(2)[b].tolist()))
            final = {p: int(out[b][p]) for p in masked}
            now = masked - targets_of(decodes[step + 1], b) if step + 1 < steps else masked
            assert len(now) == counts[step]
            committed.update({p: final[p] for p in now})
        assert committed == dict(enumerate(out[b].tolist()))


@pytest.mark.parametrize(("schedule", "steps"), [("linear", 6), ("cosine", 8)])
def test_roar_asks_the_decoder_only_for_the_positions_it_commits(monkeypatch, schedule, steps):
    model = make_model()
    calls = record(monkeypatch, model)
    decoding = Decoding(steps=steps, order="roar", schedule=schedule)
    out = Generator(model, INFOS).generate({"rgb": rgb_grids(2)}, [("depth", decoding)])["depth"]
    decodes = [batch for kind, batch in calls if kind == "decode"]
    counts = [count for count in commit_schedule(G, steps, schedule) if count]  # an empty step runs no pass
    assert [batch.target_position.shape[1] for batch in decodes] == counts
    for b in range(2):
        committed: dict[int, int] = {}
        for batch in decodes:
            asked = batch.target_position[b].tolist()
            assert inputs_of(batch, b, DEPTH) == committed  # the encoder sees what earlier steps committed
            assert not set(asked) & set(committed) and len(set(asked)) == len(asked)  # never revisited
            committed.update({p: int(out[b][p]) for p in asked})
        assert committed == dict(enumerate(out[b].tolist()))


@pytest.mark.parametrize("top_k", [0, 3])
def test_maskgit_commits_the_most_confident_positions_first(monkeypatch, top_k):
    """Confident under the distribution drawn from: with top-k, the top-k renormalised one."""
    model = make_model()
    calls = record(monkeypatch, model)
    decoding = Decoding(steps=4, temperature=0, top_k=top_k)
    Generator(model, INFOS).generate({"rgb": rgb_grids(1)}, [("depth", decoding)])
    first, second = [batch for kind, batch in calls if kind == "decode"][:2]
    with torch.no_grad():
        logits = model.head(DEPTH)(model.decode(first, *model.encode(first)))[0]  # (G, V)
    kept = logits.topk(top_k).values if top_k else logits
    probs = kept.max(dim=-1).values.exp() / kept.exp().sum(dim=-1)  # the argmax's probability
    confident = probs.topk(commit_schedule(G, 4)[0]).indices
    assert set(first.target_position[0, confident].tolist()) == targets_of(first, 0) - targets_of(second, 0)


def test_roar_commits_in_an_order_the_seed_draws(monkeypatch):
    """Greedy MaskGIT has nothing left to chance; greedy ROAR still draws which positions go first."""
    model = make_model()
    calls = record(monkeypatch, model)
    generator = Generator(model, INFOS)

    def first_commits(order: str, seed: int) -> set[int]:
        calls.clear()
        generator.generate({"rgb": rgb_grids(1)}, [("depth", Decoding(steps=4, order=order, temperature=0))], seed)
        first, second = [batch for kind, batch in calls if kind == "decode"][:2]
        return targets_of(first, 0) - targets_of(second, 0)

    assert first_commits("maskgit", 0) == first_commits("maskgit", 1)
    assert len({frozenset(first_commits("roar", seed)) for seed in range(4)}) > 1


# ---------------------------------------------------------------------------------------------
# Sequences: autoregressive, on a model whose next token is a function of the previous one


def chain_model(edges: dict[int, dict[int, float]]) -> FourM:
    """A real 4M whose caption decoder picks its next token from the previous one only.

    Each source token's embedding is a large one-hot that swamps the residual stream, so the
    decoder's (normalised) output points along it whatever the conditioning; the text head then
    scores ``next`` by ``edges[previous][next]`` (about 5x that in logits, exp(-50) odds against).
    """
    model = make_model()
    table, head = model.table(CAPTION), model.head(CAPTION)
    with torch.no_grad():
        head.weight.zero_()
        for dim, (previous, nexts) in enumerate(edges.items()):
            table.weight[previous] = 0.0
            table.weight[previous, dim] = 1000.0
            for token, score in nexts.items():
                head.weight[token, dim] = score
    return model


S_0 = SENTINELS[0]


def caption_calls(calls: list[tuple[str, MaskedBatch]]) -> list[MaskedBatch]:
    return [batch for kind, batch in calls if kind == "decode" and (batch.target_modality == CAPTION).all()]


def test_a_sequence_stops_at_eos(monkeypatch):
    model = chain_model({S_0: {A: 10}, A: {B: 10}, B: {C: 10}, C: {EOS: 10}})
    calls = record(monkeypatch, model)
    out = Generator(model, INFOS).generate({"rgb": rgb_grids(3)}, [("caption", Decoding())])["caption"]
    assert [ids.tolist() for ids in out] == [[A, B, C, EOS]] * 3
    decodes = caption_calls(calls)
    assert len(decodes) == 4  # the batch stops once every sample has its EOS
    # Decoder input: the forced S_0 (as 4M's training shows a hidden sequence), then what was sampled
    assert decodes[-1].decoder_input_ids[0].tolist() == [S_0, A, B, C]
    assert decodes[-1].target_position[0].tolist() == [0, 1, 2, 3]
    assert [kind for kind, _ in calls].count("encode") == 1  # the conditioning is encoded once


def test_a_sequence_stops_at_the_cap(monkeypatch):
    model = chain_model({S_0: {A: 10}, A: {A: 10}})  # never ends by itself
    calls = record(monkeypatch, model)
    generator = Generator(model, INFOS)
    capped = generator.generate({"rgb": rgb_grids(2)}, [("caption", Decoding(max_tokens=3))])["caption"]
    assert [ids.tolist() for ids in capped] == [[A, A, EOS]] * 2
    assert len(caption_calls(calls)) == 2
    default = generator.generate({"rgb": rgb_grids(2)}, [("caption", Decoding())])["caption"]
    assert [ids.tolist() for ids in default] == [[A] * 7 + [EOS]] * 2  # the modality's 8 positions, EOS included
    only_eos = generator.generate({"rgb": rgb_grids(1)}, [("caption", Decoding(max_tokens=1))])["caption"]
    assert only_eos[0].tolist() == [EOS]


def test_samples_stop_on_their_own_and_the_batch_when_all_have(monkeypatch):
    model = chain_model({S_0: {EOS: 10, A: 10}, A: {B: 10}, B: {EOS: 10}})  # a coin flip, then A B EOS
    calls = record(monkeypatch, model)
    out = Generator(model, INFOS).generate({"rgb": rgb_grids(16)}, [("caption", Decoding())], seed=0)["caption"]
    results = [ids.tolist() for ids in out]
    assert set(map(tuple, results)) == {(EOS,), (A, B, EOS)}
    assert len(caption_calls(calls)) == 3


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_special_tokens_and_sentinels_are_never_generated(temperature):
    forbidden = {token: 20.0 for token in (PAD, UNK, SOS, *SENTINELS)}
    model = chain_model({S_0: {**forbidden, A: 10}, A: {**forbidden, EOS: 10}})
    out = Generator(model, INFOS).generate({"rgb": rgb_grids(4)}, [("caption", Decoding(temperature=temperature))])[
        "caption"
    ]
    assert [ids.tolist() for ids in out] == [[A, EOS]] * 4


def test_generated_sequences_have_the_store_layout():
    out = Generator(make_model(), INFOS).generate({"rgb": rgb_grids(6)}, [("caption", Decoding())], seed=3)["caption"]
    for ids in out:
        assert ids.dtype == np.uint16 and 1 <= len(ids) <= 8
        assert ids[-1] == EOS and EOS not in ids[:-1]
        assert not set(ids.tolist()) & {PAD, UNK, SOS, *SENTINELS}


# ---------------------------------------------------------------------------------------------
# Sampling options, guidance, seeds


@pytest.mark.parametrize("target", ["caption"])  # maps: filtering makes confidences 1, so the order differs
def test_top_k_1_and_a_tiny_nucleus_equal_greedy(target):
    generator, given = Generator(make_model(), INFOS), {"rgb": rgb_grids(3)}

    def run(**options):
        return [ids.tolist() for ids in generator.generate(given, [(target, Decoding(**options))], seed=5)[target]]

    greedy = run(temperature=0)
    assert run(top_k=1) == greedy
    assert run(top_p=1e-6) == greedy
    assert run() != greedy  # sampling at temperature 1 does differ


@pytest.mark.parametrize("target", ["depth", "caption"])
def test_guidance_runs_an_unconditional_pass_only_when_scaled(monkeypatch, target):
    model = make_model()
    calls = record(monkeypatch, model)
    generator, given = Generator(model, INFOS), {"rgb": rgb_grids(2)}
    plain = generator.generate(given, [(target, Decoding(steps=4, temperature=0))])[target]
    plain_encodes = [batch for kind, batch in calls if kind == "encode"]
    calls.clear()
    scaled = generator.generate(given, [(target, Decoding(steps=4, temperature=0, guidance=3.0))])[target]
    scaled_encodes = [batch for kind, batch in calls if kind == "encode"]
    assert len(scaled_encodes) == 2 * len(plain_encodes)
    assert all(inputs_of(batch, b, RGB) for batch in plain_encodes for b in range(2))
    unconditional = [batch for batch in scaled_encodes if not (batch.input_modality == RGB)[batch.input_mask].any()]
    assert len(unconditional) == len(plain_encodes)  # the same steps without the conditioning
    assert any(not np.array_equal(a, b) for a, b in zip(plain, scaled, strict=True))


@pytest.mark.parametrize("target", ["depth", "caption"])
def test_guidance_by_condition_runs_one_pass_per_condition(monkeypatch, target):
    model = make_model()
    calls = record(monkeypatch, model)
    caption = np.array([A, B, EOS], np.uint16)
    given = {"rgb": rgb_grids(2), "caption": [caption, caption]} if target == "depth" else {"rgb": rgb_grids(2)}
    guidance = {"rgb": 2.0, "caption": 0.5} if target == "depth" else {"rgb": 2.0, "depth": 0.5}
    Generator(model, INFOS).generate(given, [(target, Decoding(steps=2, temperature=0, guidance=guidance))])
    encodes = [batch for kind, batch in calls if kind == "encode"]
    shown = [{m for m in (RGB, CAPTION) if inputs_of(batch, 0, m)} for batch in encodes]
    # unconditional, then each condition alone; depth is no input of the caption: left out, no pass.
    passes = [set(), {RGB}, {CAPTION}] if target == "depth" else [set(), {RGB}]
    assert shown == passes * (2 if target == "depth" else 1)  # maps: each of the 2 steps; sequences: once


@pytest.mark.parametrize("target", ["depth", "caption"])
def test_one_condition_by_name_equals_the_scale(target):
    """With rgb the only input, guiding by rgb alone is guiding by all inputs."""
    generator, given = Generator(make_model(), INFOS), {"rgb": rgb_grids(2)}

    def run(guidance):
        out = generator.generate(given, [(target, Decoding(steps=4, guidance=guidance))], seed=3)
        return [ids.tolist() for ids in out[target]]

    assert run({"rgb": 3.0}) == run(3.0)
    assert run({"rgb": 3.0}) != run(1.0)


def test_the_seed_decides_the_samples():
    generator, given = Generator(make_model(), INFOS), {"rgb": rgb_grids(2)}
    targets = [("depth", Decoding(steps=4)), ("caption", Decoding())]

    def run(seed):
        return {k: [ids.tolist() for ids in v] for k, v in generator.generate(given, targets, seed=seed).items()}

    assert run(7) == run(7)
    assert run(7) != run(8)


# ---------------------------------------------------------------------------------------------
# Conditioning: chaining, samples without a modality


@pytest.mark.parametrize("first", ["depth", "caption"])
def test_each_target_joins_the_conditioning_of_the_next(monkeypatch, first):
    second = {"depth": "caption", "caption": "depth"}[first]
    model = make_model()
    calls = record(monkeypatch, model)
    grids = rgb_grids(2)
    out = Generator(model, INFOS).generate({"rgb": grids}, [(first, Decoding(steps=4)), (second, Decoding(steps=4))])
    last_encode = [batch for kind, batch in calls if kind == "encode"][-1]  # of the second target
    m = MODALITIES[[mod.name for mod in MODALITIES].index(first)]
    for b in range(2):
        shown = out[first][b].tolist()
        # a sequence is shown whole, with its EOS
        assert inputs_of(last_encode, b, MODALITIES.index(m)) == dict(enumerate(shown))
        assert inputs_of(last_encode, b, RGB) == dict(enumerate(grids[b].tolist()))


def test_a_given_sequence_conditions_with_its_eos_and_without_padding(monkeypatch):
    """4M shows a fully visible sequence to the encoder with its EOS (training masks EOS like any token)."""
    model = make_model()
    calls = record(monkeypatch, model)
    caption = np.array([A, B, C, EOS, PAD, PAD], np.uint16)
    Generator(model, INFOS).generate({"caption": [caption]}, [("depth", Decoding(steps=2))])
    assert inputs_of(calls[0][1], 0, CAPTION) == {0: A, 1: B, 2: C, 3: EOS}


def test_samples_lacking_a_modality_generate_as_if_alone(monkeypatch):
    model = make_model()
    generator = Generator(model, INFOS)
    targets = [("depth", Decoding(steps=4, temperature=0)), ("caption", Decoding(temperature=0))]
    grid = rgb_grids(1)[0]
    calls = record(monkeypatch, model)
    batched = generator.generate({"rgb": [grid, None]}, targets)
    first = calls[0][1]
    assert inputs_of(first, 1, RGB) == {} and not first.input_mask[1].any()  # nothing to encode but the context
    alone = [generator.generate({"rgb": [entry]}, targets) for entry in (grid, None)]
    for name in ("depth", "caption"):
        for b in range(2):
            assert batched[name][b].tolist() == alone[b][name][0].tolist()


def test_runs_under_bf16_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = Generator(make_model(), INFOS).generate(
            {"rgb": rgb_grids(2)}, [("depth", Decoding(steps=3, guidance=2.0)), ("caption", Decoding(guidance=2.0))]
        )
    assert all(ids.shape == (G,) and ids.max() < 12 for ids in out["depth"])
    assert all(ids[-1] == EOS for ids in out["caption"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    generator = Generator(make_model().cuda(), INFOS)
    given, targets = {"rgb": rgb_grids(3)}, [("depth", Decoding(steps=4, guidance=2.0)), ("caption", Decoding())]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = generator.generate(given, targets, seed=1)
        again = generator.generate(given, targets, seed=1)
    assert all(ids.shape == (G,) and ids.max() < 12 for ids in out["depth"])
    assert {k: [ids.tolist() for ids in v] for k, v in out.items()} == {
        k: [ids.tolist() for ids in v] for k, v in again.items()
    }


# ---------------------------------------------------------------------------------------------
# In-painting


def test_keep_share_keeps_the_share_drawn_with_the_seed():
    grids = [np.arange(G, dtype=np.uint16) + 1] * 3
    kept = keep_share(grids, 0.5, seed=0)
    assert all((grid != TO_GENERATE).sum() == G // 2 for grid in kept)
    assert all(np.array_equal(grid[grid != TO_GENERATE], grids[0][grid != TO_GENERATE]) for grid in kept)
    assert len({tuple(grid) for grid in kept}) > 1  # each sample its own positions
    assert all(np.array_equal(a, b) for a, b in zip(kept, keep_share(grids, 0.5, seed=0), strict=True))


@pytest.mark.parametrize("order", ["maskgit", "roar"])
def test_in_painting_keeps_the_given_tokens_and_generates_the_rest(monkeypatch, order):
    model = make_model()
    calls = record(monkeypatch, model)
    depth = [np.random.default_rng(b).integers(0, 12, G) for b in range(2)]
    partial = keep_share(depth, 0.5, seed=1)
    decoding = Decoding(steps=4, order=order)
    out = Generator(model, INFOS).generate({"rgb": rgb_grids(2)}, [("depth", decoding)], partial={"depth": partial})[
        "depth"
    ]
    decodes = [batch for kind, batch in calls if kind == "decode"]
    assert len(decodes) == 4
    for b in range(2):
        given = {p: int(i) for p, i in enumerate(partial[b]) if i != TO_GENERATE}
        assert {p: int(out[b][p]) for p in given} == given  # never changed
        assert inputs_of(decodes[0], b, DEPTH) == given  # shown from the first step
        asked = set().union(*(targets_of(batch, b) for batch in decodes))
        assert asked == set(range(G)) - set(given)  # only the rest is generated


@pytest.mark.parametrize(
    ("partial", "message"),
    [
        ({"caption": [np.zeros(8)]}, r"'caption': only a map"),
        ({"rgb": [np.zeros(16)]}, r"\['rgb'\] are not targets"),
        ({"depth": [np.zeros(15)]}, r"needs 1 grids of 16 ids"),
        ({"depth": [np.full(16, 12)]}, r"ids must be -1 or in \[0, 12\)"),
        ({"depth": [np.zeros(16)]}, r"every position is kept"),
        ({"depth": [np.r_[np.zeros(14), -1, -1]]}, r"decoding\.steps: must be in \[1, 2\]"),
    ],
)
def test_bad_partial_targets_give_one_clear_line(partial, message):
    targets = [("depth", Decoding(steps=4)), ("caption", Decoding())]
    with pytest.raises(UserError, match=message):
        Generator(make_model(), INFOS).generate({"rgb": [None]}, targets, partial=partial)


def test_partial_grids_must_keep_as_many_positions_in_every_sample():
    partial = {"depth": [np.r_[np.zeros(8), np.full(8, -1)], np.full(16, -1)]}
    with pytest.raises(UserError, match=r"keep as many positions; got \[0, 8\]"):
        Generator(make_model(), INFOS).generate({"rgb": [None, None]}, [("depth", Decoding())], partial=partial)


# ---------------------------------------------------------------------------------------------
# The generate config


def test_generate_config_reads_guidance_keep_and_schedules():
    config = GenerateConfig(
        guidance={"caption": 3.0, "rgb": 1.5}, keep={"depth": 0.5}, temperature_schedule="onex:0.5:0.5"
    )
    assert GenerateConfig.onex(config.temperature_schedule, "k") == (0.5, 0.5)
    assert GenerateConfig(guidance=2).guidance == 2 and GenerateConfig(schedule="maskgit_cosine")
    for options, key in [
        ({"schedule": "exp"}, "schedule"),
        ({"order": "random"}, "order"),
        ({"temperature_schedule": "onex:0.5"}, "temperature_schedule"),
        ({"temperature_schedule": "onex:0.5:0"}, "temperature_schedule"),
        ({"temperature_schedule": "cosine"}, "temperature_schedule"),
        ({"guidance": -1.0}, "guidance"),
        ({"guidance": {"sound": 1.0}}, "guidance"),
        ({"guidance": {"rgb": "high"}}, "guidance"),
        ({"keep": {"depth": 1.0}}, "keep"),
        ({"keep": {"rgb": 0.5}, "given": ("rgb",)}, "keep"),
    ]:
        with pytest.raises(ConfigError, match=rf"^generate\.{key}: "):
            GenerateConfig(**options)


def test_generate_overrides_set_guidance_per_condition_and_keep():
    from four_m.core.config import load_config

    config = load_config(
        "default", ["generate.guidance.caption=3.0", "generate.guidance.rgb=1.5", "generate.keep.depth=0.5"]
    )
    assert config.generate.guidance == {"caption": 3.0, "rgb": 1.5} and config.generate.keep == {"depth": 0.5}
    assert load_config("default", ["generate.guidance=2.5"]).generate.guidance == 2.5


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("given", "targets", "message"),
    [
        ({"rgb": [None]}, [("sound", Decoding())], r"unknown 'sound'; this model knows rgb, depth, caption"),
        ({"sound": [None]}, [("depth", Decoding())], r"unknown 'sound'"),
        ({"rgb": [None]}, [("rgb", Decoding())], r"'rgb' is also given"),
        ({"rgb": [None]}, [("depth", Decoding()), ("depth", Decoding())], r"'depth' is repeated"),
        ({"rgb": [None]}, [], r"at least one modality to generate"),
        ({"rgb": []}, [("depth", Decoding())], r"empty batch"),
        ({}, [("depth", Decoding())], r"given: needs at least one modality"),
        ({"rgb": [None, None], "caption": [None]}, [("depth", Decoding())], r"one entry per sample.*'rgb': 2"),
        ({"rgb": [np.zeros(15)]}, [("depth", Decoding())], r"given 'rgb', sample 0: .*15 tokens, expected .* 16"),
        ({"rgb": [None, np.full(16, 16)]}, [("depth", Decoding())], r"sample 1: ids 16\.\.16 are outside .* 16 ids"),
        ({"caption": [np.array([40, EOS])]}, [("depth", Decoding())], r"'caption', sample 0: ids 3\.\.40 are outside"),
        ({"caption": [np.full(9, A)]}, [("depth", Decoding())], r"9 tokens, more than the cap of 8"),
        ({"rgb": [None]}, [("depth", Decoding(steps=17))], r"decoding\.steps: must be in \[1, 16\]"),
        ({"rgb": [None]}, [("depth", {"steps": 2})], r"'depth' needs a Decoding"),
    ],
)
def test_bad_inputs_give_one_clear_line(given, targets, message):
    with pytest.raises(UserError, match=message) as error:
        Generator(make_model(), INFOS).generate(given, targets)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"steps": 0}, "decoding.steps"),
        ({"order": "random"}, "decoding.order"),
        ({"schedule": "exp"}, "decoding.schedule"),
        ({"temperature": -1.0}, "decoding.temperature"),
        ({"temperature_schedule": "step"}, "decoding.temperature_schedule"),
        ({"top_k": -1}, "decoding.top_k"),
        ({"top_p": 0.0}, "decoding.top_p"),
        ({"top_p": 1.5}, "decoding.top_p"),
        ({"guidance": -0.5}, "decoding.guidance"),
        ({"max_tokens": 0}, "decoding.max_tokens"),
    ],
)
def test_decoding_errors_name_the_field(options, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        Decoding(**options)


def test_infos_must_match_the_model():
    model = make_model()
    with pytest.raises(ConfigError, match=r"generate\.infos: must describe the model's modalities"):
        Generator(model, INFOS[:2])
    with pytest.raises(ConfigError, match=r"generate\.infos\.caption: S_0 id 40 is outside the vocabulary of 32"):
        Generator(model, (*INFOS[:2], ModalityInfo("caption", "sequence", 8, first_sentinel_id=40)))
