"""A synthetic ml-4m ViT VQ-VAE tokenizer at a tiny size: the key names and shapes of
``fourm.vq.vqvae.VQVAE``'s state dict (read from its source), random values, and its config.
``bench/import_4m_check.py`` checks the real class against this project's network."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

DIM, HIDDEN, LATENT, CODES, PATCH = 64, 256, 8, 32, 16


def vit(prefix: str, grid: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One ViT trunk (one block, the residual Tanh MLP after it) under ``prefix``."""

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.05

    block = f"{prefix}.blocks.0"
    return {
        f"{prefix}.pos_emb": rand(1, DIM, grid, grid),
        f"{block}.norm1.weight": 1 + rand(DIM),
        f"{block}.norm1.bias": rand(DIM),
        f"{block}.attn.qkv.weight": rand(3 * DIM, DIM),
        f"{block}.attn.qkv.bias": rand(3 * DIM),
        f"{block}.attn.proj.weight": rand(DIM, DIM),
        f"{block}.attn.proj.bias": rand(DIM),
        f"{block}.norm2.weight": 1 + rand(DIM),
        f"{block}.norm2.bias": rand(DIM),
        f"{block}.mlp.fc1.weight": rand(HIDDEN, DIM),
        f"{block}.mlp.fc1.bias": rand(HIDDEN),
        f"{block}.mlp.fc2.weight": rand(DIM, HIDDEN),
        f"{block}.mlp.fc2.bias": rand(DIM),
        f"{prefix}.norm_mlp.weight": 1 + rand(DIM),
        f"{prefix}.norm_mlp.bias": rand(DIM),
        f"{prefix}.post_mlp.fc1.weight": rand(HIDDEN, DIM),
        f"{prefix}.post_mlp.fc1.bias": rand(HIDDEN),
        f"{prefix}.post_mlp.fc2.weight": rand(DIM, HIDDEN),
        f"{prefix}.post_mlp.fc2.bias": rand(DIM),
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


def divae_weights(channels: int = 3) -> dict:
    """An RGB/normal/edge tokenizer (DiVAE): the same encoder and codebook, a diffusion UNet decoder
    (two of its keys stand for it) instead of ``post_quant_proj`` and the ViT decoder."""
    state = {
        k: v for k, v in weights(labels=None, channels=channels).items() if not k.startswith(("decoder.", "post_"))
    }
    return state | {"decoder.time_embed.0.weight": torch.zeros(4, 4), "decoder.input_blocks.0.0.weight": torch.zeros(4)}
