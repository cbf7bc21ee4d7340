"""RGB as pixels (4M's ``rgb@224``): an input-only modality of patches, read from ``images/`` beside the
tokens, masked like a map's input, embedded by a linear patch projection, and never a target."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from four_m.core.config import ConfigError, MaskingConfig
from four_m.core.failures import SUCCESS
from four_m.core.modalities import IMAGENET_MEAN, IMAGENET_STD, MODALITIES, pixel_inputs
from four_m.core.views import label_view
from four_m.train.data import TokenShards, TokenStoreError
from four_m.train.generate import Decoding, GenerationError, Generator
from four_m.train.masking import Masker, ModalityInfo, modality_infos
from four_m.train.model import FourM, ModelConfig, ModelModality

GRID, PATCH = 16, 8  # a 4 x 4 grid of 8 px patches: 32 px images
SIDE = 4 * PATCH
TOKENS = (
    ModalityInfo("rgb", "map", GRID),
    ModalityInfo("depth", "map", GRID),
    ModalityInfo("caption", "sequence", 12, num_sentinels=4),
)
PIXELS = ModalityInfo("rgb_pixels", "pixels", GRID, image_size=SIDE)
WITH_PIXELS = (TOKENS[0], PIXELS, *TOKENS[1:])
TINY = ModelConfig(dim=32, encoder_layers=2, decoder_layers=2, heads=4)

pytestmark = pytest.mark.usefixtures("one_thread")


def sample(rng: np.random.Generator, infos=WITH_PIXELS) -> dict[str, np.ndarray]:
    out = {}
    for info in infos:
        if info.layout == "pixels":
            out[info.name] = rng.integers(0, 256, (SIDE, SIDE, 3)).astype(np.uint8)
        elif info.layout == "map":
            out[info.name] = rng.integers(0, 16, GRID).astype(np.uint16)
        else:
            out[info.name] = np.array([*rng.integers(8, 20, 5), info.eos_id], np.uint16)
    return out


def model_modalities(infos) -> list[ModelModality]:
    out = []
    for info in infos:
        if info.layout == "pixels":
            out.append(ModelModality(info.name, "pixels", 0, GRID, "", PATCH, IMAGENET_MEAN, IMAGENET_STD))
        else:
            out.append(ModelModality(info.name, info.layout, 20 if info.layout == "sequence" else 16, info.num_tokens))
    return out


def inputs_of(batch, m: int) -> list[set[int]]:
    """Per sample, the positions of modality ``m`` among its real inputs."""
    here = (batch.input_modality == m) & batch.input_mask
    return [set(batch.input_position[b][here[b]].tolist()) for b in range(here.shape[0])]


# --- the registry ---------------------------------------------------------------------------


def test_rgb_declares_4ms_pixel_input_and_runs_include_it_by_default():
    image = pixel_inputs()["rgb_pixels"]
    assert image.name == "rgb" and image.pixel_input.patch_size == 16 and image.pixel_side == 224
    (info,) = modality_infos(["rgb_pixels"])
    assert (info.layout, info.num_tokens, info.image_size) == ("pixels", 196, 224)
    assert "rgb_pixels" not in MODALITIES  # no tokenizer, no labeler, no folder of its own


# --- masking --------------------------------------------------------------------------------


def test_rgb2all_shows_the_pixels_alone_and_asks_for_everything_else_rgb_tokens_included():
    masker = Masker(WITH_PIXELS, MaskingConfig(input_budget=10, target_budget=30, mixtures=("rgb2all",)))
    rng = np.random.default_rng(0)
    rgb_targeted = 0
    for seed in range(50):
        out = masker(sample(rng), masker.sample_rng(seed))
        assert set(out.input_modality.tolist()) == {1}  # the pixels only
        assert len(out.input_ids) == 10 and (out.input_ids == 0).all()  # patches carry no id
        assert 1 not in out.target_modality.tolist()
        rgb_targeted += 0 in out.target_modality.tolist()
        assert np.array_equal(out.pixels["rgb_pixels"].shape, (SIDE, SIDE, 3))
    assert rgb_targeted == 50


def test_all2all_may_show_pixels_but_never_targets_them_and_carries_images_only_when_shown():
    masker = Masker(WITH_PIXELS, MaskingConfig(input_budget=8, target_budget=8, alpha=0.3))
    rng = np.random.default_rng(1)
    shown = 0
    for seed in range(200):
        out = masker(sample(rng), masker.sample_rng(seed))
        assert 1 not in out.target_modality.tolist()
        as_input = 1 in out.input_modality.tolist()
        assert as_input == ("rgb_pixels" in out.pixels)
        shown += as_input
    assert 0 < shown < 200
    batch = masker.collate([masker(sample(rng), masker.sample_rng(s)) for s in range(3)])
    assert batch.pixels["rgb_pixels"].shape == (3, SIDE, SIDE, 3) and batch.pixels["rgb_pixels"].dtype == torch.uint8


def test_a_mixture_that_targets_pixels_stops_naming_them():
    cfg = MaskingConfig(
        mixtures=("mine",), input_alphas={"mine": {"rgb": 1.0}}, target_alphas={"mine": {"rgb_pixels": 0.5}}
    )
    with pytest.raises(ConfigError, match=r"target_alphas.mine: \['rgb_pixels'\] are pixel inputs"):
        Masker(WITH_PIXELS, cfg)
    with pytest.raises(ConfigError, match="max_target_tokens"):
        Masker(WITH_PIXELS, MaskingConfig(max_target_tokens={"rgb_pixels": 3}))


def test_a_pixel_input_of_the_wrong_shape_is_refused():
    masker = Masker(WITH_PIXELS)
    bad = sample(np.random.default_rng(2)) | {"rgb_pixels": np.zeros((SIDE, SIDE), np.uint8)}
    with pytest.raises(ValueError, match="rgb_pixels: expected a uint8 image of shape"):
        masker(bad, masker.sample_rng(0))


# --- the model ------------------------------------------------------------------------------


def test_patches_are_embedded_row_major_as_4m_flattens_them():
    torch.manual_seed(0)
    model = FourM(TINY, model_modalities(WITH_PIXELS))
    images = torch.randint(0, 256, (2, SIDE, SIDE, 3), dtype=torch.uint8)
    embedded = model.embed_patches("rgb_pixels", images)  # (2, 16, D)
    standard = (images.float() / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    row, col = 2, 3  # patch 11: pixels [16:24, 24:32], flattened rows, columns, channels
    patch = standard[:, row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH].reshape(2, -1)
    expected = patch @ model.patch_embeddings["rgb_pixels"].weight.T
    torch.testing.assert_close(embedded[:, row * 4 + col], expected)


@pytest.mark.parametrize("infos", [WITH_PIXELS, TOKENS], ids=["pixel input on", "pixel input off"])
def test_nothing_outside_a_samples_inputs_reaches_the_model(infos):
    """Tokens of map positions and pixels of patches that are not inputs change, the logits do not;
    an input patch or token that changes does change them (the test can fail)."""
    torch.manual_seed(0)
    model = FourM(TINY, model_modalities(infos)).eval()
    masker = Masker(infos, MaskingConfig(input_budget=10, target_budget=12, alpha=1.0))
    rng = np.random.default_rng(3)
    samples = [sample(rng, infos) for _ in range(4)]
    batch = masker.collate([masker(s, masker.sample_rng(i)) for i, s in enumerate(samples)])
    names = [m.name for m in infos]
    changed_samples, input_changed = [], []
    for b, s in enumerate(samples):
        other = {k: v.copy() for k, v in s.items()}
        for m, info in enumerate(infos):
            hidden = sorted(set(range(GRID)) - inputs_of(batch, m)[b])
            if info.layout == "map":
                other[info.name][hidden] = (other[info.name][hidden] + 1) % 16
            elif info.layout == "pixels":
                for p in hidden:
                    r, c = divmod(p, 4)
                    other[info.name][r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] ^= 0x5A
        changed_samples.append(other)
    again = masker.collate([masker(s, masker.sample_rng(i)) for i, s in enumerate(changed_samples)])
    with torch.no_grad():
        before, after = model(batch), model(again)
    assert before.keys() == after.keys()
    for m in before:
        torch.testing.assert_close(before[m], after[m], rtol=0, atol=0)
    # One real input changed: now the logits move.
    grid_input = next(m for m, info in enumerate(infos) if info.layout != "sequence" and inputs_of(batch, m)[0])
    position = min(inputs_of(batch, grid_input)[0])
    name = names[grid_input]
    if infos[grid_input].layout == "pixels":
        r, c = divmod(position, 4)
        changed_samples[0][name][r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] ^= 0x5A
    else:
        changed_samples[0][name][position] = (changed_samples[0][name][position] + 1) % 16
    input_changed = masker.collate([masker(s, masker.sample_rng(i)) for i, s in enumerate(changed_samples)])
    with torch.no_grad():
        moved = model(input_changed)
    assert any(not torch.equal(before[m], moved[m]) for m in before)


def test_a_pixel_input_model_trains_without_any_pixel_input_in_a_batch():
    torch.manual_seed(0)
    model = FourM(TINY, model_modalities(WITH_PIXELS))
    masker = Masker(WITH_PIXELS, MaskingConfig(input_budget=8, target_budget=8))
    rng = np.random.default_rng(4)
    no_pixels = [{k: v for k, v in sample(rng).items() if k != "rgb_pixels"} for _ in range(3)]
    batch = masker.collate([masker(s, masker.sample_rng(i)) for i, s in enumerate(no_pixels)])
    assert not batch.pixels["rgb_pixels"].any()
    loss, _ = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and model.patch_embeddings["rgb_pixels"].weight.grad is None


# --- generation -----------------------------------------------------------------------------


def test_generation_conditions_on_pixels_and_refuses_to_generate_them():
    torch.manual_seed(0)
    infos = WITH_PIXELS
    model = FourM(TINY, model_modalities(infos))
    generator = Generator(model, infos)
    images = [np.random.default_rng(i).integers(0, 256, (SIDE, SIDE, 3)).astype(np.uint8) for i in range(2)]
    out = generator.generate({"rgb_pixels": images}, [("rgb", Decoding(steps=4)), ("caption", Decoding())])
    assert [grid.shape for grid in out["rgb"]] == [(GRID,), (GRID,)] and len(out["caption"]) == 2
    # Every pass shows the whole image: each patch once, the images as given.
    seen = []
    encode = model.encode
    model.encode = lambda batch: seen.append(batch) or encode(batch)
    generator.generate({"rgb_pixels": images}, [("depth", Decoding(steps=2))])
    assert seen
    for batch in seen:
        patches = (batch.input_modality == 1) & batch.input_mask
        assert [sorted(batch.input_position[b][patches[b]].tolist()) for b in range(2)] == [list(range(GRID))] * 2
        assert np.array_equal(batch.pixels["rgb_pixels"].numpy(), np.stack(images))
    with pytest.raises(GenerationError, match="rgb_pixels' is a pixel input"):
        generator.generate({"rgb": [np.zeros(GRID, np.uint16)]}, [("rgb_pixels", Decoding())])
    with pytest.raises(GenerationError, match="uint8 image of shape"):
        generator.generate({"rgb_pixels": [np.zeros((SIDE, SIDE, 3), np.float32)]}, [("rgb", Decoding(steps=4))])


# --- reading images/ beside the tokens -------------------------------------------------------


def _jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
    ok, data = cv2.imencode(".jpg", rng.integers(0, 256, (height, width, 3)).astype(np.uint8))
    assert ok
    return data.tobytes()


def _write_root(root: Path) -> dict[str, bytes | None]:
    """One shard: images/ with a good, a failed and an undecodable row, and depth tokens row for row."""
    from four_m.tokenize.store import token_schema, token_table, write_tokens

    rng = np.random.default_rng(5)
    keys = ["00000_0000", "00000_0001", "00000_0002", "00000_0003"]
    jpgs = [_jpeg(rng, 300, 200), None, b"\xff\xd8 not a jpeg", _jpeg(rng, 120, 160)]
    statuses = [SUCCESS, "failed_to_download", SUCCESS, SUCCESS]
    (root / "images").mkdir(parents=True)
    table = pa.table({"key": keys, "status": statuses, "jpg": pa.array(jpgs, pa.binary())})
    pq.write_table(table, root / "images/00000.parquet", row_group_size=3)
    meta = {"modality": "depth", "vocab_size": "64", "max_tokens": "196", "tokenizer": "depth-abc"}
    ids = [np.full(196, i, np.uint16) for i in range(4)]
    write_tokens(root / "tokens/depth/00000.parquet", token_table(keys, ids, [None] * 4, token_schema(196, meta)), 2)
    return dict(zip(keys, jpgs, strict=True))


def test_pixels_are_read_from_images_as_the_label_view_beside_the_tokens(tmp_path):
    jpgs = _write_root(tmp_path)
    shards = TokenShards(tmp_path, ["depth", "rgb_pixels"])
    rows = [(key, shards.view(s, 0)) for key, s in shards.read(shards.shards[0])]
    assert [key for key, _ in rows] == list(jpgs)
    pixels = {key: s["rgb_pixels"] for key, s in rows}
    assert np.array_equal(pixels["00000_0000"], label_view(jpgs["00000_0000"], 224))
    assert pixels["00000_0003"].shape == (224, 224, 3)
    assert pixels["00000_0001"] is None  # the download failed: no pixels, the row still has depth
    assert pixels["00000_0002"] is None and shards.undecodable_images == 1  # counted, not dropped
    assert all(s["depth"] is not None for _, s in rows)


def test_a_store_without_images_names_the_pixel_input_to_leave_out(tmp_path):
    _write_root(tmp_path)
    (tmp_path / "images/00000.parquet").unlink()
    with pytest.raises(TokenStoreError, match="leave rgb_pixels out of train.modalities"):
        TokenShards(tmp_path, ["depth", "rgb_pixels"])
    assert len(TokenShards(tmp_path, ["depth"]).shards) == 1  # the token store alone still trains
