"""A synthetic apple/ml-4m checkpoint at a tiny size: the key names, shapes and buffers ml-4m's
``fourm.models.fm.FourM`` state dict has (read from its source), random values. Tests convert it
without ml-4m or the network; ``bench/import_4m_check.py`` checks the conversion against ml-4m itself."""

from __future__ import annotations

import torch

DIM, HEADS, ENCODER, DECODER = 32, 4, 2, 2
HIDDEN = int(2 * (DIM * 4) / 3)  # ml-4m's GatedMlp: 2/3 of dim * mlp_ratio
IMAGE, PATCH = 224, 16
GRID = IMAGE // PATCH
VOCABS = {"tok_rgb@224": 64, "tok_depth@224": 48, "caption": 300, "det": 300}
SEQUENCE_LENGTH = 256


def config(vocabs: dict[str, int] = VOCABS, **changes) -> dict:
    """ml-4m's ``config.json`` of an ``fm_*_swiglu_nobias`` model with rgb@224 in and ``vocabs``'s
    token modalities (ml-4m name -> vocabulary size) in and out."""
    return {
        "domains_in": ["rgb@224", *vocabs],
        "domains_out": list(vocabs),
        "encoder_depth": ENCODER,
        "decoder_depth": DECODER,
        "dim": DIM,
        "num_heads": HEADS,
        "mlp_ratio": 4.0,
        "qkv_bias": False,
        "proj_bias": False,
        "mlp_bias": False,
        "norm_bias": False,
        "act_layer": "SiLU",
        "gated_mlp": True,
        "qk_norm": False,
        "decoder_causal_mask": False,
        "decoder_sep_mask": True,
        "num_register_tokens": 0,
        "share_modality_embeddings": True,
        "image_size": IMAGE,
        "patch_size": PATCH,
        **changes,
    }


def sincos_1d(length: int, dim: int) -> torch.Tensor:
    """ml-4m's ``build_1d_sincos_posemb``: (1, N, D)."""
    omega = 1.0 / (10000.0 ** (torch.arange(dim // 2, dtype=torch.float32) / (dim // 2)))
    out = torch.einsum("n,d->nd", torch.arange(length, dtype=torch.float32), omega)
    return torch.cat([out.sin(), out.cos()], dim=1)[None]


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """ml-4m's ``build_2d_sincos_posemb`` (MoCo-v3's): (1, side*side, D)."""
    grid_w, grid_h = torch.meshgrid(
        torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32), indexing="ij"
    )
    omega = 1.0 / (10000.0 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4)))
    out_w = torch.einsum("n,d->nd", grid_w.reshape(-1), omega)
    out_h = torch.einsum("n,d->nd", grid_h.reshape(-1), omega)
    return torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)[None]


def weights(seed: int = 0, vocabs: dict[str, int] = VOCABS) -> dict[str, torch.Tensor]:
    """The state dict, random weights (std 0.02, norms near 1) and ml-4m's fixed buffers. The shared
    modality embeddings are one tensor under two names, as in ml-4m's model; see :func:`saved`."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.02

    def norm(prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + rand(DIM), f"{prefix}.bias": torch.zeros(DIM)}  # bias: a zero buffer

    def mlp(prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.fc1.weight": rand(HIDDEN, DIM),
            f"{prefix}.fc2.weight": rand(DIM, HIDDEN),
            f"{prefix}.fc3.weight": rand(HIDDEN, DIM),
        }

    state: dict[str, torch.Tensor] = {}
    for i in range(ENCODER):
        block = f"encoder.{i}"
        state |= norm(f"{block}.norm1") | norm(f"{block}.norm2") | mlp(f"{block}.mlp")
        state |= {f"{block}.attn.qkv.weight": rand(3 * DIM, DIM), f"{block}.attn.proj.weight": rand(DIM, DIM)}
    for i in range(DECODER):
        block = f"decoder.{i}"
        state |= norm(f"{block}.norm1") | norm(f"{block}.query_norm") | norm(f"{block}.context_norm")
        state |= norm(f"{block}.norm2") | mlp(f"{block}.mlp")
        state |= {f"{block}.self_attn.qkv.weight": rand(3 * DIM, DIM), f"{block}.self_attn.proj.weight": rand(DIM, DIM)}
        state |= {
            f"{block}.cross_attn.q.weight": rand(DIM, DIM),
            f"{block}.cross_attn.kv.weight": rand(2 * DIM, DIM),
            f"{block}.cross_attn.proj.weight": rand(DIM, DIM),
        }
    state |= norm("encoder_norm") | norm("decoder_norm")
    state |= {"decoder_proj_context.weight": rand(DIM, DIM), "decoder_proj_context.bias": rand(DIM)}
    state["mask_token"] = rand(1, 1, DIM)

    state |= {
        "encoder_embeddings.rgb@224.pos_emb": sincos_2d(GRID, DIM),
        "encoder_embeddings.rgb@224.mod_emb": rand(1, 1, DIM),
        "encoder_embeddings.rgb@224.proj.weight": rand(DIM, PATCH * PATCH * 3),
    }
    for name, vocab in vocabs.items():
        positions = sincos_1d(SEQUENCE_LENGTH, DIM) if name in ("caption", "det") else sincos_2d(GRID, DIM)
        shared = rand(1, 1, DIM)  # share_modality_embeddings: one tensor, both sides
        for side in ("encoder", "decoder"):
            prefix = f"{side}_embeddings.{name}"
            state |= {
                f"{prefix}.pos_emb": positions.clone(),  # each embedding module builds its own buffer
                f"{prefix}.mod_emb": shared,
                f"{prefix}.token_emb.weight": rand(vocab, DIM),
            }
        state[f"decoder_embeddings.{name}.to_logits.weight"] = rand(vocab, DIM)
    return state


def saved(state: dict[str, torch.Tensor], vocabs: dict[str, int] = VOCABS) -> dict[str, torch.Tensor]:
    """What a safetensors file of ``state`` holds: a tensor shared by two names under one of them
    (``save_model``), here the encoder's for captions and the decoder's for the others."""
    kept = dict(state)
    for name in vocabs:
        side = "decoder" if name == "caption" else "encoder"
        del kept[f"{side}_embeddings.{name}.mod_emb"]
    return kept
