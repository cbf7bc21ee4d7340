"""Omnidata's normal and depth checkpoints converted to the folders the normal and depth labelers
load: synthetic checkpoints with Omnidata's (MiDaS, timm) weight names and shapes, at a tiny size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from four_m.core.config import LabelerConfig
from four_m.core.label_codec import decode_png
from four_m.labelers.base import LabelBatch
from four_m.labelers.depth import DepthLabeler
from four_m.labelers.normal import NormalLabeler
from four_m.labelers.omnidata import OmnidataConversionError, convert_checkpoint, omnidata_config

D, LAYERS, MLP = 32, 4, 64  # ViT width, depth, MLP width
STEM, STAGES = 16, (32, 64, 64)  # BiT stem and stage widths (bottlenecks a quarter as wide)
NECK, FUSION, SIZE = (32, 64, 32, 32), 32, 64
SIZES = {
    "image_size": SIZE,
    "hidden_size": D,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 2,
    "intermediate_size": MLP,
    "backbone_out_indices": [0, 1, 2, 3],
    "backbone_featmap_shape": [1, STAGES[-1], SIZE // 16, SIZE // 16],
    "neck_hidden_sizes": list(NECK),
    "fusion_hidden_size": FUSION,
}
BACKBONE = {"depths": [1, 1, 1], "hidden_sizes": list(STAGES), "embedding_size": STEM, "num_groups": 8}
CONFIG = omnidata_config(SIZES, BACKBONE)


def omnidata_state(generator: torch.Generator, outputs: int = 3) -> dict[str, torch.Tensor]:
    """Every weight of Omnidata's DPT-Hybrid normal (3 outputs) or depth (1) model at the tiny size,
    under its own names: timm's ViT-ResNet hybrid under ``pretrained.model``, MiDaS's readout and
    resize convolutions under ``pretrained.act_postprocess*``, its neck and head under ``scratch``;
    as Lightning saves it."""
    shapes: dict[str, tuple[int, ...]] = {}
    vit, grid = "pretrained.model", (SIZE // 16) ** 2
    shapes |= {f"{vit}.cls_token": (1, 1, D), f"{vit}.pos_embed": (1, 1 + grid, D)}
    stem = f"{vit}.patch_embed.backbone.stem"
    shapes |= {f"{stem}.conv.weight": (STEM, 3, 7, 7), f"{stem}.norm.weight": (STEM,), f"{stem}.norm.bias": (STEM,)}
    width = STEM
    for s, out in enumerate(STAGES):
        block, mid = f"{vit}.patch_embed.backbone.stages.{s}.blocks.0", out // 4
        convs = {"conv1": (mid, width, 1, 1), "conv2": (mid, mid, 3, 3), "conv3": (out, mid, 1, 1)}
        for i, (conv, shape) in enumerate(convs.items(), start=1):
            shapes |= {
                f"{block}.{conv}.weight": shape,
                f"{block}.norm{i}.weight": shape[:1],
                f"{block}.norm{i}.bias": shape[:1],
            }
        shapes |= {f"{block}.downsample.conv.weight": (out, width, 1, 1)}
        shapes |= {f"{block}.downsample.norm.weight": (out,), f"{block}.downsample.norm.bias": (out,)}
        width = out
    shapes |= {f"{vit}.patch_embed.proj.weight": (D, width, 1, 1), f"{vit}.patch_embed.proj.bias": (D,)}
    for i in range(LAYERS):
        block = f"{vit}.blocks.{i}"
        for name, shape in (
            ("attn.qkv", (3 * D, D)),
            ("attn.proj", (D, D)),
            ("mlp.fc1", (MLP, D)),
            ("mlp.fc2", (D, MLP)),
        ):
            shapes |= {f"{block}.{name}.weight": shape, f"{block}.{name}.bias": shape[:1]}
        for norm in ("norm1", "norm2"):
            shapes |= {f"{block}.{norm}.weight": (D,), f"{block}.{norm}.bias": (D,)}
    shapes |= {
        f"{vit}.norm.weight": (D,),
        f"{vit}.norm.bias": (D,),
        f"{vit}.head.weight": (10, D),
        f"{vit}.head.bias": (10,),
    }
    for n, neck in ((3, NECK[2]), (4, NECK[3])):
        post = f"pretrained.act_postprocess{n}"
        shapes |= {f"{post}.0.project.0.weight": (D, 2 * D), f"{post}.0.project.0.bias": (D,)}
        shapes |= {f"{post}.3.weight": (neck, D, 1, 1), f"{post}.3.bias": (neck,)}
    shapes |= {
        "pretrained.act_postprocess4.4.weight": (NECK[3], NECK[3], 3, 3),
        "pretrained.act_postprocess4.4.bias": (NECK[3],),
    }
    for n in range(1, 5):
        shapes[f"scratch.layer{n}_rn.weight"] = (FUSION, NECK[n - 1], 3, 3)
        fusion = f"scratch.refinenet{n}"
        shapes |= {f"{fusion}.out_conv.weight": (FUSION, FUSION, 1, 1), f"{fusion}.out_conv.bias": (FUSION,)}
        for unit in (1, 2):
            for conv in (1, 2):
                name = f"{fusion}.resConfUnit{unit}.conv{conv}"
                shapes |= {f"{name}.weight": (FUSION, FUSION, 3, 3), f"{name}.bias": (FUSION,)}
    head = "scratch.output_conv"
    shapes |= {f"{head}.0.weight": (FUSION // 2, FUSION, 3, 3), f"{head}.0.bias": (FUSION // 2,)}
    shapes |= {f"{head}.2.weight": (32, FUSION // 2, 3, 3), f"{head}.2.bias": (32,)}
    shapes |= {f"{head}.4.weight": (outputs, 32, 1, 1), f"{head}.4.bias": (outputs,)}
    return {f"model.{k}": 0.02 * torch.randn(shape, generator=generator) for k, shape in shapes.items()}


def test_the_converted_checkpoint_loads_every_weight_and_labels_with_omnidatas_colours(tmp_path):
    state = omnidata_state(torch.Generator().manual_seed(0))
    # The head's last convolution made constant: colour (0.75, 0.5, 0.25) everywhere, n = (0.5, 0, -0.5).
    state["model.scratch.output_conv.4.weight"].zero_()
    state["model.scratch.output_conv.4.bias"].copy_(torch.tensor([0.75, 0.5, 0.25]))
    checkpoint = tmp_path / "omnidata_dpt_normal_v2.ckpt"
    torch.save({"state_dict": state, "epoch": 3}, checkpoint)
    folder = convert_checkpoint(checkpoint, tmp_path / "converted", "normal", CONFIG)
    labeler = NormalLabeler(LabelerConfig(model=str(folder), input_size=SIZE), 32)
    labeler.setup()
    assert labeler.emits_colour and "Omnidata" in labeler.provenance()["normal_source"]
    converted = labeler.model.state_dict()
    assert torch.equal(
        converted["dpt.encoder.layer.1.attention.attention.key.weight"],
        state["model.pretrained.model.blocks.1.attn.qkv.weight"][D : 2 * D],
    )
    assert torch.equal(
        converted["neck.fusion_stage.layers.0.projection.weight"], state["model.scratch.refinenet4.out_conv.weight"]
    )
    (payload,) = labeler.labelled(
        LabelBatch(np.random.default_rng(0).integers(0, 256, (1, SIZE, SIZE, 3)).astype(np.uint8))
    )
    normals = decode_png(payload["normal"]).astype(np.float64) / 255 * 2 - 1  # (32, 32, 3)
    expected = np.array([0.5, 0.0, -0.5]) / np.linalg.norm([0.5, 0.0, -0.5])
    np.testing.assert_allclose(normals.reshape(-1, 3), np.broadcast_to(expected, (32 * 32, 3)), atol=1 / 127.5)


def test_the_depth_checkpoint_converts_and_labels_omnidatas_clamped_depth_saying_it_is_depth(tmp_path):
    state = omnidata_state(torch.Generator().manual_seed(2), outputs=1)
    state["model.scratch.output_conv.4.weight"].zero_()  # the head made constant: depth 2.0, beyond Omnidata's range
    state["model.scratch.output_conv.4.bias"].fill_(2.0)
    checkpoint = tmp_path / "omnidata_dpt_depth_v2.ckpt"
    torch.save({"state_dict": state}, checkpoint)
    folder = convert_checkpoint(checkpoint, tmp_path / "converted", "depth", omnidata_config(SIZES, BACKBONE, "depth"))
    labeler = DepthLabeler(LabelerConfig(model=str(folder), input_size=SIZE), 32)
    labeler.setup()
    assert labeler.omnidata and labeler.provenance()["depth_quantity"] == "depth"
    (payload,) = labeler.labelled(LabelBatch(np.zeros((1, SIZE, SIZE, 3), dtype=np.uint8)))
    assert payload["depth_min"] == payload["depth_max"] == 1.0  # clamped to [0, 1] as Omnidata does
    with pytest.raises(OmnidataConversionError, match="another shape for 'head.head.4.bias'"):
        convert_checkpoint(checkpoint, tmp_path / "as-normals", "normal", CONFIG)  # a depth head is not a normal one


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.__setitem__("model.pretrained.model.extra_token", torch.zeros(1)), "extra_token"),
        (
            lambda s: s.pop("model.scratch.refinenet2.out_conv.bias"),
            "lacks 'neck.fusion_stage.layers.2.projection.bias'",
        ),
        (
            lambda s: s.__setitem__("model.scratch.output_conv.4.bias", torch.zeros(1)),
            "another shape for 'head.head.4.bias'",
        ),
    ],
    ids=["an unknown weight", "a missing weight", "a depth head"],
)
def test_a_checkpoint_that_is_not_omnidatas_normal_model_stops_naming_the_weight(tmp_path, change, message):
    state = omnidata_state(torch.Generator().manual_seed(1))
    change(state)
    checkpoint = tmp_path / "other.ckpt"
    torch.save(state, checkpoint)
    with pytest.raises(OmnidataConversionError, match=message):
        convert_checkpoint(checkpoint, tmp_path / "out", "normal", CONFIG)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("task", "flag"), [("normal", "--omnidata"), ("depth", "--omnidata-depth")])
def test_make_models_converts_only_into_a_configured_new_folder(tmp_path, capsys, task, flag):
    from four_m.cli import main

    checkpoint = tmp_path / "omnidata.ckpt"
    torch.save({}, checkpoint)
    for model in ("null", str(tmp_path)):  # no folder configured; a folder that is already there
        status = main(
            ["models", "--root", str(tmp_path), "--set", f"label.{task}.model={model}", flag, str(checkpoint)]
        )
        assert status == 2
        assert (
            f"{flag} converts into label.{task}.model, which must name a folder not there yet"
            in capsys.readouterr().err
        )
