"""A released apple/ml-4m model (its ``config.json`` + ``model.safetensors``) as a :class:`FourM`.

What carries over, and how (ml-4m's names on the left, read from its ``fourm/models``):

- modalities by their ml-4m names, declared once per modality (``ModalitySpec.reference``:
  ``tok_depth@224`` is depth, ``rgb@224`` is rgb's pixel input ``rgb_pixels``, ``caption``...). Each
  gets a vocabulary of its own: ml-4m keeps one token table and one output head per modality, even
  where two share a tokenizer (caption and det);
- ``encoder_embeddings.<m>.token_emb`` / ``.proj`` -> the encoder's token table / patch embedding;
  ``decoder_embeddings.<m>.token_emb`` of a sequence -> the decoder's own table (``decoder_tables``;
  a map's is never read by ml-4m, whose map targets ask with the mask token, and is left behind);
  ``decoder_embeddings.<m>.to_logits`` -> the head; ``mod_emb`` -> the input and the target modality
  embedding rows (ml-4m shares one vector between both sides);
- ``attn.qkv`` is split into ``query`` and ``key_value`` (rows q, k, v), ``cross_attn.q`` / ``.kv``
  map one to one, ``attn.proj`` -> ``out``; the gated MLP's ``fc1`` (gate) and ``fc3`` (up) become
  ``gate_up`` and ``fc2`` ``down``; ``norm1``/``norm2``/``query_norm``/``context_norm`` -> the
  blocks' norms; ``decoder_proj_context`` -> ``context_projection``; ``mask_token`` as it is;
- no context token (ml-4m has none) and layer norms at ml-4m's epsilon (1e-6);
- a modality only among ``domains_out`` has no encoder embedding in ml-4m, and gets no token table
  here (``ModelModality.as_input``); one only among ``domains_in`` gets no head (``as_target``).

The fixed sin-cos positions (``pos_emb`` buffers) are not weights here: they are checked against
this model's own (same formula, MoCo-v3's) and must agree. Bias buffers of bias-free norms must be
zero. Every other key must be used: a checkpoint with a key this mapping does not know, or an
architecture setting it cannot reproduce exactly (biases, QK-norm, register tokens, a non-gated
MLP), is refused naming that key.

A modality of the checkpoint that has no counterpart here (4M-21's ``t5_caption``,
``human_poses``...) is refused too, unless it is named in ``leave_out``: its config entries and
``encoder_embeddings.<m>.*``/``decoder_embeddings.<m>.*`` weights are then taken out before the
conversion, and counted. The transformer does not depend on which modalities it was given, so the
rest converts exactly; the model just no longer reads or writes the ones left out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from four_m.core.errors import UserError
from four_m.core.modalities import MODALITIES, pixel_inputs
from four_m.train.model import FourM, ModelConfig, ModelModality, SwiGLU, sincos_1d, sincos_2d

NORM_EPS = 1e-6
"""ml-4m's ``LayerNorm(eps=1e-6)``."""
REQUIRED: Mapping[str, Any] = {
    "qkv_bias": False,
    "proj_bias": False,
    "mlp_bias": False,
    "norm_bias": False,
    "gated_mlp": True,
    "act_layer": "SiLU",
    "qk_norm": False,
    "num_register_tokens": 0,
    "decoder_causal_mask": False,
    "decoder_sep_mask": True,
    "share_modality_embeddings": True,
}
"""Architecture settings of ml-4m's released models (``fm_*_swiglu_nobias``) that this model
reproduces exactly; a checkpoint configured otherwise is refused. Absent keys take ml-4m's
``FourM`` defaults, which must match too."""
ML4M_DEFAULTS: Mapping[str, Any] = {
    "qkv_bias": True,
    "proj_bias": True,
    "mlp_bias": True,
    "norm_bias": True,
    "gated_mlp": False,
    "act_layer": "GELU",
    "qk_norm": False,
    "num_register_tokens": 0,
    "decoder_causal_mask": False,
    "decoder_sep_mask": True,
    "share_modality_embeddings": True,
}


class Import4MError(UserError):
    """A checkpoint this converter cannot reproduce exactly; the message names the key."""


@dataclass(frozen=True)
class Imported:
    model: FourM
    references: dict[str, str]
    """Our modality name -> its ml-4m name."""
    left_behind: tuple[str, ...]
    """Checkpoint keys ml-4m itself never reads (map targets' decoder token tables)."""
    left_out: dict[str, int]
    """ml-4m modality name -> how many of its checkpoint tensors were left out (``leave_out``)."""


def reference_names() -> dict[str, str]:
    """ml-4m name -> our modality name, for every modality (and pixel input) that declares one."""
    names = {spec.reference: name for name, spec in MODALITIES.items() if spec.reference}
    names |= {
        image.pixel_input.reference: name for name, image in pixel_inputs().items() if image.pixel_input.reference
    }
    return names


def model_config(config: Mapping[str, Any]) -> ModelConfig:
    """ml-4m's ``config.json`` -> our model config, once every setting is one this model reproduces."""
    for key, wanted in REQUIRED.items():
        value = config.get(key, ML4M_DEFAULTS[key])
        if value != wanted:
            raise Import4MError(f"config {key} = {value!r}: only ml-4m's {key} = {wanted!r} converts exactly")
    for key in ("dim", "encoder_depth", "decoder_depth", "num_heads"):
        if key not in config:
            raise Import4MError(f"config lacks {key}: not an ml-4m FourM config")
    return ModelConfig(
        dim=int(config["dim"]),
        encoder_layers=int(config["encoder_depth"]),
        decoder_layers=int(config["decoder_depth"]),
        heads=int(config["num_heads"]),
        mlp_ratio=float(config.get("mlp_ratio", 4.0)),
        norm_eps=NORM_EPS,
        context_token=False,
        decoder_tables=True,
    )


def model_modalities(config: Mapping[str, Any], weights: Mapping[str, Tensor]) -> list[ModelModality]:
    """The checkpoint's modalities as ours, in our registry's order, sized from its weights."""
    known = reference_names()
    domains = list(dict.fromkeys([*config.get("domains_in", []), *config.get("domains_out", [])]))
    unknown = [d for d in domains if d not in known]
    if unknown:
        raise Import4MError(
            f"config domains {unknown}: no modality here declares these ml-4m names"
            f" (known: {', '.join(sorted(known))}); LEAVE_OUT={','.join(unknown)} converts the rest without them"
        )
    pixels = pixel_inputs()
    modalities = []
    for domain in domains:
        name = known[domain]
        if name in pixels:
            modalities.append(ModelModality.pixels_of(pixels[name]))  # pixels[name]: its image's spec
            continue
        spec = MODALITIES[name]
        read, predicted = domain in config.get("domains_in", []), domain in config.get("domains_out", [])
        side = "encoder" if read else "decoder"
        table = _weight(weights, f"{side}_embeddings.{domain}.token_emb.weight")
        positions = _weight(weights, f"{side}_embeddings.{domain}.pos_emb").shape[1]
        modalities.append(
            ModelModality(
                name, spec.layout, table.shape[0], positions, vocabulary=name, as_input=read, as_target=predicted
            )
        )
    order = list(MODALITIES) + list(pixels)
    return sorted(modalities, key=lambda m: order.index(m.name))


def without(
    config: Mapping[str, Any], weights: Mapping[str, Tensor], leave_out: Sequence[str]
) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, int]]:
    """The checkpoint with the ``leave_out`` modalities taken out: (config, weights, tensors left out per modality)."""
    domains = [*config.get("domains_in", []), *config.get("domains_out", [])]
    strange = [d for d in leave_out if d not in domains]
    if strange:
        raise Import4MError(
            f"leave out {strange}: not among the checkpoint's domains ({', '.join(dict.fromkeys(domains))})"
        )
    owners = {d: (f"encoder_embeddings.{d}.", f"decoder_embeddings.{d}.") for d in leave_out}
    counts = {d: sum(key.startswith(prefixes) for key in weights) for d, prefixes in owners.items()}
    every = tuple(p for prefixes in owners.values() for p in prefixes)
    kept = {key: tensor for key, tensor in weights.items() if not key.startswith(every)}
    sides = {side: [d for d in config.get(side, []) if d not in owners] for side in ("domains_in", "domains_out")}
    return {**config, **sides}, kept, counts


def convert(config: Mapping[str, Any], weights: Mapping[str, Tensor], leave_out: Sequence[str] = ()) -> Imported:
    """The checkpoint as a :class:`FourM` (eval mode), every key used, checked or refused by name;
    the ``leave_out`` modalities (ml-4m names) taken out first."""
    check_checkpoint(config, weights)
    config, weights, left_out = without(config, weights, leave_out)
    model = FourM(model_config(config), model_modalities(config, weights)).eval()
    references = {name: ref for ref, name in reference_names().items() if name in {m.name for m in model.modalities}}
    mapped, used, left_behind = _mapped(model, config, weights, references)
    unused = sorted(set(weights) - used)
    if unused:
        raise Import4MError(f"checkpoint key {unused[0]} has no counterpart here ({len(unused)} such keys)")
    ours = model.state_dict()
    missing = sorted(set(ours) - set(mapped))
    if missing:
        raise Import4MError(f"nothing in the checkpoint fills {missing[0]} ({len(missing)} such weights)")
    for name, tensor in mapped.items():
        if tensor.shape != ours[name].shape:
            given, needed = tuple(tensor.shape), tuple(ours[name].shape)
            raise Import4MError(f"{name}: the checkpoint gives shape {given}, the model needs {needed}")
    model.load_state_dict(mapped, strict=True)
    return Imported(model, references, tuple(sorted(left_behind)), left_out)


WHOLE_NUMBERS = ("dim", "encoder_depth", "decoder_depth", "num_heads")
"""``config.json`` settings that count something: a JSON number without a fraction."""
DOMAIN_LISTS = ("domains_in", "domains_out")
MAX_MLP_RATIO = 64.0
"""Far above any released model's (4): a larger ``mlp_ratio`` is a broken config, refused before arithmetic on it."""


def check_checkpoint(config: object, weights: Mapping[str, Tensor]) -> None:
    """Refuse, naming the setting or the key, a checkpoint that would be misread or would build
    another model than its weights before anything is built: ``dim: 1e7`` or ``encoder_depth: 1e6``
    in a ``config.json`` would otherwise allocate gigabytes, ``dim: 32.9`` would be taken as 32 and
    an int8 weight cast to float. Settings the config lacks are left to :func:`model_config`."""
    check_config_types(config)
    check_weight_types(weights)
    check_sizes(config, weights)


def check_config_types(config: object) -> None:
    """An object of settings; whole numbers (>= 1) where ml-4m counts; an ``mlp_ratio`` in
    (0, ``MAX_MLP_RATIO``]; domain lists of names."""
    if not isinstance(config, Mapping):
        raise Import4MError(f"config.json is a JSON {type(config).__name__}, not an object of ml-4m's settings")
    for key in WHOLE_NUMBERS:
        value = config.get(key, 1)
        if not (_whole(value) and value >= 1):
            raise Import4MError(f"config.json {key} = {value!r}: not a whole number >= 1")
    ratio = config.get("mlp_ratio", 4.0)
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= MAX_MLP_RATIO:
        raise Import4MError(f"config.json mlp_ratio = {ratio!r}: not a number in (0, {MAX_MLP_RATIO:g}]")
    for key in DOMAIN_LISTS:
        domains = config.get(key, [])
        if not (isinstance(domains, list) and all(isinstance(d, str) for d in domains)):
            raise Import4MError(f"config.json {key} = {domains!r}: not a list of ml-4m modality names")


def _whole(value: object) -> bool:
    """A JSON number without a fraction (``32`` or ``32.0``, not ``32.9``; a bool is no number)."""
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, int) and not isinstance(value, bool)


def check_weight_types(weights: Mapping[str, Tensor]) -> None:
    """Every weight a floating-point tensor: loading would cast an integer one (a quantised
    checkpoint's int8) to float silently, into a model that means something else."""
    for key, tensor in sorted(weights.items()):
        if not tensor.is_floating_point():
            raise Import4MError(f"model.safetensors {key} is {tensor.dtype}: only floating-point weights convert")


def check_sizes(config: Mapping[str, Any], weights: Mapping[str, Tensor]) -> None:
    """``dim``, the depths, ``num_heads`` and ``mlp_ratio`` against the weights' shapes; the model
    is then no larger than its weights. The MLP's width is our model's own arithmetic, on the meta
    device (no memory)."""
    dim = _weight(weights, "encoder_norm.weight").numel()  # (D,)
    if "dim" in config and config["dim"] != dim:
        raise Import4MError(f"config.json dim = {config['dim']!r}, the weights are {dim} wide (encoder_norm.weight)")
    for key, part in (("encoder_depth", "encoder"), ("decoder_depth", "decoder")):
        blocks = len({m.group(1) for k in weights if (m := re.match(rf"{part}\.(\d+)\.", k))})
        if key in config and config[key] != blocks:
            raise Import4MError(f"config.json {key} = {config[key]!r}, the weights have {blocks} {part} blocks")
    heads = int(config.get("num_heads", 1))
    if dim % heads:
        raise Import4MError(f"config.json num_heads = {heads!r} does not divide dim {dim}")
    fc1 = _weight(weights, "encoder.0.mlp.fc1.weight").numel() // max(dim, 1)  # (hidden, D)
    ratio = config.get("mlp_ratio", 4.0)
    with torch.device("meta"):
        hidden = SwiGLU(ModelConfig(dim=dim, heads=heads, mlp_ratio=ratio)).down.in_features
    if hidden != fc1:
        raise Import4MError(
            f"config.json mlp_ratio = {ratio!r} makes MLPs {hidden} wide, the weights' are {fc1} (encoder.0.mlp.fc1)"
        )


def _weight(weights: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in weights:
        raise Import4MError(f"checkpoint lacks {key}")
    return weights[key]


def _mapped(
    model: FourM, config: Mapping[str, Any], weights: Mapping[str, Tensor], references: dict[str, str]
) -> tuple[dict[str, Tensor], set[str], set[str]]:
    """(our state dict, checkpoint keys used or checked, keys left behind)."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> Tensor:
        used.add(key)
        return _weight(weights, key)

    def norm(ours: str, theirs: str) -> None:
        out[f"{ours}.weight"] = take(f"{theirs}.weight")
        if f"{theirs}.bias" in weights:  # a bias-free norm's zero buffer
            if take(f"{theirs}.bias").abs().max() > 0:
                raise Import4MError(f"{theirs}.bias is not zero: a norm with a bias does not convert")

    def mlp(ours: str, theirs: str) -> None:
        out[f"{ours}.gate_up.weight"] = torch.cat([take(f"{theirs}.fc1.weight"), take(f"{theirs}.fc3.weight")])
        out[f"{ours}.down.weight"] = take(f"{theirs}.fc2.weight")

    def self_attention(ours: str, theirs: str) -> None:
        query, key, value = take(f"{theirs}.qkv.weight").chunk(3)
        out[f"{ours}.query.weight"] = query
        out[f"{ours}.key_value.weight"] = torch.cat([key, value])
        out[f"{ours}.out.weight"] = take(f"{theirs}.proj.weight")

    for i in range(model.config.encoder_layers):
        norm(f"encoder.{i}.attention_norm", f"encoder.{i}.norm1")
        self_attention(f"encoder.{i}.attention", f"encoder.{i}.attn")
        norm(f"encoder.{i}.mlp_norm", f"encoder.{i}.norm2")
        mlp(f"encoder.{i}.mlp", f"encoder.{i}.mlp")
    for i in range(model.config.decoder_layers):
        block = f"decoder.{i}"
        norm(f"{block}.self_attention_norm", f"{block}.norm1")
        self_attention(f"{block}.self_attention", f"{block}.self_attn")
        norm(f"{block}.cross_attention_norm", f"{block}.query_norm")
        norm(f"{block}.context_norm", f"{block}.context_norm")
        out[f"{block}.cross_attention.query.weight"] = take(f"{block}.cross_attn.q.weight")
        out[f"{block}.cross_attention.key_value.weight"] = take(f"{block}.cross_attn.kv.weight")
        out[f"{block}.cross_attention.out.weight"] = take(f"{block}.cross_attn.proj.weight")
        norm(f"{block}.mlp_norm", f"{block}.norm2")
        mlp(f"{block}.mlp", f"{block}.mlp")
    norm("encoder_norm", "encoder_norm")
    norm("decoder_norm", "decoder_norm")
    out["context_projection.weight"] = take("decoder_proj_context.weight")
    out["context_projection.bias"] = take("decoder_proj_context.bias")
    out["mask_token"] = take("mask_token").reshape(-1)

    inputs, targets = set(config.get("domains_in", [])), set(config.get("domains_out", []))
    D = model.config.dim
    rows = {"input_modality_embedding": [], "target_modality_embedding": []}
    left_behind: set[str] = set()
    for modality in model.modalities:
        reference = references[modality.name]
        # ml-4m shares one modality vector between the sides (share_modality_embeddings), which
        # safetensors stores under one of the two names; a side ml-4m never uses (pixels are never
        # a target) gets it too, and nothing reads it there.
        stored = [f"{side}_embeddings.{reference}.mod_emb" for side in ("encoder", "decoder")]
        shared = take(next((key for key in stored if key in weights), stored[0])).reshape(D)
        for key in stored:
            if key in weights and not torch.equal(take(key).reshape(D), shared):
                raise Import4MError(f"{key} differs from the other side's: only shared modality embeddings convert")
        for side, table, present in (
            ("encoder", "input_modality_embedding", reference in inputs),
            ("decoder", "target_modality_embedding", reference in targets),
        ):
            rows[table].append(shared)
            if present:
                prefix = f"{side}_embeddings.{reference}"
                _check_positions(take(f"{prefix}.pos_emb"), modality, D, prefix)
        if modality.layout == "pixels":
            out[f"patch_embeddings.{modality.name}.weight"] = take(f"encoder_embeddings.{reference}.proj.weight")
            continue
        vocabulary = modality.vocabulary
        if reference in inputs:
            out[f"token_embeddings.{vocabulary}.weight"] = take(f"encoder_embeddings.{reference}.token_emb.weight")
        if reference in targets:
            out[f"heads.{vocabulary}.weight"] = take(f"decoder_embeddings.{reference}.to_logits.weight")
            decoder_table = f"decoder_embeddings.{reference}.token_emb.weight"
            if modality.layout == "sequence":
                out[f"decoder_token_embeddings.{vocabulary}.weight"] = take(decoder_table)
            elif decoder_table in weights:
                used.add(decoder_table)
                left_behind.add(decoder_table)
    for table, vectors in rows.items():
        out[f"{table}.weight"] = torch.stack(vectors)
    return out, used, left_behind


def _check_positions(stored: Tensor, modality: ModelModality, dim: int, prefix: str) -> None:
    """ml-4m's fixed sin-cos buffer must be this model's positions: else the weights meant other ones."""
    count = stored.shape[1]
    index = torch.arange(count)
    if modality.layout == "sequence":
        ours = sincos_1d(index, dim)
    else:
        side = math.isqrt(count)
        ours = sincos_2d(index // side, index % side, dim)
    if not torch.allclose(stored.reshape(count, dim).float(), ours, atol=1e-3):  # float32 angles differ a little
        raise Import4MError(f"{prefix}.pos_emb: not the fixed sin-cos positions this model uses (learned ones?)")
