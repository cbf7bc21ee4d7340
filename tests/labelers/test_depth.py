from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from four_m.core.config import LabelerConfig
from four_m.core.label_codec import decode_png
from four_m.labelers.depth import DepthLabeler
from four_m.labelers.pretrained import MissingWeightsError

INPUT, VIEW = 64, 48  # the view is smaller than the input here: maps are resized, inputs are not


def _reference(labeler: DepthLabeler, pixels: np.ndarray) -> np.ndarray:
    """The model's disparity at the view's size, normalised by hand (DPT: mean = std = 0.5)."""
    values = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    with torch.inference_mode():
        disparity = labeler.model(pixel_values=values).predicted_depth
    return F.interpolate(disparity[:, None], size=(VIEW, VIEW), mode="bilinear")[:, 0].numpy()


def test_depth_maps_decode_to_the_models_disparity(built):
    labeler, production, pixels, payloads = built(DepthLabeler, INPUT, VIEW)
    reference = _reference(production, pixels)
    for payload, expected in zip(payloads, reference, strict=True):
        codes = decode_png(payload["depth"])
        assert codes.dtype == np.uint16 and codes.shape == (VIEW, VIEW)
        low, high = payload["depth_min"], payload["depth_max"]
        assert np.isfinite([low, high]).all() and low <= high
        depth = low + codes / 65535 * (high - low)
        np.testing.assert_allclose(depth, expected, rtol=0, atol=(high - low) / 65535 + 1e-12)
        np.testing.assert_allclose([low, high], [expected.min(), expected.max()], rtol=1e-6)
    for payload in payloads[:3]:  # random images: a real range, spread over all 16 bits
        codes = decode_png(payload["depth"])
        assert payload["depth_max"] > payload["depth_min"]
        assert codes.min() == 0 and codes.max() == 65535
    assert "disparity" in labeler.provenance()["depth_kind"]


def test_a_constant_map_stores_zeros(built):
    labeler, _, pixels, _ = built(DepthLabeler, INPUT, VIEW)
    # At the view's size already, so no resize adds float noise to the constant.
    labeler.forward = lambda batch: SimpleNamespace(predicted_depth=torch.full((len(batch), VIEW, VIEW), 2.5))
    for payload in labeler.label(pixels):
        assert payload["depth_min"] == payload["depth_max"] == 2.5
        assert not decode_png(payload["depth"]).any()


def test_missing_weights_name_the_path(missing_weights):
    missing_weights(DepthLabeler)


def test_a_local_folder_loads_from_safetensors_only(tmp_path):
    """A ``.bin`` is a pickle: the tiny folder in a root, its weights swapped for one, is refused."""
    folder = tmp_path / "depth"
    DepthLabeler(LabelerConfig(input_size=INPUT), VIEW, folder).setup()
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    for cfg, workdir in ((LabelerConfig(input_size=INPUT), folder), (LabelerConfig(model=str(folder)), None)):
        with pytest.raises(MissingWeightsError, match="model.safetensors"):
            DepthLabeler(cfg, VIEW, workdir).setup()


@pytest.mark.parametrize(("precision", "dtype"), [("auto", None), ("32", None), ("bf16", torch.bfloat16)])
def test_precision_selects_autocast_from_config_and_keeps_the_schema(built, precision, dtype):
    """On a CPU ``auto`` is full fp32; ``bf16`` forces autocast (as a GPU's ``auto`` would): the labels
    keep their schema and stay within bf16's rounding of the fp32 ones."""
    _, production, pixels, payloads = built(DepthLabeler, INPUT, VIEW)
    labeler = DepthLabeler(LabelerConfig(model=production.cfg.model, input_size=INPUT, precision=precision), VIEW)
    labeler.setup()
    assert labeler.autocast_dtype() == dtype
    seen = []
    label = labeler.label
    labeler.label = lambda p: seen.append(torch.is_autocast_enabled("cpu")) or label(p)
    out = labeler.labelled(pixels)
    assert seen == [dtype is not None]
    assert [{k: type(v) for k, v in p.items()} for p in out] == [{k: type(v) for k, v in p.items()} for p in payloads]
    for mixed, full in zip(out, payloads, strict=True):
        span = full["depth_max"] - full["depth_min"]
        assert abs(mixed["depth_min"] - full["depth_min"]) <= 0.05 * span + 1e-6
        if dtype is None:
            assert mixed == full
        else:
            codes, reference = decode_png(mixed["depth"]).astype(float), decode_png(full["depth"]).astype(float)
            assert np.abs(codes - reference).mean() < 0.05 * 65535
