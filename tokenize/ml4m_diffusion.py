"""How ml-4m's DiVAE tokenizers turn noise into an image: the noise schedule and sampler their
``config.json`` names, written from ml-4m's ``fourm/vq/scheduling`` (facts, not code).

- Schedule: ``linear`` betas 1e-4..0.02 over ``num_train_timesteps`` (the released tokenizers'),
  ``squaredcos_cap_v2`` (cosine, betas capped at 0.999) or ``shifted_cosine:<s>`` (log-SNR shifted
  by ``-2 log s``); for the first two, ``zero_terminal_snr`` rescales sqrt(alpha-bar) so the last
  step is pure noise (Lin et al. 2023).
- Model output: ``sample`` (x0, the released tokenizers'), ``epsilon`` or ``v_prediction``.
- x0 is clipped to [-1, 1] when ``thresholding`` or ``clip_sample`` is set. ml-4m's dynamic
  thresholding clamps its 99.5th percentile to [1, ``sample_max_value``], which DiVAE leaves at 1:
  that is plain clipping, so it is written as such.
- Sampler (``scheduler``): ``ddpm`` (DiVAE's default: "leading" steps ``k * T // n``, the posterior
  mean plus its "fixed small" variance's noise, none at t = 0) or ``ddim`` (deterministic, eta 0,
  "trailing" steps ``T - 1 - k * T // n``, the step after the last one at alpha-bar 1).

Noise is drawn per image from that image's own (CPU) generator, then moved to the denoiser's
device, so an image's decoding depends neither on the batch it is in nor on the device; with one
image it draws exactly what ml-4m's pipeline draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from four_m.tokenize.base import ML4MTokenizerError

PREDICTIONS = ("sample", "epsilon", "v_prediction")
SAMPLERS = ("ddpm", "ddim")


def _zero_terminal_snr(betas: Tensor) -> Tensor:
    root = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    alphas_cumprod = root**2
    return 1 - torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])


def _cosine_betas(steps: int, max_beta: float = 0.999) -> Tensor:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor(
        [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)],
        dtype=torch.float32,
    )


def _shifted_cosine(steps: int, shift: float) -> Tensor:
    t = torch.linspace(0, 1, steps, dtype=torch.float64)
    log_snr = (-2 * (torch.tan(torch.pi * t / 2).log() + math.log(shift))).clamp(-15, 15).float()
    alphas_cumprod = log_snr.sigmoid()
    alphas_cumprod[-1] = 0.0
    return alphas_cumprod


def alphas_cumprod(config: Mapping[str, Any]) -> Tensor:
    """alpha-bar_t for t in [0, T), in float32 as ml-4m computes it."""
    steps, schedule = (
        int(config.get("num_train_timesteps", 1000)),
        str(config.get("beta_schedule", "squaredcos_cap_v2")),
    )
    if schedule.startswith("shifted_cosine:"):
        return _shifted_cosine(steps, float(schedule.split(":")[1]))
    betas: Callable[[], Tensor] | None = {
        "linear": lambda: torch.linspace(1e-4, 0.02, steps, dtype=torch.float32),
        "squaredcos_cap_v2": lambda: _cosine_betas(steps),
    }.get(schedule)
    if betas is None:
        raise ML4MTokenizerError(f"config beta_schedule = {schedule!r}: linear, squaredcos_cap_v2, shifted_cosine:<s>")
    values = _zero_terminal_snr(betas()) if config.get("zero_terminal_snr", True) else betas()
    return torch.cumprod(1 - values, dim=0)


@dataclass(frozen=True)
class DiffusionSampler:
    """A DiVAE config's schedule and sampler: ``sample`` runs a denoiser from noise to x0."""

    alphas_cumprod: Tensor
    prediction: str
    clip: bool
    sampler: str

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DiffusionSampler:
        prediction = str(config.get("prediction_type", "v_prediction")).split("-")[0]
        sampler = str(config.get("scheduler", "ddpm"))
        if prediction not in PREDICTIONS:
            raise ML4MTokenizerError(f"config prediction_type = {prediction!r}: one of {', '.join(PREDICTIONS)}")
        if sampler not in SAMPLERS:
            raise ML4MTokenizerError(f"config scheduler = {sampler!r}: one of {', '.join(SAMPLERS)}")
        clip = bool(config.get("thresholding", True) or config.get("clip_sample", False))
        return cls(alphas_cumprod(config), prediction, clip, sampler)

    @property
    def train_steps(self) -> int:
        return len(self.alphas_cumprod)

    def timesteps(self, steps: int) -> list[int]:
        if not 1 <= steps <= self.train_steps:
            raise ML4MTokenizerError(f"{steps} diffusion steps: must be in [1, {self.train_steps}]")
        stride = self.train_steps // steps
        if self.sampler == "ddpm":
            return [k * stride for k in reversed(range(steps))]
        return [self.train_steps - 1 - k * stride for k in range(steps)]

    def sample(
        self,
        denoiser: Callable[[Tensor, int], Tensor],
        shape: tuple[int, ...],
        generators: Sequence[torch.Generator],
        steps: int,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """Images of ``shape`` (one per generator) denoised on ``device`` in ``steps`` steps; ``denoiser(x, t)``."""
        x = self._noise(shape, generators).to(device)
        stride = self.train_steps // steps
        for t in self.timesteps(steps):
            x = self._step(denoiser(x, t), t, t - stride, x, generators)
        return x

    @staticmethod
    def _noise(shape: tuple[int, ...], generators: Sequence[torch.Generator]) -> Tensor:
        return torch.cat([torch.randn((1, *shape), generator=g) for g in generators])

    def _step(self, output: Tensor, t: int, previous: int, x: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
        alpha = self.alphas_cumprod[t]
        alpha_previous = self.alphas_cumprod[previous] if previous >= 0 else torch.tensor(1.0)
        if self.prediction == "sample":
            x0, noise = output, (x - alpha**0.5 * output) / (1 - alpha) ** 0.5
        elif self.prediction == "epsilon":
            x0, noise = (x - (1 - alpha) ** 0.5 * output) / alpha**0.5, output
        else:
            x0, noise = alpha**0.5 * x - (1 - alpha) ** 0.5 * output, alpha**0.5 * output + (1 - alpha) ** 0.5 * x
        if self.clip:
            x0 = x0.clamp(-1, 1)
        if self.sampler == "ddim":  # the noise estimate is the unclipped one, as ml-4m's
            return alpha_previous**0.5 * x0 + (1 - alpha_previous) ** 0.5 * noise
        alpha_step = alpha / alpha_previous
        x0_weight = alpha_previous**0.5 * (1 - alpha_step) / (1 - alpha)
        mean = x0_weight * x0 + alpha_step**0.5 * (1 - alpha_previous) / (1 - alpha) * x
        if t == 0:
            return mean
        variance = ((1 - alpha_previous) / (1 - alpha) * (1 - alpha_step)).clamp(min=1e-20)
        return mean + variance**0.5 * self._noise(tuple(x.shape[1:]), generators).to(x.device)
