"""The DiVAE sampler (``tokenize.ml4m_diffusion``): ml-4m's schedules and step spacings, and each
prediction type bringing an oracle denoiser's x0 back exactly. The comparison with ml-4m's own
schedulers is ``bench/import_4m_check.py`` (it needs a local ml-4m)."""

from __future__ import annotations

import pytest
import torch

from four_m.tokenize.base import ML4MTokenizerError
from four_m.tokenize.ml4m_diffusion import DiffusionSampler, alphas_cumprod

SHAPE = (3, 8, 8)


def test_linear_schedule_ends_in_pure_noise_only_with_zero_terminal_snr():
    rescaled = alphas_cumprod({"beta_schedule": "linear"})
    plain = alphas_cumprod({"beta_schedule": "linear", "zero_terminal_snr": False})
    assert rescaled.shape == plain.shape == (1000,)
    assert rescaled[0] == pytest.approx(1 - 1e-4) and plain[0] == pytest.approx(1 - 1e-4)
    assert rescaled[-1] == pytest.approx(0, abs=1e-8) and plain[-1] > 1e-5
    assert torch.all(rescaled[1:] < rescaled[:-1])
    shifted = alphas_cumprod({"beta_schedule": "shifted_cosine:0.5"})
    assert shifted[-1] == 0 and shifted[500] > alphas_cumprod({"beta_schedule": "shifted_cosine:1"})[500]


def test_ddpm_steps_lead_and_ddim_steps_trail():
    ddpm = DiffusionSampler.from_config({"beta_schedule": "linear"})
    ddim = DiffusionSampler.from_config({"beta_schedule": "linear", "scheduler": "ddim"})
    assert ddpm.timesteps(25)[:2] == [960, 920] and ddpm.timesteps(25)[-1] == 0
    assert ddim.timesteps(25)[:2] == [999, 959] and ddim.timesteps(25)[-1] == 39
    with pytest.raises(ML4MTokenizerError, match="1001 diffusion steps: must be in"):
        ddpm.timesteps(1001)


def oracle(sampler: DiffusionSampler, x0: torch.Tensor):
    """A denoiser that knows the answer, in the sampler's own prediction type."""

    def denoise(x: torch.Tensor, t: int) -> torch.Tensor:
        alpha = sampler.alphas_cumprod[t]
        noise = (x - alpha**0.5 * x0) / (1 - alpha) ** 0.5
        return {
            "sample": x0,
            "epsilon": noise,
            "v_prediction": alpha**0.5 * noise - (1 - alpha) ** 0.5 * x0,
        }[sampler.prediction].expand_as(x)

    return denoise


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
@pytest.mark.parametrize("prediction", ["sample", "epsilon", "v_prediction"])
def test_every_prediction_type_brings_the_oracles_x0_back(scheduler, prediction):
    config = {"beta_schedule": "linear", "zero_terminal_snr": False, "scheduler": scheduler}
    sampler = DiffusionSampler.from_config(config | {"prediction_type": prediction})
    x0 = torch.rand(1, *SHAPE, generator=torch.Generator().manual_seed(1)) * 1.6 - 0.8
    generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    images = sampler.sample(oracle(sampler, x0), SHAPE, generators, steps=10)
    assert images.shape == (2, *SHAPE)
    torch.testing.assert_close(images, x0.expand(2, *SHAPE), atol=1e-4, rtol=0)


def test_x0_is_clipped_to_the_image_range_and_noise_is_the_images_own():
    sampler = DiffusionSampler.from_config({"beta_schedule": "linear", "prediction_type": "sample"})
    bright = torch.full((1, *SHAPE), 1.5)
    images = sampler.sample(oracle(sampler, bright), SHAPE, [torch.Generator().manual_seed(0)], steps=5)
    assert torch.equal(images, torch.ones(1, *SHAPE))
    first = sampler.sample(lambda x, t: x, SHAPE, [torch.Generator().manual_seed(s) for s in (3, 4)], steps=3)
    again = sampler.sample(lambda x, t: x, SHAPE, [torch.Generator().manual_seed(4)], steps=3)
    assert torch.equal(first[1:], again) and not torch.equal(first[0], first[1])


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"beta_schedule": "sigmoid"}, "beta_schedule = 'sigmoid'"),
        ({"prediction_type": "noise"}, "prediction_type = 'noise'"),
        ({"scheduler": "pndm"}, "scheduler = 'pndm'"),
    ],
)
def test_settings_ml4m_does_not_release_are_refused_by_name(config, message):
    with pytest.raises(ML4MTokenizerError, match=message):
        DiffusionSampler.from_config(config)
