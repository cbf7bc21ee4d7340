import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from four_m.core.config import LabelerConfig
from four_m.labelers.clip import ClipLabeler

INPUT, VIEW, GRID, DIM = 224, 32, 14, 512  # 4M's CLIP-B/16 map at 224 px: 14 x 14 x 512


def _reference(labeler: ClipLabeler, pixels: np.ndarray) -> np.ndarray:
    """Projected patch tokens in float32, normalised by hand with CLIP's mean and std."""
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    values = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std
    model = labeler.model
    with torch.inference_mode():
        tokens = model.vision_model(pixel_values=values).last_hidden_state[:, 1:]  # (B, N, hidden), CLS dropped
        features = model.visual_projection(model.vision_model.post_layernorm(tokens))  # (B, N, D)
    return features.flatten(1).numpy()


def test_features_are_the_projected_patch_tokens(built):
    labeler, production, pixels, payloads = built(ClipLabeler, INPUT, VIEW)
    assert labeler.schema().field("clip").type == pa.list_(pa.float16(), GRID * GRID * DIM)
    assert labeler.provenance()["feature_shape"] == f"{GRID}x{GRID}x{DIM}"  # the key feature-map readers use
    reference = _reference(production, pixels)
    rows = np.stack([payload["clip"] for payload in payloads])
    assert rows.dtype == np.float16 and rows.shape == (len(pixels), GRID * GRID * DIM)
    assert np.isfinite(rows).all()
    np.testing.assert_allclose(rows.astype(np.float32), reference, rtol=2e-3, atol=2e-3)
    assert not np.array_equal(rows[0], rows[3])  # the features depend on the image


def test_another_input_size_interpolates_the_position_embeddings(built):
    labeler = built(ClipLabeler, INPUT, VIEW).random_init
    smaller = ClipLabeler(LabelerConfig(model=str(labeler.workdir), input_size=160), VIEW, None)
    smaller.setup()
    pixels = np.random.default_rng(1).integers(0, 256, size=(2, 160, 160, 3), dtype=np.uint8)
    payloads = smaller.label(pixels)
    pa.Table.from_pylist(payloads, schema=smaller.schema())
    assert smaller.schema().field("clip").type.list_size == 10 * 10 * DIM  # a 10 x 10 grid at 160 px
    assert all(p["clip"].shape == (10 * 10 * DIM,) and np.isfinite(p["clip"]).all() for p in payloads)


def test_missing_weights_name_the_path(missing_weights):
    missing_weights(ClipLabeler)


def test_the_image_embedding_and_its_similarity_to_the_caption_are_clips_own(built):
    """What curation reads: the unit image embedding and its cosine with the caption's embedding,
    as CLIP's own ``get_image_features`` and ``get_text_features`` give them; none without a caption."""
    from four_m.labelers.base import LabelBatch

    labeler = built(ClipLabeler, INPUT, VIEW).random_init
    pixels = np.random.default_rng(2).integers(0, 256, size=(2, INPUT, INPUT, 3), dtype=np.uint8)
    captions = ["a cat on a mat", None]
    batch = LabelBatch(pixels=pixels, keys=["a", "b"], alt_texts=captions, original_sizes=[None, None], labels={})
    payloads = labeler.labelled(batch)
    assert labeler.schema().field("clip_embedding").type == pa.list_(pa.float16(), DIM)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    values = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.inference_mode():
        image = labeler.model.get_image_features(pixel_values=values)
        text = labeler.model.get_text_features(**labeler.tokenizer([captions[0]], return_tensors="pt"))
    image = getattr(image, "pooler_output", image)
    text = getattr(text, "pooler_output", text)
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    for payload, expected in zip(payloads, image.numpy(), strict=True):
        np.testing.assert_allclose(payload["clip_embedding"].astype(np.float32), expected, atol=2e-3)
    assert payloads[0]["caption_similarity"] == pytest.approx(float(image[0] @ text[0]), abs=1e-4)
    assert payloads[1]["caption_similarity"] is None
    alone = labeler.labelled(LabelBatch(pixels=pixels))  # no url-list row: no similarity, same embedding
    assert [p["caption_similarity"] for p in alone] == [None, None]
    np.testing.assert_array_equal(alone[0]["clip_embedding"], payloads[0]["clip_embedding"])
