"""Caption pseudo-labels: BLIP's image captioning, one string per image beside the alt-text.

Production weights are ``Salesforce/blip-image-captioning-base``: a ViT-B/16 image encoder and a
BERT-base text decoder, which is prompted with its ``[DEC]`` token only (no text prompt, as BLIP's
base captioner is used). The stage stores the url list's alt-text beside each caption, so the two
can be compared or mixed later.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from transformers import (
    AutoTokenizer,
    BertTokenizerFast,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
)

from four_m.core.coco import COCO_PANOPTIC
from four_m.labelers.hf import load_model, normalisation, normalised
from four_m.labelers.pretrained import PretrainedLabeler
from four_m.modalities.caption import CaptionConfig

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DECODER_START = "[DEC]"
"""BLIP's decoder starts from this token (its ``bos_token``), as in the production tokenizer."""

CAPTION_WORDS = (
    "a an the this two three several many some of on in at with and near by under over behind next to"
    " for from its their is are sitting standing walking lying holding riding eating playing looking"
    " parked flying running hanging filled covered white black red blue green yellow brown gray orange"
    " small large big old young man woman men women boy girl child people group couple view close up"
    " top side front back field street city room kitchen table plate water grass beach park road"
)
"""Everyday caption words; with the COCO class names they make the tiny tokenizer's vocabulary."""

TINY_VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "projection_dim": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "patch_size": 16,
    # The production value (1e-10) leaves a random encoder nearly constant over images.
    "initializer_range": 0.02,
}
"""A ViT with one block: 16 px patches, as production, so a 64 px input is 16 image tokens."""
TINY_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "encoder_hidden_size": 32,  # = the vision hidden size: cross-attention reads image tokens
    "intermediate_size": 64,
    "projection_dim": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "max_position_embeddings": 64,
    # Ten times the production 0.02: at 0.02 cross-attention is too weak for a random decoder's
    # words to depend on the image, and a captioner that ignores its input would hide wiring mistakes.
    "initializer_range": 0.2,
}
"""A BERT decoder with one block; with the ~230-word vocabulary the model has about 60 k parameters
(the production one about 250 M)."""


PRODUCTION_VISION: dict[str, Any] = {
    # Salesforce/blip-image-captioning-large: ViT-L/16 at 384 px ...
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 16,
}
PRODUCTION_TEXT: dict[str, Any] = {
    # ... and a BERT-base decoder cross-attending to it.
    "hidden_size": 768,
    "encoder_hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 512,
}
PRODUCTION_VOCABULARY = 30524


def tiny_vocabulary() -> list[str]:
    """Special tokens, plain lowercase words (no ``##`` pieces), then ``[DEC]``: ids by position."""
    words = {w for name in COCO_PANOPTIC for w in re.split(r"[^a-z]+", name) if w}
    words |= set(CAPTION_WORDS.split())
    return [*SPECIAL_TOKENS, *sorted(words), DECODER_START]


class CaptionLabeler(PretrainedLabeler):
    """One generated caption per image from ``BlipForConditionalGeneration``."""

    name = "caption"
    keeps_alt_text = True
    cfg: CaptionConfig

    def schema(self) -> pa.Schema:
        return pa.schema([pa.field("caption", pa.string())])

    def build_tiny(self, directory: Path) -> None:
        self._build(directory, tiny_vocabulary(), TINY_VISION, TINY_TEXT, projection=32)

    def build_production(self, directory: Path) -> None:
        """BLIP-large's shapes; its 30,524-entry BERT vocabulary is not shipped offline, so the tiny
        words are padded with ``[unused<i>]`` entries to that size (the captions mean nothing anyway)."""
        words = tiny_vocabulary()
        padding = [f"[unused{i}]" for i in range(PRODUCTION_VOCABULARY - len(words))]
        self._build(directory, [*words[:-1], *padding, words[-1]], PRODUCTION_VISION, PRODUCTION_TEXT, projection=256)

    def _build(
        self, directory: Path, vocabulary: list[str], vision: dict[str, Any], text: dict[str, Any], projection: int
    ) -> None:
        tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocabulary)}, bos_token=DECODER_START)
        size = self.cfg.input_size
        config = BlipConfig(
            vision_config={**vision, "image_size": size},
            text_config={
                **text,
                "vocab_size": len(vocabulary),
                "bos_token_id": tokenizer.bos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
                "sep_token_id": tokenizer.sep_token_id,  # generation stops here
                "eos_token_id": tokenizer.sep_token_id,
            },
            projection_dim=projection,
            image_text_hidden_size=projection,
        )
        BlipForConditionalGeneration(config).save_pretrained(directory)
        image_processor = BlipImageProcessor(size={"height": size, "width": size})
        BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)

    def load(self, source: str, revision: str | None) -> None:
        self.model = load_model(BlipForConditionalGeneration, source, revision, self.device)
        self.mean, self.std = normalisation(source, revision)
        self.tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        # Position embeddings are learnt for one size; BLIP interpolates them for any other.
        self.interpolate = self.model.config.vision_config.image_size != self.cfg.input_size

    @torch.inference_mode()
    def label(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        tokens = self.model.generate(
            pixel_values=normalised(pixels, self.mean, self.std, self.device),
            interpolate_pos_encoding=self.interpolate,
            max_new_tokens=self.cfg.max_new_tokens,
            num_beams=self.cfg.num_beams,
        )  # (B, 1 + at most max_new_tokens): [DEC], the caption, [SEP] and padding
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return [{"caption": text.strip()} for text in texts]
