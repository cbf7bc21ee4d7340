"""Manual check of ``make import-4m`` against apple/ml-4m itself: the same random model, both ways.

Builds ml-4m's own ``fourm.models.fm.FM`` (random weights, a small config with the released
models' architecture: SwiGLU, no biases, LayerNorm eps 1e-6), converts its state dict with
``train.import_4m.convert`` (through a safetensors file, as a released checkpoint is stored), and
runs both models on the same two batches:

(a) the photo's pixels (``rgb@224``) and half of the depth tokens in, every rgb token out;
(b) the pixels in, a caption out (teacher-forced: ``S_0 w1 w2 w3 S_1``);
(a0), (b0) the same targets from no input at all (unconditional generation, classifier-free
guidance's unconditional pass): ml-4m's every input masked, ours all padding.

It prints the largest absolute difference of the logits. Then the same for ml-4m's ViT VQ-VAE
tokenizers (``fourm.vq.vqvae.VQVAE``, random weights) against ``tokenize.ml4m_vqvae``: (c) a
semseg-like one (134 labels, a 448 px positional grid resized to 224 px input), (d) a CLIP-like one
(512-wide feature maps, no patching): the share of equal token ids and the largest difference of
the decoded outputs; (e) an RGB-like diffusion-decoder tokenizer (``DiVAE``, its released
``unet_patched`` decoder at full size, random weights): the share of equal ids, then the image
decoded from the same ids and the same seed with ml-4m's DDPM sampler (x0-prediction, linear
schedule, as released) and with its DDIM one: the largest difference, and the seconds per
denoising step of each; (f) a depth-like DiVAE: the ids of min-max scaled depth through this
project's tokenizer (``tokenize.ml4m_tokenizer``, labels of Omnidata's depth) against ml-4m's own
``DepthTransform.truncated_depth_standardization`` of the raw depth (its module loaded alone, with
a stand-in ``albumentations``). ml-4m's ``fourm.vq`` imports ``diffusers`` (its pinned 0.20 needs an older
``huggingface_hub`` than this project's), so a stand-in module is put in its place here: base
classes (``ModelMixin`` is ``torch.nn.Module``), the config decorator and ``randn_tensor``, the
few names ml-4m's UNet, schedulers and pipeline use.

Needs a local copy of apple/ml-4m and ``einops`` (not project dependencies: CI never runs this)::

    git clone https://github.com/apple/ml-4m /tmp/ml-4m   # or any local copy
    .venv/bin/pip install einops
    .venv/bin/python bench/import_4m_check.py --ml4m /tmp/ml-4m
"""

from __future__ import annotations

import argparse
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_model

from four_m.core.modalities import IMAGENET_MEAN, IMAGENET_STD
from four_m.tokenize.maps import configured
from four_m.tokenize.ml4m_tokenizer import ML4MTokenizer
from four_m.tokenize.ml4m_vqvae import load_ml4m_vqvae
from four_m.train.batch import MaskedBatch
from four_m.train.import_4m import REQUIRED, convert

B, SIDE, GRID = 2, 224, 14
DEPTH_SHOWN = 98
DIVAE_STEPS = 4  # few: each step of the released-size UNet takes seconds on a CPU
CAPTION = [5, 1001, 1002, 1003, 6]  # S_0 w1 w2 w3 S_1, ids in ml-4m's text vocabulary layout


def reference_config(dim: int) -> dict:
    return {
        "domains_in": ["rgb@224", "tok_rgb@224", "tok_depth@224", "caption"],
        "domains_out": ["tok_rgb@224", "tok_depth@224", "caption"],
        "image_size": SIDE,
        "patch_size": 16,
        "dim": dim,
        "encoder_depth": 2,
        "decoder_depth": 2,
        "num_heads": dim // 64 or 1,
        "mlp_ratio": 4.0,
        **REQUIRED,  # the released models' settings: ml-4m builds its model from them here
    }


def ml4m_inputs(images: torch.Tensor, depth: torch.Tensor, shown: torch.Tensor, target: str) -> dict:
    """ml-4m's mod_dict: masks are True where a token is NOT an input / NOT a target."""
    standardised = (images.permute(0, 3, 1, 2) / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(
        IMAGENET_STD
    )[:, None, None]
    none = torch.ones(B, GRID * GRID, dtype=torch.bool)
    depth_input = torch.ones(B, GRID * GRID, dtype=torch.bool)
    depth_input[:, shown] = False
    mod_dict = {
        "rgb@224": {
            "tensor": standardised,
            "input_mask": torch.zeros(B, GRID * GRID, dtype=torch.bool),
            "target_mask": none,
        },
        "tok_depth@224": {
            "tensor": depth,
            "input_mask": depth_input if target == "tok_rgb@224" else none,
            "target_mask": none,
            "decoder_attention_mask": torch.zeros(B, GRID * GRID, dtype=torch.long),
        },
    }
    if target == "tok_rgb@224":
        attention = torch.zeros(B, GRID * GRID, dtype=torch.long)
        attention[:, 0] = GRID * GRID  # the whole grid attends to itself
        mod_dict["tok_rgb@224"] = {
            "tensor": torch.zeros(B, GRID, GRID, dtype=torch.long),
            "input_mask": none,
            "target_mask": torch.zeros(B, GRID * GRID, dtype=torch.bool),
            "decoder_attention_mask": attention,
        }
    else:
        length = len(CAPTION)
        mod_dict["caption"] = {
            "tensor": torch.tensor([CAPTION] * B),
            "input_mask": torch.ones(B, length, dtype=torch.bool),
            "target_mask": torch.zeros(B, length, dtype=torch.bool),
            "decoder_attention_mask": torch.ones(B, length, dtype=torch.long),  # causal
        }
    return mod_dict


def our_batch(model, images: torch.Tensor, depth: torch.Tensor, shown: torch.Tensor, target: str) -> MaskedBatch:
    pixels, depth_index = model.modality_index("rgb_pixels"), model.modality_index("depth")
    positions = torch.arange(GRID * GRID)
    if target == "rgb":  # every patch (ids unused: the pixels are embedded), then the shown depth tokens
        inputs = {
            "modality": torch.cat([torch.full((GRID * GRID,), pixels), torch.full((len(shown),), depth_index)]),
            "position": torch.cat([positions, shown]),
        }
        patches = torch.zeros(GRID * GRID, dtype=torch.long)
        input_ids = torch.stack([torch.cat([patches, grid.reshape(-1)[shown]]) for grid in depth])
        n_target = GRID * GRID
        targets = {"modality": torch.full((n_target,), model.modality_index("rgb")), "position": positions}
        decoder_in = torch.zeros(B, n_target, dtype=torch.long)
    else:
        inputs = {"modality": torch.full((GRID * GRID,), pixels), "position": positions}
        input_ids = torch.zeros(B, GRID * GRID, dtype=torch.long)
        n_target = len(CAPTION) - 1
        targets = {
            "modality": torch.full((n_target,), model.modality_index("caption")),
            "position": torch.arange(n_target),
        }
        decoder_in = torch.tensor([CAPTION[:-1]] * B)
    n_input = input_ids.shape[1]
    return MaskedBatch(
        input_ids=input_ids,
        input_modality=inputs["modality"].expand(B, n_input),
        input_position=inputs["position"].expand(B, n_input),
        input_mask=torch.ones(B, n_input, dtype=torch.bool),
        target_ids=torch.zeros(B, n_target, dtype=torch.long),
        target_modality=targets["modality"].expand(B, n_target),
        target_position=targets["position"].expand(B, n_target),
        target_mask=torch.ones(B, n_target, dtype=torch.bool),
        decoder_input_ids=decoder_in,
        pixels={"rgb_pixels": images.to(torch.uint8)},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ml4m", type=Path, required=True, help="a local copy of apple/ml-4m")
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    sys.path.insert(0, str(args.ml4m))
    import fourm.models.fm as reference_module  # noqa: PLC0415 - only with the reference on the path

    # ml-4m samples from dict items, which Python 3.11 refuses (ml-4m targets 3.9): give it a list.
    sample = reference_module.random.sample
    reference_module.random.sample = lambda population, k: sample(list(population), k)
    FM = reference_module.FM

    torch.manual_seed(0)
    config = reference_config(args.dim)
    reference = FM(dict(config)).eval()
    with tempfile.TemporaryDirectory() as folder:  # stored as a release is: shared tensors under one name
        save_model(reference, f"{folder}/model.safetensors")
        weights = load_file(f"{folder}/model.safetensors")
    ours = convert(config, weights).model
    images = torch.randint(0, 256, (B, SIDE, SIDE, 3)).float()
    depth = torch.randint(0, 8192, (B, GRID, GRID))
    shown = torch.randperm(GRID * GRID)[:DEPTH_SHOWN].sort().values
    print(f"ml-4m FM dim {args.dim}, 2+2 layers: {sum(p.numel() for p in reference.parameters()):,} parameters")
    with torch.no_grad():
        for case, theirs_name, our_name, empty in (
            ("(a) pixels + depth -> rgb", "tok_rgb@224", "rgb", False),
            ("(b) pixels -> caption", "caption", "caption", False),
            ("(a0) nothing -> rgb", "tok_rgb@224", "rgb", True),
            ("(b0) nothing -> caption", "caption", "caption", True),
        ):
            mod_dict = ml4m_inputs(images, depth, shown, theirs_name)
            n_encoder = GRID * GRID + (DEPTH_SHOWN if theirs_name == "tok_rgb@224" else 0)
            n_decoder = GRID * GRID if theirs_name == "tok_rgb@224" else len(CAPTION) - 1
            batch = our_batch(ours, images, depth, shown, our_name)
            if empty:  # unconditional: no input anywhere (ml-4m: every input masked; ours: all padding)
                for entry in mod_dict.values():
                    entry["input_mask"] = torch.ones_like(entry["input_mask"])
                batch.input_mask = torch.zeros_like(batch.input_mask)
            theirs = reference(mod_dict, n_encoder, n_decoder, return_logits=True)[theirs_name]  # (B, M, V)
            logits = ours(batch)[ours.modality_index(our_name)]  # (B*M, V)
            difference = (logits - theirs.reshape(-1, theirs.shape[-1])).abs().max().item()
            scale = theirs.abs().max().item()
            shape = tuple(theirs.shape)
            print(f"{case}: logits {shape}, max |ours - ml-4m| = {difference:.3g} (largest logit {scale:.3g})")
    check_tokenizers(args.ml4m)


def stub_diffusers() -> None:
    """A stand-in ``diffusers``: the names ml-4m's code uses, every other one a do-nothing class or callable."""

    class Meta(type):
        def __iter__(cls):  # ml-4m iterates an enum of schedulers at class-definition time
            return iter(())

    class Stub(metaclass=Meta):
        def __init__(self, *args, **kwargs) -> None:
            pass

        def __call__(self, *args, **kwargs):
            return args[0] if args and callable(args[0]) else Stub()

    class ModelMixin(torch.nn.Module):
        @property
        def device(self) -> torch.device:
            return next(self.parameters()).device

    class Pipeline:
        def register_modules(self, **modules) -> None:
            self.__dict__.update(modules)

    def register_to_config(init):
        signature = inspect.signature(init)

        @functools.wraps(init)
        def wrapped(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            self.config = types.SimpleNamespace(**{k: v for k, v in bound.arguments.items() if k != "self"})
            init(self, *args, **kwargs)

        return wrapped

    def randn_tensor(shape, generator=None, device=None, dtype=None):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    known = {
        "ModelMixin": ModelMixin,
        "DiffusionPipeline": Pipeline,
        "register_to_config": register_to_config,
        "randn_tensor": randn_tensor,
    }

    class Module(types.ModuleType):
        def __getattr__(self, name: str):
            if name.startswith("__"):
                raise AttributeError(name)
            if name in known:
                return known[name]
            return Meta(name, (Stub,), {}) if name[0].isupper() else Stub()

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "diffusers":
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            return Module(spec.name)

        def exec_module(self, module) -> None:
            module.__path__ = []

    sys.meta_path.insert(0, Finder())


def check_divae() -> None:
    """(e): ml-4m's DiVAE and ours from its state dict: the same ids, the same decoded images."""
    from fourm.vq.scheduling import DDIMScheduler  # noqa: PLC0415 - only with the reference on the path
    from fourm.vq.vqvae import DiVAE  # noqa: PLC0415

    torch.manual_seed(0)
    config = {"image_size": 448, "n_channels": 3, "enc_type": "vit_b_enc", "dec_type": "unet_patched", "post_mlp": True}
    config |= {"prediction_type": "sample", "beta_schedule": "linear"}  # the released DiVAEs' diffusion settings
    reference = DiVAE(**config, patch_size=16, codebook_size=1024, latent_dim=32, norm_codes=True).eval()
    with torch.no_grad():  # ml-4m starts its output convolutions at zero: an all-zero UNet would prove nothing
        for name, parameter in reference.decoder.named_parameters():
            if not parameter.any():
                parameter.normal_(0, 0.02 if name.endswith("weight") else 0.01)
    photos = torch.rand(B, 3, SIDE, SIDE) * 2 - 1  # ml-4m's RGB tokenizers take [-1, 1]
    for sampler in ("ddpm", "ddim"):
        ours = load_ml4m_vqvae(config | {"scheduler": sampler}, reference.state_dict())
        with torch.no_grad():
            ids = reference.tokenize(photos)
            same = (ids == ours.tokenize(photos)).float().mean().item()
            settings = ("num_train_timesteps", "beta_schedule", "prediction_type", "thresholding", "zero_terminal_snr")
            ddim = DDIMScheduler(
                **{name: getattr(reference, name) for name in settings}, clip_sample=reference.clip_sample
            )
            pipeline = reference._get_pipeline(ddim if sampler == "ddim" else None)
            started = time.perf_counter()
            theirs = pipeline(
                reference.tokens_to_embedding(ids[:1]),
                generator=torch.Generator().manual_seed(0),
                timesteps=DIVAE_STEPS,
                image_size=SIDE,
                verbose=False,
            )
            theirs_seconds = (time.perf_counter() - started) / DIVAE_STEPS
            started = time.perf_counter()
            decoded = ours.decode_tokens(ids[:1], steps=DIVAE_STEPS, seed=0)
            our_seconds = (time.perf_counter() - started) / DIVAE_STEPS
        difference = (theirs - decoded).abs().max().item()
        print(
            f"(e) RGB-like DiVAE ({sampler}, {DIVAE_STEPS} steps): ids {tuple(ids.shape)}, {same:.1%} equal;"
            f" decoded max |ours - ml-4m| = {difference:.3g}; s/step at {SIDE} px: ours {our_seconds:.2f},"
            f" ml-4m {theirs_seconds:.2f}"
        )


def check_depth(ml4m: Path) -> None:
    """(f): this project's depth values, converted its way, give the ids ml-4m's own depth input gives."""
    from fourm.vq.vqvae import DiVAE  # noqa: PLC0415 - only with the reference on the path

    sys.modules.setdefault("albumentations", types.ModuleType("albumentations"))  # transforms never used here
    spec = importlib.util.spec_from_file_location("ml4m_transforms", ml4m / "fourm/data/modality_transforms.py")
    transforms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(transforms)
    standardise = transforms.DepthTransform.truncated_depth_standardization

    torch.manual_seed(0)
    config = {"image_size": 448, "n_channels": 1, "enc_type": "vit_b_enc", "dec_type": "unet_patched"}
    config |= {"post_mlp": True, "prediction_type": "sample", "beta_schedule": "linear"}
    reference = DiVAE(**config, patch_size=16, codebook_size=1024, latent_dim=32, norm_codes=True).eval()
    metres = torch.rand(B, 1, SIDE, SIDE).cumsum(dim=-1) / 20 + 0.5  # depth growing across each image
    low, high = metres.amin(dim=(1, 2, 3), keepdim=True), metres.amax(dim=(1, 2, 3), keepdim=True)
    stored = ((metres - low) / (high - low)).numpy()  # as the depth labeler scales it
    adapter = configured("depth", SIDE, {"quantity": "depth"})  # labels of Omnidata's depth
    ours = ML4MTokenizer("depth", adapter, load_ml4m_vqvae(config, reference.state_dict()), Path())
    with torch.no_grad():
        theirs = reference.tokenize(torch.stack([standardise(m) for m in metres])).flatten(1).numpy()
    same = (np.stack(ours.encode(list(stored))) == theirs).mean()
    print(f"(f) depth-like DiVAE, min-max scaled depth in: ids {theirs.shape}, {same:.1%} equal to ml-4m's")


def check_tokenizers(ml4m: Path) -> None:
    stub_diffusers()
    from fourm.vq.vqvae import VQVAE  # noqa: PLC0415 - only with the reference on the path

    cases = {
        "(c) semseg-like VQ-VAE": (
            {"image_size": 448, "n_channels": 64, "n_labels": 134, "codebook_size": 4096},
            torch.randint(0, 134, (B, SIDE, SIDE)),
        ),
        "(d) CLIP-like VQ-VAE": (
            {"image_size": 224, "n_channels": 512, "patch_proj": False, "codebook_size": 8192},
            torch.randn(B, 512, GRID, GRID),
        ),
    }
    check_divae()
    check_depth(ml4m)
    for case, (options, inputs) in cases.items():
        torch.manual_seed(0)
        config = {"enc_type": "vit_b_enc", "dec_type": "vit_b_dec", "patch_size": 16, "post_mlp": True, **options}
        reference = VQVAE(**config, latent_dim=32, norm_codes=True).eval()
        ours = load_ml4m_vqvae(config, reference.state_dict())
        with torch.no_grad():
            theirs_ids, our_ids = reference.tokenize(inputs), ours.tokenize(inputs)
            same = (theirs_ids == our_ids).float().mean().item()
            decoded = (reference.decode_tokens(theirs_ids) - ours.decode_tokens(theirs_ids)).abs().max().item()
        print(f"{case}: ids {tuple(our_ids.shape)}, {same:.1%} equal; decoded max |ours - ml-4m| = {decoded:.3g}")


if __name__ == "__main__":
    main()
