from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from four_m.core.config import LabelerConfig
from four_m.core.errors import UserError
from four_m.core.label_codec import decode_png
from four_m.labelers.base import LabelBatch
from four_m.labelers.depth import DepthLabeler
from four_m.labelers.pretrained import MissingWeightsError
from four_m.modalities.depth import DepthConfig

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
    out = labeler.labelled(LabelBatch(pixels))
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


def test_depth_anything_v2_is_an_option_built_and_loaded_the_production_way(tmp_path, batch):
    """``architecture: depth_anything`` builds a tiny Depth Anything V2 offline and loads any such
    checkpoint through the auto class; a checkpoint of the other architecture stops naming both."""
    size = 112  # a multiple of Depth Anything's 14 px patches and of the tiny DPT's 16
    folder = tmp_path / "tiny-depth-anything"
    tiny = DepthLabeler(DepthConfig(model=None, input_size=size, architecture="depth_anything"), VIEW, folder)
    tiny.setup()
    assert type(tiny.model).__name__ == "DepthAnythingForDepthEstimation"
    production = DepthLabeler(DepthConfig(model=str(folder), input_size=size, architecture="depth_anything"), VIEW)
    production.setup()
    pixels = batch(size)
    payloads = production.labelled(LabelBatch(pixels))
    assert payloads == tiny.labelled(LabelBatch(pixels))
    codes = decode_png(payloads[0]["depth"])
    assert codes.dtype == np.uint16 and codes.shape == (VIEW, VIEW) and codes.max() == 65535
    assert production.provenance()["architecture"] == "depth_anything"
    dpt = tmp_path / "tiny-dpt"
    DepthLabeler(DepthConfig(model=None, input_size=size), VIEW, dpt).setup()
    with pytest.raises(UserError, match="is a dpt model, but label.depth.architecture is depth_anything"):
        DepthLabeler(DepthConfig(model=str(dpt), input_size=size, architecture="depth_anything"), VIEW).setup()


def test_the_new_architecture_field_leaves_existing_depth_config_hashes_alone():
    """Shards labelled before ``architecture`` existed keep their hash: it enters only when set."""
    from four_m.core.config import shaping_hash

    assert shaping_hash(224, DepthConfig()) == shaping_hash(224, LabelerConfig(input_size=384))
    assert shaping_hash(224, DepthConfig(architecture="depth_anything")) != shaping_hash(224, DepthConfig())
