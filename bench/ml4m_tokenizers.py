"""Speed of ml-4m's RGB tokenizer (a DiVAE) as imported here, at its released size with random
weights: ViT-B/16 encoding (images per second) and the diffusion decoder (seconds per image at
ml-4m's 25 preview steps), on the CPU and, where there is one, the GPU, side by side; encoding also
under bf16 autocast, with the share of token ids it keeps from fp32.

The network is ``tokenize.ml4m_vqvae`` built from a state dict in ml-4m's layout
(``tests/tokenize/ml4m_tokenizer_checkpoint.py``: ViT-B encoder, 12 blocks, a 28x28 positional grid;
``unet_patched``: 256 channels, multipliers 1-2-2-2, 3 blocks per level, attention at 4x and 8x).
Decoding is timed over ``--steps`` steps and scaled to 25, the per-step cost being constant::

    .venv/bin/python bench/ml4m_tokenizers.py [--cpu-batch 4] [--gpu-batch 64] [--steps 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from four_m.tokenize.ml4m_vqvae import DECODE_STEPS, ML4MVQVAE, load_ml4m_vqvae

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: its tests' ml-4m layouts
from tests.tokenize.ml4m_tokenizer_checkpoint import DIVAE_CONFIG, unet, vit  # noqa: E402

SIDE, DIM, LATENT, CODES = 224, 768, 32, 16384


def released_rgb_divae() -> ML4MVQVAE:
    generator = torch.Generator().manual_seed(0)
    state = {
        "encoder.proj.weight": torch.randn(DIM, 3, 16, 16, generator=generator) * 0.02,
        "encoder.proj.bias": torch.zeros(DIM),
        "quant_proj.weight": torch.randn(LATENT, DIM, 1, 1, generator=generator) * 0.02,
        "quant_proj.bias": torch.zeros(LATENT),
        "quantize._codebook.embed": torch.randn(CODES, LATENT, generator=generator),
    }
    state |= vit("encoder", 28, generator, dim=DIM, hidden=4 * DIM, depth=12)
    state |= unet(3, LATENT, generator, width=256, mult=(1, 2, 2, 2), blocks=3, attention=(4, 8))
    return load_ml4m_vqvae(DIVAE_CONFIG, state)


def timed(work, device: str) -> float:
    """Seconds of one call after a warm-up call."""
    work()
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    work()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def measure(network: ML4MVQVAE, device: str, batch: int, steps: int) -> dict[str, str]:
    network.to(device)
    images = torch.rand(batch, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1)).to(device) * 2 - 1
    with torch.no_grad():
        encode = timed(lambda: network.tokenize(images), device)
        ids = network.tokenize(images)
        with torch.autocast(device, dtype=torch.bfloat16):
            mixed_seconds = timed(lambda: network.tokenize(images), device)
            mixed = network.tokenize(images)
    decode = timed(lambda: network.decode_tokens(ids, steps=steps), device) / steps * DECODE_STEPS / batch
    return {
        "encode fp32 (images/s)": f"{batch / encode:.1f}",
        "encode bf16 (images/s)": f"{batch / mixed_seconds:.1f}",
        "bf16 ids equal to fp32": f"{(mixed == ids).float().mean().item():.1%}",
        f"decode, {DECODE_STEPS} steps (s/image)": f"{decode:.2f}",
        "batch": str(batch),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-batch", type=int, default=4)
    parser.add_argument("--gpu-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2, help="decoding steps timed (scaled to 25)")
    args = parser.parse_args()
    network = released_rgb_divae()
    print(f"RGB DiVAE at the released size: {sum(p.numel() for p in network.parameters()):,} parameters")
    columns = {f"cpu ({torch.get_num_threads()} threads)": measure(network, "cpu", args.cpu_batch, args.steps)}
    if torch.cuda.is_available():
        columns[torch.cuda.get_device_name()] = measure(network, "cuda", args.gpu_batch, args.steps)
    rows = next(iter(columns.values()))
    print(f"| | {' | '.join(columns)} |\n|---|{'---|' * len(columns)}")
    for row in rows:
        print(f"| {row} | {' | '.join(column[row] for column in columns.values())} |")


if __name__ == "__main__":
    main()
