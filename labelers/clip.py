"""CLIP feature-map pseudo-labels: projected patch tokens, (grid * grid * dim) float16 per image.

4M's CLIP modality is the dense feature map of CLIP-B/16, not its pooled embedding: every patch
token of the last layer, put through the same final layer norm and projection as the CLS token, so
each patch lives in the joint image-text space. At 224 px and patch 16 that is 14 x 14 x 512,
stored row-major (patch row, patch column, channel) and in float16, which halves the bytes and is
the precision the features are later tokenised from anyway.

Beside the map, the same forward pass gives what curation reads (``filters/``): the image's own
embedding (the CLS token, projected, unit length: ``clip_embedding``) and, through CLIP's text
tower, its cosine similarity to the row's alt-text (``caption_similarity``, null without one).
Production loads both towers from one CLIP checkpoint and its tokenizer; the random-init variant
saves a whole ``CLIPModel`` and a byte-level CLIP tokenizer (every byte a token, no merges: the
real BPE vocabulary is a hub download), which a real checkpoint's replaces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
    CLIPVisionConfig,
)
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from four_m.labelers.features import FeatureMapLabeler
from four_m.labelers.hf import load_model, normalisation, normalised

TINY_CLIP: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "patch_size": 16,
    # The production projection width, so tiny and production share one schema.
    "projection_dim": 512,
}


TINY_CLIP_TEXT: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
}

PRODUCTION_CLIP_TEXT: dict[str, Any] = {
    # openai/clip-vit-base-patch16's text tower (its BPE vocabulary of 49,408).
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "vocab_size": 49_408,
}

EMBEDDING = "clip_embedding"
SIMILARITY = "caption_similarity"
START, END = "<|startoftext|>", "<|endoftext|>"


PRODUCTION_CLIP: dict[str, Any] = {
    # openai/clip-vit-base-patch16's vision tower and projection.
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "patch_size": 16,
    "projection_dim": 512,
}


class ClipLabeler(FeatureMapLabeler):
    """Patch-token features of a ``CLIPModel``'s image tower, its image embedding and its
    similarity to the caption (production: CLIP-B/16)."""

    name = "clip"
    tiny_marker = "done-both-towers"  # the tiny folder held the vision tower alone before

    def vision_config(self) -> CLIPVisionConfig:
        """The vision tower's config; from a full CLIP checkpoint this reads its ``vision_config``."""
        return CLIPVisionConfig.from_pretrained(self.source, revision=self.cfg.revision)

    def patch_and_dim(self) -> tuple[int, int]:
        config = self.vision_config()
        return config.patch_size, config.projection_dim

    def schema(self) -> pa.Schema:
        _, dim = self.patch_and_dim()
        extra = [pa.field(EMBEDDING, pa.list_(pa.float16(), dim)), pa.field(SIMILARITY, pa.float32())]
        return pa.schema([*super().schema(), *extra])

    def build_tiny(self, directory: Path) -> None:
        self._build(directory, TINY_CLIP, TINY_CLIP_TEXT)

    def build_production(self, directory: Path) -> None:
        self._build(directory, PRODUCTION_CLIP, PRODUCTION_CLIP_TEXT)

    def _build(self, directory: Path, sizes: dict[str, Any], text: dict[str, Any]) -> None:
        size = self.cfg.input_size
        vocabulary = _byte_vocabulary()
        vision = {k: v for k, v in sizes.items() if k != "projection_dim"}
        text = {"vocab_size": len(vocabulary), **text}
        config = CLIPConfig(
            text_config={**text, "bos_token_id": vocabulary[START], "eos_token_id": vocabulary[END]},
            vision_config={**vision, "image_size": size},
            projection_dim=sizes["projection_dim"],
        )
        CLIPModel(config).save_pretrained(directory)
        CLIPTokenizer(vocab=vocabulary, merges=[]).save_pretrained(directory)
        processor = CLIPImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=OPENAI_CLIP_MEAN,
            image_std=OPENAI_CLIP_STD,
        )
        processor.save_pretrained(directory)

    def load(self, source: str, revision: str | None) -> None:
        self.model = load_model(CLIPModel, source, revision, self.device)
        self.tokenizer = CLIPTokenizer.from_pretrained(source, revision=revision)
        self.mean, self.std = normalisation(source, revision)

    def label_batch(self, batch) -> list[dict[str, Any]]:
        payloads, embeddings = self._image(batch.pixels)
        # A batch built from pixels alone (a bench, a caller without a url list) has no captions.
        similarities = self._similarities(embeddings, batch.alt_texts or [None] * len(payloads))
        for payload, embedding, similarity in zip(payloads, embeddings, similarities, strict=True):
            payload[EMBEDDING] = embedding.to(torch.float16).cpu().numpy()
            payload[SIMILARITY] = similarity
        return payloads

    def label(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        payloads, embeddings = self._image(pixels)
        for payload, embedding in zip(payloads, embeddings, strict=True):
            payload[EMBEDDING] = embedding.to(torch.float16).cpu().numpy()
            payload[SIMILARITY] = None
        return payloads

    @torch.inference_mode()
    def _similarities(self, images: torch.Tensor, captions: list[str | None]) -> list[float | None]:
        """Cosine similarity of each image embedding and its caption's (None without a caption)."""
        present = [i for i, c in enumerate(captions) if c]
        out: list[float | None] = [None] * len(captions)
        if not present:
            return out
        tokens = self.tokenizer(
            [captions[i] for i in present], padding=True, truncation=True, max_length=77, return_tensors="pt"
        ).to(self.device)
        pooled = self.model.text_model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).pooler_output
        texts = self.model.text_projection(pooled).float()
        texts = texts / texts.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        for row, value in zip(present, (images[present].float() * texts).sum(-1).tolist(), strict=True):
            out[row] = value
        return out

    @torch.inference_mode()
    def _image(self, pixels: np.ndarray) -> tuple[list[dict[str, Any]], torch.Tensor]:
        """The feature maps' payloads and the unit-length image embeddings, from one pass."""
        vision = self.model.vision_model
        # At the checkpoint's own size transformers returns the stored position embeddings
        # unchanged; at any other input_size it interpolates them to the new grid.
        hidden = vision(
            pixel_values=normalised(pixels, self.mean, self.std, self.device), interpolate_pos_encoding=True
        ).last_hidden_state  # (B, 1 + N, hidden)
        normed = vision.post_layernorm(hidden)  # CLS and patches: (B, 1 + N, hidden)
        features = self.model.visual_projection(normed)  # (B, 1 + N, dim)
        flat = features[:, 1:].to(torch.float16).flatten(1).cpu().numpy()  # the map: (B, N * dim)
        embeddings = features[:, 0].float()
        return self.payloads(flat), embeddings / embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _byte_vocabulary() -> dict[str, int]:
    """CLIP's byte-level alphabet with and without the end-of-word mark, and its two specials: a
    CLIP tokenizer with no merges (every byte a token) that needs no download."""
    characters = sorted(ByteLevel.alphabet())
    tokens = characters + [f"{c}</w>" for c in characters] + [START, END]
    return {token: index for index, token in enumerate(tokens)}
