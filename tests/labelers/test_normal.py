import numpy as np
import torch
import torch.nn.functional as F

from four_m.core.label_codec import decode_png
from four_m.labelers.normal import NormalLabeler, unit_length

INPUT, VIEW = 64, 80  # the view is larger than the input here: normals are upsampled, then renormalised


def _decoded(payload: dict) -> np.ndarray:
    codes = decode_png(payload["normal"])
    assert codes.dtype == np.uint8 and codes.shape == (VIEW, VIEW, 3)
    return codes / 255 * 2 - 1  # (V, V, 3)


def _reference(labeler: NormalLabeler, pixels: np.ndarray) -> np.ndarray:
    """The head's vectors as unit normals at the view's size, normalised by hand (mean = std = 0.5)."""
    values = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    with torch.inference_mode():
        logits = labeler.model(pixel_values=values).logits.double()
    vectors = logits / logits.norm(dim=1, keepdim=True)
    vectors = F.interpolate(vectors, size=(VIEW, VIEW), mode="bilinear")
    return (vectors / vectors.norm(dim=1, keepdim=True)).permute(0, 2, 3, 1).numpy()  # (B, V, V, 3)


def test_normals_are_unit_vectors_in_the_models_directions(built):
    labeler, production, pixels, payloads = built(NormalLabeler, INPUT, VIEW)
    reference = _reference(production, pixels)
    for payload, expected in zip(payloads, reference, strict=True):
        normals = _decoded(payload)
        np.testing.assert_allclose(np.linalg.norm(normals, axis=-1), 1.0, atol=0.01)
        # Channel order too: x, y, z must come back as R, G, B (OpenCV writes BGR).
        np.testing.assert_allclose(normals, expected, atol=1.01 / 255)
    provenance = labeler.provenance()
    assert provenance["normal_source"] == "learned (DPT dense head)"
    assert "v / 255 * 2 - 1" in provenance["normal_encoding"]


def test_unit_length_keeps_tiny_vectors_and_zero_vectors_finite():
    vectors = torch.zeros(1, 3, 2, 1)
    vectors[0, :, 0, 0] = torch.tensor([3e-9, 0.0, -4e-9])  # a random-init head's scale
    unit = unit_length(vectors)
    assert torch.isfinite(unit).all()
    torch.testing.assert_close(unit[0, :, 0, 0], torch.tensor([0.6, 0.0, -0.8]))
    assert not unit[0, :, 1, 0].any()


def test_missing_weights_name_the_path(missing_weights):
    missing_weights(NormalLabeler)
