"""Start a model from another run's weights: what both models have is copied, what is new stays freshly
initialised and is named.

4M's fine-tunes and its 4M-21 models start from a trained 4M (4M-21 from 4M-7, adding modalities).
Weights correspond by *meaning*, not by position: the transformer (encoder, decoder, their norms,
the context projection, the mask and context tokens) by name; token tables and output heads by
vocabulary; patch embeddings by pixel input; and the rows of the input and target modality
embeddings by modality name, since a modality's index differs between two runs with different
modality lists. A vocabulary whose size changed (a retrained tokenizer with another codebook) has
no meaningful copy and stops the transfer, naming its modalities.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from four_m.core.errors import UserError
from four_m.train.model import FourM

MODALITY_ROWS = ("input_modality_embedding.weight", "target_modality_embedding.weight")
"""Weights with one row per modality, indexed by the model's modality list."""
PER_VOCABULARY = ("token_embeddings.", "decoder_token_embeddings.", "heads.")
"""Weights named after a vocabulary (their second name part)."""


class TransferError(UserError):
    """The source run's weights cannot start this model: another architecture, or a vocabulary resized."""


@dataclass
class Transfer:
    """What a transfer did, by name, for the log and the run's record."""

    copied: list[str] = field(default_factory=list)
    """Weights copied whole."""
    kept_modalities: list[str] = field(default_factory=list)
    """Modalities of both runs: their embeddings and heads come from the source."""
    new_modalities: list[str] = field(default_factory=list)
    """Modalities only this model has: freshly initialised embeddings (and heads, unless their
    vocabulary is shared with a kept modality, as 4M-21's text modalities share the caption's)."""
    dropped_modalities: list[str] = field(default_factory=list)
    """Modalities only the source had: their weights are left behind."""
    fresh: list[str] = field(default_factory=list)
    """Weights of kept modalities the source has no counterpart of, freshly initialised: the token
    table of a modality an imported model only predicted (ml-4m's ``domains_out`` alone), the head
    of one it only read."""
    regridded: list[str] = field(default_factory=list)
    """Kept maps and pixel inputs whose grid differs from the source's (another crop size, such as an
    imported 224 px model fine-tuned on smaller crops): their sin-cos positions follow this run's
    grid, where the source learned them on its own. Named, not refused: it can be meant."""

    def lines(self) -> list[str]:
        regridded = [f"transfer: another token grid than the source's: {', '.join(self.regridded)}"]
        return [
            f"transfer: {len(self.copied)} weights copied; modalities kept {self.kept_modalities or 'none'}",
            f"transfer: new (freshly initialised) {self.new_modalities or 'none'};"
            f" left behind {self.dropped_modalities or 'none'}",
            *(regridded if self.regridded else []),
            *(
                [f"transfer: kept modalities' weights the source lacks, new: {', '.join(self.fresh)}"]
                if self.fresh
                else []
            ),
        ]


def transfer_weights(source: FourM, target: FourM) -> Transfer:
    """Copy ``source``'s weights into ``target`` where they correspond (see the module docstring)."""
    if source.config != target.config:
        raise TransferError(
            f"the source run's model is {source.config}, this run's is {target.config}: a transfer keeps the size"
            " (set train.model to the source run's)"
        )
    _check_vocabularies(source, target)
    source_modalities = {m.name: m for m in source.modalities}
    report = Transfer(
        kept_modalities=[m.name for m in target.modalities if m.name in source_modalities],
        new_modalities=[m.name for m in target.modalities if m.name not in source_modalities],
        dropped_modalities=[m.name for m in source.modalities if m.name not in {t.name for t in target.modalities}],
        regridded=[
            f"{m.name} ({source_modalities[m.name].positions} -> {m.positions} positions)"
            for m in target.modalities
            if m.name in source_modalities
            and m.layout != "sequence"
            and source_modalities[m.name].positions != m.positions
        ],
    )
    theirs, ours = source.state_dict(), target.state_dict()
    kept_vocabularies = {m.vocabulary for m in target.modalities if m.name in source_modalities}
    with torch.no_grad():
        for name, weight in ours.items():
            if name in MODALITY_ROWS:
                for index, modality in enumerate(target.modalities):
                    if modality.name in source_modalities:
                        weight[index] = theirs[name][source.modality_index(modality.name)]
                report.copied.append(f"{name} (rows of {report.kept_modalities})")
            elif name in theirs and theirs[name].shape == weight.shape:
                weight.copy_(theirs[name])
                report.copied.append(name)
            elif name.startswith(PER_VOCABULARY) and name.split(".")[1] in kept_vocabularies:
                report.fresh.append(name)
    return report


def _check_vocabularies(source: FourM, target: FourM) -> None:
    """Every vocabulary of both models has one size on both sides, else name its modalities."""
    theirs = {m.vocabulary: m.vocab_size for m in source.modalities if m.layout != "pixels"}
    resized = [
        m for m in target.modalities if m.layout != "pixels" and theirs.get(m.vocabulary, m.vocab_size) != m.vocab_size
    ]
    if resized:
        listed = ", ".join(f"{m.name} ({theirs[m.vocabulary]} -> {m.vocab_size} ids)" for m in resized)
        raise TransferError(
            f"vocabularies changed size since the source run: {listed}; its embeddings and heads cannot be"
            " carried over: tokenize with the source run's tokenizers, or leave those modalities out"
        )
