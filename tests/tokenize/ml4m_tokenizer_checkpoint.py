"""A synthetic ml-4m ViT VQ-VAE tokenizer at a tiny size: the key names and shapes of
``fourm.vq.vqvae.VQVAE``'s state dict (read from its source), random values, and its config.
``bench/import_4m_check.py`` checks the real class against this project's network."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

DIM, HIDDEN, LATENT, CODES, PATCH = 64, 256, 8, 32, 16


def vit(
    prefix: str, grid: int, generator: torch.Generator, dim: int = DIM, hidden: int = HIDDEN, depth: int = 1
) -> dict[str, torch.Tensor]:
    """One ViT trunk (``depth`` blocks, the residual Tanh MLP after them) under ``prefix``."""

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.05

    trunk = {f"{prefix}.pos_emb": rand(1, dim, grid, grid)}
    for index in range(depth):
        trunk |= _block(f"{prefix}.blocks.{index}", rand, dim, hidden)
    return trunk | {
        f"{prefix}.norm_mlp.weight": 1 + rand(dim),
        f"{prefix}.norm_mlp.bias": rand(dim),
        f"{prefix}.post_mlp.fc1.weight": rand(hidden, dim),
        f"{prefix}.post_mlp.fc1.bias": rand(hidden),
        f"{prefix}.post_mlp.fc2.weight": rand(dim, hidden),
        f"{prefix}.post_mlp.fc2.bias": rand(dim),
    }


def _block(block: str, rand, dim: int, hidden: int) -> dict[str, torch.Tensor]:
    return {
        f"{block}.norm1.weight": 1 + rand(dim),
        f"{block}.norm1.bias": rand(dim),
        f"{block}.attn.qkv.weight": rand(3 * dim, dim),
        f"{block}.attn.qkv.bias": rand(3 * dim),
        f"{block}.attn.proj.weight": rand(dim, dim),
        f"{block}.attn.proj.bias": rand(dim),
        f"{block}.norm2.weight": 1 + rand(dim),
        f"{block}.norm2.bias": rand(dim),
        f"{block}.mlp.fc1.weight": rand(hidden, dim),
        f"{block}.mlp.fc1.bias": rand(hidden),
        f"{block}.mlp.fc2.weight": rand(dim, hidden),
        f"{block}.mlp.fc2.bias": rand(dim),
    }


def weights(labels: int | None = 134, channels: int = 8, patch: int = PATCH, grid: int = 8, seed: int = 0) -> dict:
    """A semseg-like tokenizer (``labels`` -> ``channels`` embedding, patch convolution), or with
    ``labels=None`` and ``patch=1`` a feature-map one (``channels``-wide input, 1x1 convolution)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.05

    out = labels or channels
    state = {
        "encoder.proj.weight": rand(DIM, channels, patch, patch),
        "encoder.proj.bias": rand(DIM),
        "quant_proj.weight": rand(LATENT, DIM, 1, 1),
        "quant_proj.bias": rand(LATENT),
        "quantize._codebook.embed": torch.nn.functional.normalize(rand(CODES, LATENT), dim=-1),
        "quantize._codebook.cluster_size": torch.ones(CODES),
        "quantize._codebook.initted": torch.ones(1),
        "post_quant_proj.weight": rand(DIM, LATENT, 1, 1),
        "post_quant_proj.bias": rand(DIM),
        "decoder.out_proj.weight": rand(out * patch * patch, DIM),
        "decoder.out_proj.bias": rand(out * patch * patch),
        **vit("encoder", grid, generator),
        **vit("decoder", grid, generator),
    }
    if labels is not None:
        state["cls_emb.weight"] = rand(labels, channels)
    return state


def write(folder: Path, state: dict, **config) -> Path:
    """A released tokenizer's folder: ``config.json`` (its constructor arguments) and the weights."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"enc_type": "vit_b_enc", "dec_type": "vit_b_dec", "quant_type": "lucid", "norm_codes": True, **config}
    (folder / "config.json").write_text(json.dumps(settings))
    save_file(state, str(folder / "model.safetensors"))
    return folder


def unet(
    channels: int,
    cond: int,
    generator: torch.Generator,
    width: int = 32,
    mult: tuple[int, ...] = (1, 2),
    blocks: int = 1,
    attention: tuple[int, ...] = (2,),
    patch: int = 4,
) -> dict[str, torch.Tensor]:
    """``fourm.vq.models.unet.PatchedUNetCondCat``'s state dict under ``decoder.``, laid out as its
    constructor lays it (ml-4m's ``unet_patched`` is ``width=256, mult=(1, 2, 2, 2), blocks=3,
    attention=(4, 8)``). Output convolutions get random values too (ml-4m starts them at zero)."""
    state: dict[str, torch.Tensor] = {}

    def add(key: str, *shape: int) -> None:
        state[f"decoder.{key}.weight"] = torch.randn(*shape, generator=generator) * 0.05 + (len(shape) == 1)
        state[f"decoder.{key}.bias"] = torch.randn(shape[0], generator=generator) * 0.05

    def res(key: str, ch: int, out: int) -> None:
        add(f"{key}.in_layers.0", ch), add(f"{key}.in_layers.2", out, ch, 3, 3)
        add(f"{key}.emb_layers.1", out, 4 * width)
        add(f"{key}.out_layers.0", out), add(f"{key}.out_layers.3", out, out, 3, 3)
        if ch != out:
            add(f"{key}.skip_connection", out, ch, 1, 1)

    def attend(key: str, ch: int) -> None:
        add(f"{key}.norm", ch), add(f"{key}.qkv", 3 * ch, ch, 1), add(f"{key}.proj_out", ch, ch, 1)

    add("time_embed.0", 4 * width, width), add("time_embed.2", 4 * width, 4 * width)
    ch = mult[0] * width
    add("input_blocks.0.0", ch, channels * patch * patch + cond, 3, 3)
    skips, ds, index = [ch], 1, 1
    for level, m in enumerate(mult):
        for _ in range(blocks):
            res(f"input_blocks.{index}.0", ch, m * width)
            ch = m * width
            if ds in attention:
                attend(f"input_blocks.{index}.1", ch)
            skips.append(ch)
            index += 1
        if level != len(mult) - 1:
            add(f"input_blocks.{index}.0.op", ch, ch, 3, 3)
            skips.append(ch)
            ds, index = ds * 2, index + 1
    res("middle_block.0", ch, ch), attend("middle_block.1", ch), res("middle_block.2", ch, ch)
    index = 0
    for level, m in reversed(list(enumerate(mult))):
        for i in range(blocks + 1):
            res(f"output_blocks.{index}.0", ch + skips.pop(), m * width)
            ch, position = m * width, 1
            if ds in attention:
                attend(f"output_blocks.{index}.1", ch)
                position = 2
            if level and i == blocks:
                add(f"output_blocks.{index}.{position}.conv", ch, ch, 3, 3)
                ds //= 2
            index += 1
    add("out.0", ch), add("out.2", channels * patch * patch, mult[0] * width, 3, 3)
    return state


def divae_weights(channels: int = 3, seed: int = 0) -> dict:
    """An RGB/normal/edge tokenizer (DiVAE): the same encoder and codebook, a diffusion UNet
    (``unet``) conditioned on the codebook vectors instead of ``post_quant_proj`` and a ViT decoder."""
    encoder = {
        k: v for k, v in weights(labels=None, channels=channels).items() if not k.startswith(("decoder.", "post_"))
    }
    return encoder | unet(channels, LATENT, torch.Generator().manual_seed(seed))


DIVAE_CONFIG = {"dec_type": "unet_patched", "prediction_type": "sample", "beta_schedule": "linear"}
"""A released DiVAE's diffusion settings (``cfgs/default/tokenization/divae``)."""
