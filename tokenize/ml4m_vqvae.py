"""ml-4m's image tokenizers, ViT VQ-VAEs (semseg, CLIP, DINOv2 feature maps) and DiVAEs (RGB,
depth, normals, edges), as a network of this project, loaded from their released ``config.json`` +
``model.safetensors``.

The network, read from ml-4m's ``fourm/vq`` (facts, not code): an optional class embedding (semseg:
134 labels -> 64 channels), a ViT encoder (a patch or 1x1 convolution, a stored positional grid
resized bicubically to the actual grid, pre-norm blocks with biases, GELU MLPs and LayerNorm eps
1e-6, an optional residual Tanh MLP after the blocks, no final norm), a 1x1 ``quant_proj`` to the
latent width, and a codebook looked up by cosine similarity (latent and codes L2-normalised,
argmax); decoding reads the raw codebook rows, a 1x1 ``post_quant_proj``, a ViT decoder of the
same build and a linear ``out_proj`` back to patches (or to the feature map's channels). Sizes come
from the state dict; heads are 64 wide, as in every ml-4m ViT size. A key this network does not
know, or one it lacks, is refused by name, as is an architecture it cannot reproduce (ConvNeXt
``out_conv``, a Euclidean or multi-head codebook). The tokenizers of RGB, depth, normals and edges
(DiVAE) share this encoder and codebook but decode with a diffusion UNet conditioned on the raw
codebook rows (``tokenize.ml4m_unet``), sampled from noise as their config says
(``tokenize.ml4m_diffusion``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from four_m.tokenize.base import ML4MTokenizerError
from four_m.tokenize.ml4m_diffusion import DiffusionSampler
from four_m.tokenize.ml4m_unet import PatchedUNet

HEAD_WIDTH = 64
NORM_EPS = 1e-6
DIFFUSION_DECODER = ("decoder.time_embed.", "decoder.input_blocks.")
"""Keys of a DiVAE's diffusion UNet decoder (ml-4m's ``unet_patched``)."""
DECODE_STEPS = 25
"""Denoising steps of a DiVAE decode: ml-4m's own default for its previews (``plotting_utils``)."""


class _Block(nn.Module):
    """A timm ViT block: pre-norm attention and GELU MLP, every linear with a bias."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.heads = dim // HEAD_WIDTH
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        x = x + self.proj(attended)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class _ViT(nn.Module):
    """ml-4m's ViT encoder or decoder trunk over a (B, D, h, w) grid of tokens."""

    def __init__(self, dim: int, depth: int, hidden: int, grid: int, post_mlp: bool):
        super().__init__()
        self.pos_emb = nn.Parameter(torch.zeros(1, dim, grid, grid), requires_grad=False)
        self.blocks = nn.ModuleList(_Block(dim, hidden) for _ in range(depth))
        self.post_mlp = post_mlp
        if post_mlp:
            self.norm_mlp = nn.LayerNorm(dim, eps=NORM_EPS)
            self.post_fc1 = nn.Linear(dim, hidden)
            self.post_fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, D, h, w) -> (B, h*w, D)."""
        B, D, h, w = x.shape
        positions = F.interpolate(self.pos_emb, size=(h, w), mode="bicubic", align_corners=False)
        x = (x + positions).flatten(2).transpose(1, 2)  # (B, h*w, D)
        for block in self.blocks:
            x = block(x)
        if self.post_mlp:
            x = x + self.post_fc2(torch.tanh(self.post_fc1(self.norm_mlp(x))))
        return x


class ML4MVQVAE(nn.Module):
    """An ml-4m ViT VQ-VAE or DiVAE. ``tokenize`` maps its input (class indices shifted by one, a
    feature map, or an image in ml-4m's value range) to a (B, h, w) grid of ids; ``decode_tokens``
    maps ids back to its outputs (class logits, the feature map, or the image)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any]):
        super().__init__()
        if not config.get("norm_codes", True) or config.get("num_codebooks", 1) != 1:
            raise ML4MTokenizerError("config norm_codes/num_codebooks: only one cosine-similarity codebook converts")
        if config.get("quant_type", "lucid") != "lucid":
            raise ML4MTokenizerError(f"config quant_type = {config['quant_type']!r}: only 'lucid' converts")
        if any(key.startswith("decoder.out_conv.") for key in shapes):
            raise ML4MTokenizerError("decoder.out_conv: the ConvNeXt output blocks are not reproduced here")
        dim, in_channels, patch, _ = shapes["encoder.proj.weight"]
        self.labels = shapes["cls_emb.weight"][0] if "cls_emb.weight" in shapes else None
        if self.labels is not None:
            self.cls_emb = nn.Embedding(*shapes["cls_emb.weight"])
        self.patch = patch
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)
        hidden = shapes["encoder.blocks.0.mlp.fc1.weight"][0]
        grid = shapes["encoder.pos_emb"][-1]
        self.encoder = _ViT(dim, _depth(shapes, "encoder"), hidden, grid, _post(shapes, "encoder"))
        self.quant_proj = nn.Conv2d(dim, shapes["quant_proj.weight"][0], 1)
        self.register_buffer("codebook", torch.zeros(shapes["quantize._codebook.embed"][-2:]))
        self.diffusion: DiffusionSampler | None = None
        if any(key.startswith(DIFFUSION_DECODER) for key in shapes):  # a DiVAE
            self._add_diffusion_decoder(shapes, config, in_channels)
        elif "post_quant_proj.weight" in shapes:
            self._add_vit_decoder(shapes, in_channels)
        else:
            raise ML4MTokenizerError(
                "checkpoint lacks post_quant_proj.weight and decoder.time_embed.*: it has no decoder"
            )

    def _add_diffusion_decoder(
        self, shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any], channels: int
    ) -> None:
        decoder = config.get("dec_type", "unet_patched")
        if decoder != "unet_patched":
            raise ML4MTokenizerError(f"config dec_type = {decoder!r}: of the diffusion decoders only unet_patched")
        self.decoder = PatchedUNet(shapes, channels)
        if self.decoder.cond_channels != self.codebook.shape[1]:
            raise ML4MTokenizerError(
                f"decoder.input_blocks.0.0.weight: conditioned on {self.decoder.cond_channels} channels,"
                f" the codebook's vectors are {self.codebook.shape[1]} wide"
            )
        self.diffusion = DiffusionSampler.from_config(config)

    def _add_vit_decoder(self, shapes: Mapping[str, tuple[int, ...]], channels: int) -> None:
        decoder_dim = shapes["post_quant_proj.weight"][0]
        self.post_quant_proj = nn.Conv2d(shapes["post_quant_proj.weight"][1], decoder_dim, 1)
        self.decoder = _ViT(
            decoder_dim,
            _depth(shapes, "decoder"),
            shapes["decoder.blocks.0.mlp.fc1.weight"][0],
            shapes["decoder.pos_emb"][-1],
            _post(shapes, "decoder"),
        )
        self.out_channels = self.labels or channels
        outputs = shapes["decoder.out_proj.weight"][0]
        self.out_patch = round((outputs // self.out_channels) ** 0.5)
        if self.out_channels * self.out_patch**2 != outputs:
            raise ML4MTokenizerError(f"decoder.out_proj.weight: {outputs} outputs, not {self.out_channels} x p x p")
        self.out_proj = nn.Linear(decoder_dim, outputs)

    @property
    def codebook_size(self) -> int:
        return self.codebook.shape[0]

    @torch.no_grad()
    def tokenize(self, x: Tensor) -> Tensor:
        """(B, H, W) int64 class indices or (B, C, H, W) floats -> (B, h, w) int64 ids. Under a
        caller's autocast only the encoder runs at low precision: the lookup is fp32, so rounding
        cannot pick the code."""
        if self.labels is not None:
            x = self.cls_emb(x).permute(0, 3, 1, 2)  # (B, C, H, W)
        latent = self.quant_proj(self.encoder(self.proj(x)).transpose(1, 2).unflatten(2, _grid(x, self.patch)))
        with torch.autocast(latent.device.type, enabled=False):
            flat = F.normalize(latent.float().flatten(2).transpose(1, 2), dim=-1)  # (B, h*w, L)
            ids = (flat @ F.normalize(self.codebook.float(), dim=-1).T).argmax(dim=-1)  # cosine similarity
        return ids.view(len(x), *latent.shape[2:])

    @torch.no_grad()
    def decode_tokens(self, ids: Tensor, steps: int = DECODE_STEPS, seed: int = 0) -> Tensor:
        """(B, h, w) ids -> (B, out_channels, h*p, w*p): class logits, the feature map, or (a DiVAE's)
        the image in ml-4m's [-1, 1], denoised in ``steps`` steps from noise seeded ``seed`` per image."""
        B, h, w = ids.shape
        quant = F.embedding(ids, self.codebook).permute(0, 3, 1, 2)  # the raw codebook rows, (B, L, h, w)
        if self.diffusion is not None:
            shape = (self.decoder.channels, h * self.patch, w * self.patch)
            generators = [torch.Generator().manual_seed(seed) for _ in range(B)]
            return self.diffusion.sample(lambda x, t: self.decoder(x, t, quant), shape, generators, steps, ids.device)
        x = self.out_proj(self.decoder(self.post_quant_proj(quant)))  # (B, h*w, C*p*p)
        p, C = self.out_patch, self.out_channels
        return x.view(B, h, w, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, h * p, w * p)


def _grid(x: Tensor, patch: int) -> tuple[int, int]:
    return x.shape[-2] // patch, x.shape[-1] // patch


def _depth(shapes: Mapping[str, tuple[int, ...]], trunk: str) -> int:
    indices = {int(m.group(1)) for key in shapes if (m := re.match(rf"{trunk}\.blocks\.(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


def _post(shapes: Mapping[str, tuple[int, ...]], trunk: str) -> bool:
    return f"{trunk}.post_mlp.fc1.weight" in shapes


def _ours(key: str) -> str | None:
    """ml-4m's key -> this network's (None: a training statistic, not a weight)."""
    if key in ("quantize._codebook.cluster_size", "quantize._codebook.initted", "quantize._codebook.embed_avg"):
        return None
    key = key.replace("quantize._codebook.embed", "codebook").replace("encoder.proj.", "proj.")
    key = key.replace("decoder.out_proj.", "out_proj.")
    key = re.sub(r"\.attn\.(qkv|proj)\.", r".\1.", key)
    key = re.sub(r"\.mlp\.(fc[12])\.", r".\1.", key)
    return re.sub(r"\.post_mlp\.(fc[12])\.", r".post_\1.", key)


def load_ml4m_vqvae(config: Mapping[str, Any], weights: Mapping[str, Tensor]) -> ML4MVQVAE:
    """The network of a released ml-4m ViT VQ-VAE or DiVAE, every key used or refused by name."""
    for key in ("encoder.proj.weight", "encoder.pos_emb", "quant_proj.weight", "quantize._codebook.embed"):
        if key not in weights:
            raise ML4MTokenizerError(f"checkpoint lacks {key}: not an ml-4m ViT VQ-VAE or DiVAE (an MLP tokenizer?)")
    network = ML4MVQVAE({k: tuple(v.shape) for k, v in weights.items()}, config).eval()
    mapped = {}
    for key, tensor in weights.items():
        ours = _ours(key)
        if ours is not None:
            mapped[ours] = tensor.reshape(-1, tensor.shape[-1]) if ours == "codebook" else tensor
    expected = set(network.state_dict())
    unknown, missing = sorted(set(mapped) - expected), sorted(expected - set(mapped))
    if unknown:
        raise ML4MTokenizerError(f"checkpoint key {unknown[0]} has no counterpart here ({len(unknown)} such keys)")
    if missing:
        raise ML4MTokenizerError(f"nothing in the checkpoint fills {missing[0]} ({len(missing)} such weights)")
    network.load_state_dict(mapped, strict=True)
    return network
