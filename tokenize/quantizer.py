"""The vector quantizer shared by every map tokenizer: cosine codes, EMA updates, dead-code restarts.

Three choices keep a small codebook alive and every code in use (ViT-VQGAN, "Improved VQGAN"):

- Codes and encodings are l2-normalised, so the nearest code is the one of highest cosine
  similarity and no code can win by length alone.
- Codes are not learned by gradient descent: each used code moves a step ``1 - ema_decay`` towards
  the mean of the (normalised) encodings assigned to it, then back onto the unit sphere. The
  encoder still learns through the straight-through estimator and the commitment loss.
- A code that no encoding chose for ``dead_after`` training steps is restarted on a random
  encoding of the current batch, so codes never stay stranded far from the data.

All state is in buffers (the codebook and each code's idle steps), so ``state_dict`` is the whole
quantizer and saves as safetensors. The EMA update is local to one process: under data parallel
each replica would drift apart, so tokenizers train on one device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Quantized:
    codes: torch.Tensor
    """(B, D, H, W) unit code vectors; in training their gradient passes straight to the encodings."""
    ids: torch.Tensor
    """(B, H, W) int64 code ids."""
    loss: torch.Tensor
    """Scalar commitment loss (``commitment`` * MSE between encodings and their codes)."""
    usage: torch.Tensor
    """Fraction of the codebook this batch used."""
    active: torch.Tensor
    """Fraction of the codebook used within the last ``dead_after`` training steps (the recent window)."""
    perplexity: torch.Tensor
    """exp(entropy) of this batch's code histogram: the number of codes it effectively uses."""


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, code_dim: int, commitment: float, ema_decay: float, dead_after: int):
        super().__init__()
        self.commitment = commitment
        self.ema_decay = ema_decay
        self.dead_after = dead_after
        self.register_buffer("codebook", F.normalize(torch.randn(codebook_size, code_dim), dim=1))  # (K, D)
        self.register_buffer("idle", torch.zeros(codebook_size, dtype=torch.long))  # (K,) steps since last use

    def forward(self, encodings: torch.Tensor) -> Quantized:
        """(B, D, H, W) encodings -> their nearest codes; in training mode also updates the codebook.

        Always in fp32, autocast or not: in bf16 the cosine similarities of near codes tie, and which
        code wins would depend on rounding."""
        with torch.autocast(encodings.device.type, enabled=False):
            return self._quantize(encodings.float())

    def _quantize(self, encodings: torch.Tensor) -> Quantized:
        batch, dim, height, width = encodings.shape
        flat = F.normalize(encodings.permute(0, 2, 3, 1).reshape(-1, dim), dim=1)  # (N, D), N = B*H*W
        with torch.no_grad():
            ids = (flat @ self.codebook.T).argmax(dim=1)  # (N,) highest cosine similarity
        codes = self.codebook[ids]  # (N, D), a copy: the update below does not reach it
        counts = torch.bincount(ids, minlength=len(self.codebook))  # (K,)
        if self.training:
            self._update(flat.detach(), ids, counts)
        loss = self.commitment * F.mse_loss(flat, codes)
        straight_through = flat + (codes - flat).detach()  # forward: codes; backward: identity
        probs = counts / counts.sum()
        return Quantized(
            codes=straight_through.view(batch, height, width, dim).permute(0, 3, 1, 2),
            ids=ids.view(batch, height, width),
            loss=loss,
            usage=(counts > 0).float().mean(),
            active=(self.idle < self.dead_after).float().mean(),
            perplexity=torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum()),
        )

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, H, W) ids -> (B, D, H, W) code vectors, for decoding stored tokens."""
        return self.codebook[ids].permute(0, 3, 1, 2)

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> None:
        used = counts > 0  # (K,)
        sums = torch.zeros_like(self.codebook).index_add_(0, ids, flat)  # (K, D)
        means = sums / counts.clamp_min(1).unsqueeze(1)
        moved = F.normalize(torch.lerp(self.codebook, means, 1.0 - self.ema_decay), dim=1)
        self.idle.add_(1).masked_fill_(used, 0)
        # One random encoding per code, kept only where the code is dead: no host sync, no branch.
        dead = (self.idle >= self.dead_after).unsqueeze(1)  # (K, 1)
        restarts = flat[torch.randint(len(flat), (len(self.codebook),), device=flat.device)]  # (K, D)
        self.codebook.copy_(torch.where(dead, restarts, torch.where(used.unsqueeze(1), moved, self.codebook)))
        self.idle.masked_fill_(dead.squeeze(1), 0)
