"""The diffusion decoder of ml-4m's DiVAE tokenizers (RGB, normals, Canny edges): its
``unet_patched``, rebuilt from a state dict.

The network, read from ml-4m's ``fourm/vq/models/unet`` (facts, not code): the noisy image is cut
into ``p x p`` patches stacked as channels, the token grid's codebook vectors are upsampled
(nearest) to the patch grid and concatenated, and an ADM-style UNet runs on that grid: a sinusoidal
timestep embedding (cos half first, max period 10 000) through Linear-SiLU-Linear; residual blocks
of GroupNorm(32)-SiLU-conv3x3, the embedding added after the first conv, a 1x1 skip where the width
changes; one-head spatial self-attention (GroupNorm, a 1x1 qkv and output projection) at the
resolutions the checkpoint has it; stride-2 conv downsampling and nearest-x2-then-conv upsampling;
encoder activations concatenated into the decoder path; GroupNorm-SiLU-conv3x3 out, un-patched.

Its layout is read from the keys (which blocks have attention, which resample, every width), so a
tiny test checkpoint and the released 256-channel one load alike. ml-4m's ``unet_patched`` fixes
what the keys cannot tell: one attention head, plain (not FiLM) embedding, convolutional
resampling; any other decoder (``uvit_*``) is refused by its config's ``dec_type``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from four_m.tokenize.base import ML4MTokenizerError

GROUPS = 32
MAX_PERIOD = 10_000


class _Conv(nn.Conv2d):
    """The stem convolution. Every layer here takes the timestep embedding, read or not."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__(shape[1], shape[0], shape[2], padding=shape[2] // 2)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return super().forward(x)


class _ResBlock(nn.Module):
    def __init__(self, channels: int, out: int, emb: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(GROUPS, channels), nn.SiLU(), nn.Conv2d(channels, out, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, out))
        # Index 2 is ml-4m's dropout, inactive when decoding; kept so the conv's key is out_layers.3.
        self.out_layers = nn.Sequential(
            nn.GroupNorm(GROUPS, out), nn.SiLU(), nn.Identity(), nn.Conv2d(out, out, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if channels == out else nn.Conv2d(channels, out, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class _Attention(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(GROUPS, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        B, C, H, W = x.shape
        flat = x.reshape(B, C, H * W)
        q, k, v = self.qkv(self.norm(flat)).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)  # one head each
        attended = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2)  # (B, C, H*W)
        return (flat + self.proj_out(attended)).reshape(B, C, H, W)


class _Down(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.op(x)


class _Up(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Stage(nn.ModuleList):
    """One entry of ml-4m's ``input_blocks``/``output_blocks``: its layers in order."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, emb)
        return x


def _layer(shapes: Mapping[str, tuple[int, ...]], key: str, emb: int) -> nn.Module:
    """The layer whose weights sit under ``key.`` (its kind told by which weights it has)."""
    if f"{key}.in_layers.2.weight" in shapes:
        out, channels = shapes[f"{key}.in_layers.2.weight"][:2]
        if shapes[f"{key}.emb_layers.1.weight"][0] != out:
            raise ML4MTokenizerError(
                f"{key}.emb_layers.1.weight: a scale-shift (FiLM) embedding is not ml-4m's unet_patched"
            )
        return _ResBlock(channels, out, emb)
    if f"{key}.qkv.weight" in shapes:
        return _Attention(shapes[f"{key}.qkv.weight"][1])
    if f"{key}.op.weight" in shapes:
        return _Down(shapes[f"{key}.op.weight"][0])
    if f"{key}.conv.weight" in shapes:
        return _Up(shapes[f"{key}.conv.weight"][0])
    if f"{key}.weight" in shapes:
        return _Conv(shapes[f"{key}.weight"])
    raise ML4MTokenizerError(f"{key}: not a layer of ml-4m's UNet (residual block, attention, resampling, conv)")


def _stages(shapes: Mapping[str, tuple[int, ...]], prefix: str, emb: int) -> nn.ModuleList:
    stages, index = nn.ModuleList(), 0
    while any(key.startswith(f"{prefix}.{index}.") for key in shapes):
        layers, position = _Stage(), 0
        while any(key.startswith(f"{prefix}.{index}.{position}.") for key in shapes):
            layers.append(_layer(shapes, f"{prefix}.{index}.{position}", emb))
            position += 1
        stages.append(layers)
        index += 1
    return stages


def _timestep_embedding(timestep: int, dim: int, device: torch.device) -> Tensor:
    half = dim // 2
    frequencies = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=device) / half)
    angles = float(timestep) * frequencies
    return torch.cat([torch.cos(angles), torch.sin(angles)])[None]  # (1, dim)


class PatchedUNet(nn.Module):
    """``(noisy image (B, C, H, W), timestep, codebook vectors (B, L, h, w)) -> (B, C, H, W)``."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], channels: int, prefix: str = "decoder"):
        """``shapes``: the checkpoint's key -> shape, the UNet's keys under ``prefix.``."""
        super().__init__()
        model_channels = shapes[f"{prefix}.time_embed.0.weight"][1]
        emb = shapes[f"{prefix}.time_embed.0.weight"][0]
        self.model_channels = model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = _stages(shapes, f"{prefix}.input_blocks", emb)
        self.middle_block = _Stage(_layer(shapes, f"{prefix}.middle_block.{i}", emb) for i in range(3))
        self.output_blocks = _stages(shapes, f"{prefix}.output_blocks", emb)
        patched_out, width = shapes[f"{prefix}.out.2.weight"][:2]
        self.patch = math.isqrt(patched_out // channels)
        if channels * self.patch**2 != patched_out:
            raise ML4MTokenizerError(f"{prefix}.out.2.weight: {patched_out} outputs, not {channels} channels x p x p")
        self.channels = channels
        self.out = nn.Sequential(nn.GroupNorm(GROUPS, width), nn.SiLU(), nn.Conv2d(width, patched_out, 3, padding=1))
        self.cond_channels = shapes[f"{prefix}.input_blocks.0.0.weight"][1] - patched_out

    def forward(self, sample: Tensor, timestep: int, cond: Tensor) -> Tensor:
        B, C, H, W = sample.shape
        p = self.patch
        x = sample.reshape(B, C, H // p, p, W // p, p).permute(0, 1, 3, 5, 2, 4).reshape(B, C * p * p, H // p, W // p)
        x = torch.cat([x, F.interpolate(cond, size=(H // p, W // p), mode="nearest")], dim=1)
        emb = self.time_embed(_timestep_embedding(timestep, self.model_channels, sample.device))
        skips = []
        for stage in self.input_blocks:
            x = stage(x, emb)
            skips.append(x)
        x = self.middle_block(x, emb)
        for stage in self.output_blocks:
            x = stage(torch.cat([x, skips.pop()], dim=1), emb)
        x = self.out(x)
        return x.reshape(B, C, p, p, H // p, W // p).permute(0, 1, 4, 2, 5, 3).reshape(B, C, H, W)
