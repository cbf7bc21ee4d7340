"""Typed run configuration: dataclasses <- YAML <- command-line overrides.

Every field is checked when the config is built: a typo in a key, a wrong type or an out-of-range
value stops the run before any work, naming the key. The resolved config is written into the
dataset root by every stage (see ``core.dataset_root``), so a run can always be traced back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from four_m.core.errors import UserError
from four_m.core.modalities import (
    MODALITIES,
    input_modalities,
    labelled_modalities,
    map_modalities,
    of_kind,
    token_modalities,
)
from four_m.core.precision import PRECISIONS
from four_m.core.weights import pin_problem

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SECTIONS = "sections"
FILTER_CONFIG = "filter_config"
"""Field metadata: the field holds one config section per modality, keyed by modality name, written
in YAML as keys of the enclosing section (``label.depth``, ``tokenize.rgb``); the value names the
``ModalitySpec`` attribute that holds a modality's defaults (and so its section's class)."""
RUNTIME_ONLY = {"runtime_only": True}
"""Field metadata: the field tunes speed, not output, so changing it does not make shards stale."""
SHAPING_IF_SET = {"shaping_if_set": True}
"""Field metadata: the field shapes output, but enters the hash only when set to another value than
its default. For fields added to a section later: shards made before they existed keep their hash."""
RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""A config value that names a folder under the root: one plain path component (see ``_check_folder_name``)."""


class ConfigError(UserError):
    """A config file or override that cannot be used; the message names the key."""


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None
    """None: the cluster in ``RAY_ADDRESS`` if set (``ray job submit`` sets it), else Ray started on
    this machine; "auto" or "ray://host:10001" joins a running cluster."""
    num_cpus: int | None = None
    """CPUs of a locally started Ray (None: all of this machine's)."""
    object_store_mb: int | None = None
    """Object store of a locally started Ray (None: Ray's default, 30% of memory)."""

    def __post_init__(self) -> None:
        check(self.num_cpus is None or self.num_cpus >= 1, "ray.num_cpus", "must be >= 1")
        check(self.object_store_mb is None or self.object_store_mb >= 64, "ray.object_store_mb", ">= 64")


@dataclass(frozen=True)
class DownloadConfig:
    urls: str = "urls"
    """A url list (.tsv, .tsv.gz, .parquet) or a folder of them; relative paths are under the root."""
    input_format: str = "auto"
    """tsv | parquet | auto (from the file extension)."""
    tsv_header: str = "auto"
    """yes | no | auto. CC12M's tsv has none: auto reads a header only if its first field is `url_col`."""
    url_col: str = "url"
    caption_col: str | None = "caption"
    samples_per_shard: int = 10_000
    image_size: int = 256
    """Shorter side after resizing: 4M trains on random 224 px crops, so keep a margin above 224."""
    resize_mode: str = "keep_ratio"
    resize_only_if_bigger: bool = False
    encode_format: str = "jpg"
    encode_quality: int = 95
    threads_per_shard: int = field(default=64, metadata=RUNTIME_ONLY)
    """Concurrent HTTP requests inside one shard task (downloads wait on the network, not the CPU)."""
    cpus_per_shard: float = field(default=1.0, metadata=RUNTIME_ONLY)
    """Ray CPUs reserved by one shard task: resizing is the CPU-bound part."""
    timeout_s: float = 10.0
    """Longest wait for the connection or for any one socket read (urllib's timeout)."""
    deadline_s: float = field(default=60.0, metadata=RUNTIME_ONLY)
    """Longest time for one whole request: connection, headers, body and redirects. ``timeout_s``
    alone would let a server that sends a byte every few seconds hold a thread, and its shard,
    for as long as it likes; a minute fetches a large photo over a slow link. Runtime-only: it
    decides which slow urls fail, as the network's weather does, not how a fetched image is made,
    and shards finished before it existed stay valid."""
    retries: int = 0
    max_image_pixels: int = 89_478_485
    """Larger images are refused as decompression bombs (Pillow's own default limit)."""
    max_image_bytes: int = field(default=64 * 2**20, metadata=SHAPING_IF_SET)
    """A body longer than this is refused after reading this many bytes, not read to its end: a
    server (or a user's ``IMAGE=/dev/zero``) could otherwise fill the memory. 64 MiB is about twice
    a photo's JPEG at the pixel limit. Shaping only when set: roots downloaded before it stay valid."""
    min_image_size: int = 0
    allowed_schemes: tuple[str, ...] = ("http", "https")
    """Anything else (file://, ftp://) is a counted failure: urllib would happily read local files."""
    user_agent_token: str | None = "four-m"

    def __post_init__(self) -> None:
        check(self.input_format in ("auto", "tsv", "parquet"), "download.input_format", "auto|tsv|parquet")
        check(self.tsv_header in ("auto", "yes", "no"), "download.tsv_header", "auto|yes|no")
        check(self.samples_per_shard >= 1, "download.samples_per_shard", "must be >= 1")
        check(16 <= self.image_size <= 4096, "download.image_size", "must be in [16, 4096]")
        check(self.resize_mode in RESIZE_MODES, "download.resize_mode", "|".join(RESIZE_MODES))
        check(self.encode_format in ("jpg", "png", "webp"), "download.encode_format", "jpg|png|webp")
        check(self.threads_per_shard >= 1, "download.threads_per_shard", "must be >= 1")
        check(self.cpus_per_shard > 0, "download.cpus_per_shard", "must be > 0")
        check(self.timeout_s > 0, "download.timeout_s", "must be > 0")
        check(self.deadline_s > 0, "download.deadline_s", "must be > 0")
        check(self.retries >= 0, "download.retries", "must be >= 0")
        check(self.max_image_pixels >= 1, "download.max_image_pixels", "must be >= 1")
        check(self.max_image_bytes >= 1, "download.max_image_bytes", "must be >= 1")
        check(len(self.allowed_schemes) > 0, "download.allowed_schemes", "must name a scheme")


@dataclass(frozen=True)
class SampleConfig:
    enabled: bool = False
    """The url list is the embedded sample: built under the root if missing, served during download."""
    host: str = "127.0.0.1"
    port: int = 47823
    """Fixed, so the url list (and so the download plan) is the same from one run to the next."""
    extra_images: str | None = None
    """A folder of the user's own photos to add to the sample."""
    plant_failures: bool = True
    """Add a 404, a non-image body, a truncated JPEG and a file:// url, to show failure accounting."""
    plant_duplicates: bool = False
    """Add copies of the first photos at other urls (the same bytes, re-encoded, resized, cropped
    by a few pixels), for the curate stage to find: the demo shows what it removes."""
    photos: int | None = field(default=None, metadata=SHAPING_IF_SET)
    """At most this many photos, the first ones (bundled, then ``extra_images``); null: all. The dry
    run takes a few: each costs production's networks minutes of CPU."""

    def __post_init__(self) -> None:
        check(0 < self.port < 65536, "sample.port", "must be in 1..65535")
        check(self.photos is None or self.photos >= 1, "sample.photos", "must be >= 1 (or null: all)")


@dataclass(frozen=True)
class LabelerConfig:
    model: str | None = None
    """A hub id or a local directory; null builds the tiny random-init variant (labels say so)."""
    revision: str | None = None
    """The commit of a hub ``model`` to use, its full 40-hex hash: required for a hub id (a branch
    or tag moves), unused for a local folder or file (``core/weights.py``)."""
    input_size: int = 224
    """Side of the square RGB input; labelers sharing a size share one resize."""
    batch_size: int = field(default=8, metadata=RUNTIME_ONLY)
    concurrency: int = field(default=1, metadata=RUNTIME_ONLY)
    """Actors in this labeler's pool."""
    num_cpus: float = field(default=0.5, metadata=RUNTIME_ONLY)
    """Per actor. Fractional on purpose: six whole-CPU pools cannot all be placed on 2 cores."""
    num_gpus: float = field(default=0.0, metadata=RUNTIME_ONLY)
    """Per actor; a fraction lets several labelers share one GPU."""
    precision: str = field(default="auto", metadata=RUNTIME_ONLY)
    """auto (bf16 autocast on a GPU that has it, else fp16; fp32 on a CPU), 32, bf16 or fp16. A
    network's labels differ by rounding between settings, not in kind; the run's config records it."""
    channels_last: bool = field(default=True, metadata=RUNTIME_ONLY)
    """On a GPU, the model in channels-last memory format (faster convolutions)."""
    compile: bool = field(default=False, metadata=RUNTIME_ONLY)
    """Wrap the model in ``torch.compile`` (worth it for long runs: compiling takes minutes)."""
    random_size: str = field(default="tiny", metadata=SHAPING_IF_SET)
    """With ``model: null``: tiny (a small config of the production architecture, for tests and the
    demo) or production (the production model's own configuration, full size, random weights: the
    dry run, ``configs/cc12m-dryrun.yaml``). Either way the labels say random-init."""
    timeout_s: float = field(default=600.0, metadata=RUNTIME_ONLY)
    """Time limit of one batch: a batch past it is retried row by row, and a row past it alone is
    recorded as ``labeler_timeout`` with its key, so one pathological image never stalls the pool.
    Generous by default: a slow batch is not a hung one."""

    def __post_init__(self) -> None:
        check(16 <= self.input_size <= 2048, "label.*.input_size", "must be in [16, 2048]")
        check(self.timeout_s > 0, "label.*.timeout_s", "must be > 0 seconds")
        check(self.random_size in ("tiny", "production"), "label.*.random_size", "tiny or production")
        check(self.precision in PRECISIONS, "label.*.precision", f"one of {', '.join(PRECISIONS)}")
        check(self.batch_size >= 1, "label.*.batch_size", "must be >= 1")
        check(self.concurrency >= 1, "label.*.concurrency", "must be >= 1")
        check(self.num_cpus > 0, "label.*.num_cpus", "must be > 0")
        check(self.num_gpus >= 0, "label.*.num_gpus", "must be >= 0")

    @property
    def random_init(self) -> bool:
        """A network without configured weights labels with random ones (its tiny or full-size
        variant): known from the config alone, so the stage's driver says so without loading it."""
        return self.model is None

    def at_dry_run_scale(self) -> LabelerConfig:
        """These settings at ``make dryrun``'s scale: the same architecture and input size, less of the
        work a labeler repeats within one image (prompts), so that a CPU finishes; the dry run's cost
        table projects production's cost from it. Unchanged unless a labeler's modality says otherwise."""
        return self


@dataclass(frozen=True)
class LabelConfig:
    size: int = 224
    """Side of the canonical view (centred square of the shorter side) that every label is defined on."""
    labelers: tuple[str, ...] = field(default_factory=lambda: labelled_modalities())
    """Which labelers run (default: every registered modality that has one)."""
    actor_groups: tuple[tuple[str, ...], ...] = field(default=(), metadata=RUNTIME_ONLY)
    """Labelers that share one actor pool (e.g. all six on a 2-core machine); others get a pool each.

    A group's actor takes the sum of its members' CPUs and GPUs, the smallest batch size and the
    largest concurrency.
    """
    sections: dict[str, LabelerConfig] = field(
        default_factory=lambda: _defaults("labeler_config"), metadata={SECTIONS: "labeler_config"}
    )
    """``label.<modality>``: each labelled modality's settings, its declared defaults where not set."""

    def __post_init__(self) -> None:
        check(16 <= self.size <= 2048, "label.size", "must be in [16, 2048]")
        known = labelled_modalities()
        unknown = sorted(set(self.labelers) - set(known))
        check(not unknown, "label.labelers", f"unknown {unknown}; known: {', '.join(known)}")
        grouped = [n for group in self.actor_groups for n in group]
        check(set(grouped) <= set(known), "label.actor_groups", f"names must be among {known}")
        check(len(grouped) == len(set(grouped)), "label.actor_groups", "a labeler may be in one group only")
        for name, section in self.sections.items():
            problem = pin_problem(section.model, section.revision)
            check(problem is None, f"label.{name}.revision", problem or "")

    def labeler(self, name: str) -> LabelerConfig:
        return self.sections[name]

    def pools(self, names: list[str]) -> list[list[str]]:
        """The actor pools for running ``names``: the configured groups (restricted), then singles."""
        pools = [[n for n in group if n in names] for group in self.actor_groups]
        pools = [p for p in pools if p]
        grouped = {n for p in pools for n in p}
        return pools + [[n] for n in names if n not in grouped]

    def pool_settings(self, pool: list[str]) -> LabelerConfig:
        """One actor pool's resources: its members' CPUs and GPUs summed, the smallest batch, the
        largest concurrency (see ``actor_groups``)."""
        members = [self.labeler(n) for n in pool]
        return LabelerConfig(
            batch_size=min(c.batch_size for c in members),
            concurrency=max(c.concurrency for c in members),
            num_cpus=sum(c.num_cpus for c in members),
            num_gpus=sum(c.num_gpus for c in members),
        )


@dataclass(frozen=True)
class AlgorithmConfig(LabelerConfig):
    """A labeler that is an algorithm (Canny edges, palettes, metadata): it has no weights, so
    ``model`` stays unset, and its labels are real ones (the card says "algorithm", not "random-init")."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.model is None, "label.<algorithm>.model", "an algorithm has no weights: leave model unset")

    @property
    def random_init(self) -> bool:
        """Its own labels are real; one that reads random-init labels is flagged by the label stage."""
        return False


@dataclass(frozen=True)
class CurateConfig:
    """``make curate``: the filters that run, and how (see docs/curation.md)."""

    filters: tuple[str, ...] = ()
    """Which filters decide, in order (a row removed by several counts under the first); the
    ``image`` ones run before labelling, the ``label`` ones once their labels exist. Empty: no
    curation, every row goes on."""
    partitions: int = field(default=16, metadata=RUNTIME_ONLY)
    """Buckets of the duplicate searches' shuffle: a reduce task each, so a cluster shares them."""
    num_cpus: float = field(default=1.0, metadata=RUNTIME_ONLY)
    """Ray CPUs of one curate task (a shard's scores, a shuffle partition, a shard's decisions)."""
    sections: dict[str, Any] = field(
        default_factory=lambda: _defaults(FILTER_CONFIG), metadata={SECTIONS: FILTER_CONFIG}
    )
    """``curate.<filter>``: each filter's threshold and settings, its declared defaults where not set."""

    def __post_init__(self) -> None:
        known = sorted(self.sections)
        unknown = sorted(set(self.filters) - set(known))
        check(not unknown, "curate.filters", f"unknown {unknown}; known: {', '.join(known)}")
        check(len(set(self.filters)) == len(self.filters), "curate.filters", "names repeat")
        check(self.partitions >= 1, "curate.partitions", "must be >= 1")
        for name, section in self.sections.items():
            if hasattr(section, "model"):  # a head's weights: a hub id must name its commit
                problem = pin_problem(section.model, section.revision)
                check(problem is None, f"curate.{name}.revision", problem or "")

    def filter(self, name: str) -> Any:
        return self.sections[name]


@dataclass(frozen=True)
class VQConfig:
    """One map modality's VQ tokenizer: its size and how it is trained (``make tokenizers``)."""

    codebook_size: int = 1024
    """Token vocabulary of this modality (4M uses 8k-16k for rgb at scale; small runs need fewer)."""
    code_dim: int = 32
    """Width of a code vector: low-dimensional, l2-normalised codes stay alive (ViT-VQGAN's finding)."""
    width: int = 64
    """Channels of the first encoder stage; doubled at each downsampling, capped at 4x."""
    grid: int = 14
    """Tokens per side: 14 x 14 at 224 px, as 4M."""
    blocks_from_stage: int = 0
    """Residual blocks only at this downsampling stage and coarser (0: at every resolution). The
    full-resolution stages cost most of the compute: 2 makes a CPU demo ~10x cheaper."""
    steps: int = 300
    batch_size: int = 8
    learning_rate: float = 1e-3
    commitment: float = 0.25
    """Weight of the encoder's commitment loss (VQ-VAE's beta)."""
    ema_decay: float = 0.99
    """Codebook vectors follow an exponential moving average of their assigned encodings."""
    dead_after: int = 50
    """A code unused for this many steps is restarted on a random recent encoding."""
    seed: int = 0
    source: str | None = field(default=None, metadata=SHAPING_IF_SET)
    """A released ml-4m tokenizer's folder (``config.json`` + ``model.safetensors``, e.g.
    EPFL-VILAB/4M_tokenizers_semseg_4k_224-448) that ``make tokenizers`` imports instead of training
    one (ViT VQ-VAEs: semseg, CLIP, DINOv2; DiVAEs: RGB, normals, edges;
    ``tokenize/ml4m_tokenizer.py``); None: train."""
    share: str | None = field(default=None, metadata=SHAPING_IF_SET)
    """Use another map's tokenizer instead of training one (4M-21 tokenizes SAM edges with the
    Canny edge tokenizer): ``tokenize.sam_edge.share: canny_edge``. Both must be of one kind, and
    the shared one is trained on its own modality's labels only."""

    def __post_init__(self) -> None:
        check(2 <= self.codebook_size <= 65536, "tokenize.*.codebook_size", "must be in [2, 65536] (uint16 ids)")
        check(self.code_dim >= 2, "tokenize.*.code_dim", "must be >= 2")
        check(self.width >= 4, "tokenize.*.width", "must be >= 4")
        check(self.grid >= 1, "tokenize.*.grid", "must be >= 1")
        check(self.blocks_from_stage >= 0, "tokenize.*.blocks_from_stage", "must be >= 0")
        check(self.steps >= 1, "tokenize.*.steps", "must be >= 1")
        check(self.batch_size >= 1, "tokenize.*.batch_size", "must be >= 1")
        check(self.learning_rate > 0, "tokenize.*.learning_rate", "must be > 0")
        check(0.0 < self.ema_decay < 1.0, "tokenize.*.ema_decay", "must be in (0, 1)")
        check(self.dead_after >= 1, "tokenize.*.dead_after", "must be >= 1")


@dataclass(frozen=True)
class TextTokenizerConfig:
    """The WordPiece vocabulary shared by captions and boxes, as in 4M."""

    vocab_size: int = 30_000
    """WordPiece's target size for words; special, sentinel, coordinate and class tokens come on top."""
    file: str | None = None
    """A saved tokenizer folder to load instead of training one on the run's captions."""
    sentinels: int = 100
    """Sentinel tokens for T5-style span masking in training."""
    coordinate_bins: int = 1000
    """Bins per box coordinate: tokens v0=0..v3=999."""
    max_tokens: int = 256
    """Cap per caption or box sequence, the end token included."""
    min_box_score: float = 0.25
    """Boxes below this score are dropped from the det sequence."""

    def __post_init__(self) -> None:
        check(self.vocab_size >= 16, "tokenize.text.vocab_size", "must be >= 16")
        check(self.sentinels >= 1, "tokenize.text.sentinels", "must be >= 1")
        check(2 <= self.coordinate_bins <= 10_000, "tokenize.text.coordinate_bins", "must be in [2, 10000]")
        check(self.max_tokens >= 8, "tokenize.text.max_tokens", "must be >= 8")
        check(0.0 <= self.min_box_score <= 1.0, "tokenize.text.min_box_score", "must be in [0, 1]")


@dataclass(frozen=True)
class CropConfig:
    """4M's aligned crops per sample (``core.crops``): crop 0 the whole label view, the others
    random resized crops with flips, each tokenized for every map modality and box sequence."""

    n_crops: int = 1
    """Crops per sample, the whole view included (1: the label view only). 4M's ``SaveVQDataset``
    defaults to 10 at a smallest scale of 0.2; ``configs/cc12m.yaml`` follows it."""
    min_scale: float = 0.2
    """Smallest crop area, as a fraction of the label view's."""
    max_scale: float = 1.0
    min_ratio: float = 0.75
    """Aspect ratios (width / height) drawn log-uniformly in [min_ratio, max_ratio], 4M's 3/4 to 4/3."""
    max_ratio: float = 1.3333
    flip: float = 0.5
    """Probability of a horizontal flip of crops 1..n-1 (crop 0 is never flipped)."""
    seed: int = 0
    """Mixed with each sample's key: the crops of a key are the same on every run and machine."""
    size: int = 224
    """Side a crop is resized to: the input of the pixel-map tokenizers (14 x 16, 4M's 224 px).
    Feature maps are cut from their own grid and stay at their tokenizer's grid."""

    def __post_init__(self) -> None:
        check(1 <= self.n_crops <= 64, "tokenize.crops.n_crops", "must be in [1, 64]")
        check(0 < self.min_scale <= self.max_scale <= 1, "tokenize.crops", "needs 0 < min_scale <= max_scale <= 1")
        check(0 < self.min_ratio <= 1 <= self.max_ratio, "tokenize.crops", "needs 0 < min_ratio <= 1 <= max_ratio")
        check(0 <= self.flip <= 1, "tokenize.crops.flip", "must be in [0, 1]")
        check(self.seed >= 0, "tokenize.crops.seed", "must be >= 0")
        check(16 <= self.size <= 2048, "tokenize.crops.size", "must be in [16, 2048]")


@dataclass(frozen=True)
class TokenizeConfig:
    modalities: tuple[str, ...] = field(default_factory=lambda: token_modalities())
    batch_size: int = field(default=32, metadata=RUNTIME_ONLY)
    """Samples per tokenizer call in the tokenize stage."""
    caption_source: str = "alt_text"
    """alt_text (the url list's caption, 4M's caption modality on CC12M) or generated (the captioner's)."""
    num_cpus: float = field(default=1.0, metadata=RUNTIME_ONLY)
    """Per tokenize actor and per tokenizer-training task."""
    concurrency: int = field(default=2, metadata=RUNTIME_ONLY)
    """Most tokenize actors at once (each holds every tokenizer); Ray starts fewer if CPUs are short."""
    num_gpus: float = field(default=0.0, metadata=RUNTIME_ONLY)
    """Per task, for VQ encoders and tokenizer training (0: CPU)."""
    precision: str = field(default="auto", metadata=RUNTIME_ONLY)
    """VQ encoding and tokenizer training on a GPU: auto (bf16 autocast, fp16 without bf16), 32,
    bf16 or fp16; a CPU runs fp32 under auto. The quantizer's nearest-code search is always fp32."""
    train_samples: int = 20_000
    """At most this many samples (from the first shards) train each tokenizer."""
    row_group_rows: int = field(default=1024, metadata=RUNTIME_ONLY)
    """Rows per Parquet row group of tokens/: a streaming reader's unit."""
    text: TextTokenizerConfig = field(default_factory=TextTokenizerConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    sections: dict[str, VQConfig] = field(
        default_factory=lambda: _defaults("tokenizer_config"), metadata={SECTIONS: "tokenizer_config"}
    )
    """``tokenize.<map modality>``: each map's VQ tokenizer, its declared defaults where not set."""

    def __post_init__(self) -> None:
        check_modalities(self.modalities, "tokenize.modalities")
        check(self.batch_size >= 1, "tokenize.batch_size", "must be >= 1")
        check(self.num_cpus > 0, "tokenize.num_cpus", "must be > 0")
        check(self.concurrency >= 1, "tokenize.concurrency", "must be >= 1")
        sources = ("alt_text", "generated")
        check(self.caption_source in sources, "tokenize.caption_source", f"must be one of {sources}")
        check(self.train_samples >= 1, "tokenize.train_samples", "must be >= 1")
        check(self.row_group_rows >= 1, "tokenize.row_group_rows", "must be >= 1")
        check(self.precision in PRECISIONS, "tokenize.precision", f"one of {', '.join(PRECISIONS)}")
        for name, vq in self.sections.items():
            owner = vq.share
            if owner is None:
                continue
            key = f"tokenize.{name}.share"
            check(owner in self.sections and self.sections[owner].share is None, key, "must name a map with its own")
            check(MODALITIES[owner].kind == MODALITIES[name].kind, key, f"{owner} is not a {MODALITIES[name].kind}")
            if name in self.modalities:
                check(owner in self.modalities, key, f"{owner} must be in tokenize.modalities too")

    def owner(self, modality: str) -> str:
        """The map whose tokenizer ``modality`` uses: itself, or the one it shares (``share``)."""
        section = self.sections.get(modality)
        return section.share if section is not None and section.share else modality

    def vq(self, modality: str) -> VQConfig:
        return self.sections[modality]


@dataclass(frozen=True)
class TaskConfig:
    """A fixed task (4M's task fine-tunes, e.g. rgb -> semseg): every example shows its ``inputs``
    whole and asks its ``targets`` whole. Empty: 4M's any-to-any masking over every modality."""

    inputs: tuple[str, ...] = ()
    """Modalities shown, e.g. ``[rgb_pixels]`` or ``[caption]`` (sequences with keep scheme ``all``)."""
    targets: tuple[str, ...] = ()
    """Modalities predicted, e.g. ``[semseg]`` or ``[rgb]``."""

    def __post_init__(self) -> None:
        check((not self.inputs) == (not self.targets), "train.task", "needs both inputs and targets, or neither")
        check_modalities(self.inputs, "train.task.inputs", pixels=True)
        check_modalities(self.targets, "train.task.targets")
        both = sorted(set(self.inputs) & set(self.targets))
        check(not both, "train.task", f"{both} both shown and asked: a task's inputs and targets are disjoint")

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.inputs + self.targets


MIXTURE_PRESETS = ("all2all", "rgb2all")
"""Masking mixtures that need no alphas of their own (``train/masking.py`` says what each draws)."""
KEEP_SCHEMES = ("random", "all", "binary")
"""How a sequence input's keep probability is drawn: uniform in [0, 1], 1, or 0 or 1."""


@dataclass(frozen=True)
class MaskingConfig:
    """4M's multimodal masking (``train/masking.py``): how each sample's tokens split into the
    encoder's inputs and the decoder's targets. ``TrainConfig`` inherits these fields, so they are
    keys of the ``train`` section (and a fine-tune's recipe changes them one by one); the masker
    reads them from here alone. What depends on the run's modalities is checked by the masker."""

    input_budget: int = 128
    """Input tokens per sample, split across the sample's modalities by a Dirichlet draw, whatever
    their number: the encoder's sequence length (4M's ``num_input_tokens``)."""
    target_budget: int = 128
    """Target tokens per sample: the decoder's sequence length (4M's ``num_target_tokens``)."""
    min_input_budget: int | None = None
    """4M's token-count range: each sample's input budget is drawn uniformly from
    [min_input_budget, input_budget] (4M's ``min_input_tokens``); None: always ``input_budget``."""
    min_target_budget: int | None = None
    """The same for targets (4M's ``min_target_tokens``); None: always ``target_budget``."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """A fixed task instead of any-to-any masking: the run's modalities are then the task's, and its
    one mixture, in place of ``mixtures``/``*_alphas``/``keep``, shows the inputs whole and asks the
    targets whole (``make eval`` scores that direction)."""
    alpha: float = 1.0
    """Dirichlet concentration of every modality on both sides of a mixture without alphas of its own.
    1.0 draws shares uniformly from the simplex; below 1 most of a budget tends to go to one modality."""
    mixtures: tuple[str, ...] = ("all2all",)
    """Per-sample masking mixtures: the presets all2all, rgb2all (needs rgb in the sample, else
    all2all), or names given alphas below."""
    mixture_weights: tuple[float, ...] = ()
    """Sampling weight per mixture, in the order of ``mixtures`` (empty: equal)."""
    input_alphas: dict[str, dict[str, float]] = field(default_factory=dict)
    """Mixture -> modality -> Dirichlet concentration of the input split (0 or unlisted: not an input)."""
    target_alphas: dict[str, dict[str, float]] = field(default_factory=dict)
    """Mixture -> modality -> Dirichlet concentration of the target split (0 or unlisted: not a target)."""
    keep: dict[str, dict[str, str]] = field(default_factory=dict)
    """Mixture -> sequence modality -> keep scheme of its input: random (default), all, binary."""
    min_input_tokens: dict[str, int] = field(default_factory=dict)
    """Modality -> token counts at least / at most per sample on each side (4M's fine-tuning
    recipes); a minimum holds whenever the modality is a candidate on that side and has them."""
    max_input_tokens: dict[str, int] = field(default_factory=dict)
    min_target_tokens: dict[str, int] = field(default_factory=dict)
    max_target_tokens: dict[str, int] = field(default_factory=dict)
    unconditional_rate: float = 0.0
    """Share of samples trained with no input at all, so classifier-free guidance (generate.guidance)
    has an unconditional model to contrast with; 0.1 is a common choice."""

    def __post_init__(self) -> None:
        check(self.input_budget >= 1, "train.input_budget", "must be >= 1")
        check(self.target_budget >= 1, "train.target_budget", "must be >= 1")
        for side in ("input", "target"):
            low, budget = getattr(self, f"min_{side}_budget"), getattr(self, f"{side}_budget")
            check(low is None or 1 <= low <= budget, f"train.min_{side}_budget", f"must be in [1, {side}_budget]")
        check(self.alpha > 0, "train.alpha", "must be > 0")
        self._check_mixtures()
        for name in ("min_input_tokens", "max_input_tokens", "min_target_tokens", "max_target_tokens"):
            for modality, count in getattr(self, name).items():
                check(count >= 0, f"train.{name}.{modality}", "must be >= 0")
        for side, budget in (("input", self.input_budget), ("target", self.target_budget)):
            low, high = getattr(self, f"min_{side}_tokens"), getattr(self, f"max_{side}_tokens")
            check(sum(low.values()) <= budget, f"train.min_{side}_tokens", f"sum above the {side}_budget {budget}")
            for modality in set(low) & set(high):
                check(low[modality] <= high[modality], f"train.min_{side}_tokens.{modality}", "above its max")
        check(0.0 <= self.unconditional_rate < 1.0, "train.unconditional_rate", "must be in [0, 1)")

    def _check_mixtures(self) -> None:
        check(len(self.mixtures) > 0, "train.mixtures", f"needs at least one (presets: {MIXTURE_PRESETS})")
        check(len(set(self.mixtures)) == len(self.mixtures), "train.mixtures", f"names repeat: {list(self.mixtures)}")
        weights = self.mixture_weights
        check(not weights or len(weights) == len(self.mixtures), "train.mixture_weights", "one per mixture")
        ok = all(w >= 0 for w in weights) and (not weights or sum(weights) > 0)
        check(ok, "train.mixture_weights", "must be >= 0, not all 0")
        for name in ("input_alphas", "target_alphas", "keep"):
            unknown = sorted(set(getattr(self, name)) - set(self.mixtures))
            listed = list(self.mixtures)
            check(not unknown, f"train.{name}", f"mixtures {unknown} are not among train.mixtures {listed}")
        for mixture in self.mixtures:
            for side in ("input_alphas", "target_alphas"):
                alphas = getattr(self, side).get(mixture)
                needed = alphas is not None or mixture in MIXTURE_PRESETS
                check(needed, f"train.{side}.{mixture}", f"needed: not a preset {MIXTURE_PRESETS}")
                for modality, alpha in (alphas or {}).items():
                    check(alpha >= 0, f"train.{side}.{mixture}.{modality}", "must be >= 0")
                check(alphas is None or sum(alphas.values()) > 0, f"train.{side}.{mixture}", "needs one alpha > 0")
            for modality, scheme in self.keep.get(mixture, {}).items():
                ok = scheme in KEEP_SCHEMES
                check(ok, f"train.keep.{mixture}.{modality}", f"{scheme!r} is not one of {KEEP_SCHEMES}")


@dataclass(frozen=True)
class TrainConfig(MaskingConfig):
    """One 4M training run (``make train``): its masking (the fields of ``MaskingConfig``), model
    size, optimisation, devices."""

    run: str = "tiny"
    """The run's folder: ``<root>/runs/<run>/`` (checkpoints, logs, loss curve, final weights)."""
    modalities: tuple[str, ...] = field(default_factory=input_modalities)
    """Every modality by default, and each image's pixel input (``rgb_pixels``, read from ``images/``);
    leave the pixel input out to train on a token store alone."""
    model: str = "tiny"
    """A named size: tiny (6+6 layers, 384), small (8+8, 512), base (12+12, 768), large (24+24, 1024),
    xlarge (24+24, 2048)."""
    batch_size: int = 32
    """Per device."""
    max_steps: int = 300
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.05
    gradient_clip: float = 1.0
    precision: str = "auto"
    """auto: bf16-mixed where the accelerator supports it, else 32-true; or any Lightning precision."""
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    """auto, ddp, fsdp, ...: Lightning's strategies; nodes and devices above make multi-GPU runs."""
    num_workers: int = field(default=0, metadata=RUNTIME_ONLY)
    shuffle_buffer: int = 1000
    seed: int = 0
    holdout_shards: int = 0
    """The last N token shards (by name) are never trained on: ``make eval`` and ``make sample`` read them."""
    log_every_n_steps: int = field(default=10, metadata=RUNTIME_ONLY)
    checkpoint_every_n_steps: int = field(default=100, metadata=RUNTIME_ONLY)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_folder_name(self.run, "train.run")
        check_modalities(self.modalities, "train.modalities", pixels=True)
        check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        check(self.max_steps >= 1, "train.max_steps", "must be >= 1")
        check(self.learning_rate > 0, "train.learning_rate", "must be > 0")
        check(0 <= self.warmup_steps < self.max_steps, "train.warmup_steps", "must be in [0, max_steps)")
        check(self.devices >= 1 and self.num_nodes >= 1, "train.devices/num_nodes", "must be >= 1")
        check(self.checkpoint_every_n_steps >= 1, "train.checkpoint_every_n_steps", "must be >= 1")
        check(self.holdout_shards >= 0, "train.holdout_shards", "must be >= 0")

    @property
    def run_modalities(self) -> tuple[str, ...]:
        """What the run trains on: the task's modalities, else ``modalities``."""
        return self.task.modalities or self.modalities

    @property
    def masking(self) -> MaskingConfig:
        """The masking settings alone: what the masker and a resumed token stream depend on (a
        longer ``max_steps`` changes neither)."""
        return MaskingConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(MaskingConfig)})


@dataclass(frozen=True)
class GenerateConfig:
    """``make sample`` and ``make eval``: any-to-any generation with the trained run ``train.run``."""

    ORDERS: typing.ClassVar[tuple[str, ...]] = ("maskgit", "roar")
    SCHEDULES: typing.ClassVar[tuple[str, ...]] = ("cosine", "linear", "maskgit_cosine")
    TEMPERATURE_SCHEDULES: typing.ClassVar[tuple[str, ...]] = ("constant", "linear", "onex:{min_t}:{power}")

    given: tuple[str, ...] = ()
    """Modalities the model is shown (``make sample FROM=rgb``); empty: the inputs of the run's task
    (``train.task``), else rgb. An image is shown as its pixels where the run has its pixel input
    (``rgb_pixels``), else as its tokens. ``make eval`` decides its own inputs."""
    targets: tuple[str, ...] = ()
    """Generated in this order, each joining the conditioning of the next (``TO=depth,normal``);
    empty: the targets of the run's task, else every other modality of the run."""
    samples: int = 6
    """Rows of the sample grid, from the held-out shards."""
    steps: int = 8
    """Map decoding steps (MaskGIT / ROAR): every position left to generate is filled once over them."""
    order: str = "maskgit"
    """maskgit (most confident first) or roar (random order)."""
    schedule: str = "cosine"
    """Tokens committed per map step: cosine (4M's, symmetric: few, many, few), linear (even, 4M's
    choice for ROAR) or maskgit_cosine (MaskGIT's, rising: few first, most last)."""
    temperature: float = 1.0
    """Sampling temperature of ``make sample`` (0: greedy). ``make eval`` decodes greedily."""
    temperature_schedule: str = "constant"
    """constant; linear (falls with the share of tokens decoded, to 0); or onex:{min_t}:{power} (4M's
    1/x^power curve from ``temperature`` to min_t)."""
    top_k: int = 0
    top_p: float = 1.0
    guidance: object = 1.0
    """Classifier-free guidance: a number scales all inputs together (1: conditional logits only, no
    extra pass), or modality -> weight guides by each separately (``{caption: 3.0, rgb: 1.5}``, 4M's
    multi-condition form; unnamed inputs condition every pass). Typed ``object``: the loader takes one
    type per field, so ``__post_init__`` checks the two forms."""
    keep: dict[str, float] = field(default_factory=dict)
    """In-painting: target map -> share of its stored tokens given (chosen with ``seed``); the rest is
    generated (``make sample KEEP=depth:0.5``)."""
    max_tokens: int = 0
    """Cap on a generated sequence's tokens, EOS included (0: the modality's cap, 256)."""
    seed: int = 0

    def __post_init__(self) -> None:
        check_modalities(self.given, "generate.given", pixels=True)
        check_modalities(self.targets, "generate.targets")
        both = sorted(set(self.given) & set(self.targets))
        check(not both, "generate.targets", f"{both} also given: a target cannot be an input")
        check(self.samples >= 1, "generate.samples", "must be >= 1")
        check(self.max_tokens >= 0, "generate.max_tokens", "must be >= 0 (0: the modality's cap)")
        check(self.order in self.ORDERS, "generate.order", f"unknown {self.order!r}; one of {', '.join(self.ORDERS)}")
        schedules = ", ".join(self.SCHEDULES)
        check(self.schedule in self.SCHEDULES, "generate.schedule", f"unknown {self.schedule!r}; one of {schedules}")
        self.onex(self.temperature_schedule, "generate.temperature_schedule")
        self.check_guidance(self.guidance, "generate.guidance")
        check_modalities(tuple(self.keep), "generate.keep")
        check(all(0 <= s < 1 for s in self.keep.values()), "generate.keep", "shares must be in [0, 1)")
        check(not set(self.keep) & set(self.given), "generate.keep", "names a given modality: keep is for targets")

    @staticmethod
    def onex(schedule: str, key: str) -> tuple[float, float] | None:
        """(min_t, power) of an ``onex:{min_t}:{power}`` temperature schedule; None for constant or linear."""
        if schedule in ("constant", "linear"):
            return None
        name, *numbers = schedule.split(":")
        try:
            min_t, power = (float(n) for n in numbers)
        except ValueError:
            min_t = power = float("nan")  # fails the check below
        check(
            name == "onex" and min_t >= 0 and power > 0,
            key,
            f"unknown {schedule!r}; one of {', '.join(GenerateConfig.TEMPERATURE_SCHEDULES)} (min_t >= 0, power > 0)",
        )
        return min_t, power

    @staticmethod
    def check_guidance(guidance: object, key: str) -> None:
        """A scale >= 0, or a mapping of modality names to weights (negative ones steer away)."""
        number = (int, float)
        if isinstance(guidance, dict):
            check_modalities(tuple(guidance), key, pixels=True)
            ok = all(isinstance(w, number) and not isinstance(w, bool) for w in guidance.values())
            check(ok, key, f"weights must be numbers, got {guidance!r}")
        else:
            ok = isinstance(guidance, number) and not isinstance(guidance, bool) and guidance >= 0
            check(ok, key, f"must be a scale >= 0 or a mapping modality -> weight, got {guidance!r}")


@dataclass(frozen=True)
class CardConfig:
    """What a dataset card (``make card``) says that the data cannot: its name, terms and sources."""

    pretty_name: str = "four-m dataset"
    description: str = ""
    """The card's opening paragraph: where the images and their captions come from."""
    license: str = "unknown"
    """A Hub license id; ``other`` for custom terms, named by ``license_name`` and ``license_link``."""
    license_name: str | None = None
    license_link: str | None = None
    source_datasets: tuple[str, ...] = ("original",)
    language: tuple[str, ...] = ("en",)
    model_licenses: dict[str, str] = field(default_factory=dict)
    """Labeler weights (as in ``label.<name>.model``) -> their license: labels inherit their terms."""
    stats_rows: int = 10_000
    """Label statistics and token-id usage read at most this many rows per modality (first shards
    first); row counts and failures always cover every shard."""

    def __post_init__(self) -> None:
        check(self.license != "other" or bool(self.license_name), "card.license_name", "needed with license: other")
        check(self.stats_rows >= 1, "card.stats_rows", "must be >= 1")


@dataclass(frozen=True)
class FinetuneConfig:
    """``make finetune``: ``train.run`` starts from another run's weights (4M's fine-tunes; 4M-21
    starts from 4M-7), then trains as ``make train`` does with this config's ``train`` section."""

    from_run: str | None = None
    """The run to start from: ``runs/<from_run>/`` of this root (``make finetune FROM_RUN=...``)."""
    freeze_encoder_steps: int = 0
    """Steps during which the encoder (blocks and norm) does not train: new embeddings settle first."""
    new_learning_rate: float | None = None
    """Peak learning rate of the parameters the source run did not have (new modalities' tables,
    heads and patch embeddings); None: ``train.learning_rate``, as the others."""
    lora_rank: int = 0
    """LoRA adapters of this rank on ``lora_targets`` instead of training every weight (0: off); the
    run's ``model.safetensors`` holds the merged weights."""
    lora_alpha: float = 16.0
    """LoRA's scale is ``lora_alpha / lora_rank``."""
    lora_targets: tuple[str, ...] = ("query", "key_value", "out", "gate_up", "down")
    """Attention and MLP projections to adapt (``train.lora.TARGETS``)."""
    train: dict[str, object] = field(default_factory=dict)
    """The fine-tune's recipe: changes to the ``train`` section (``run``, ``task``, ``max_steps``,
    ...), so one config holds both a pre-training and its fine-tune; empty: the ``train`` section."""

    def __post_init__(self) -> None:
        if self.from_run is not None:
            _check_folder_name(self.from_run, "finetune.from_run")
        check(self.freeze_encoder_steps >= 0, "finetune.freeze_encoder_steps", "must be >= 0")
        check(self.new_learning_rate is None or self.new_learning_rate > 0, "finetune.new_learning_rate", "> 0")
        check(self.lora_rank >= 0, "finetune.lora_rank", "must be >= 0 (0: no LoRA)")
        check(self.lora_alpha > 0, "finetune.lora_alpha", "must be > 0")


@dataclass(frozen=True)
class ProbeConfig:
    """``make probe``: ``train.run``'s encoder as an RGB backbone (``train.backbone``) with a small
    dense head, trained on one label folder of the run's training shards, scored on its held-out ones."""

    target: str = "semseg"
    """A map modality with labels: semseg, depth, normal, canny_edge, ..."""
    steps: int = 100
    batch_size: int = 8
    learning_rate: float = 1e-3
    """Peak rate of the head (AdamW, cosine decay)."""
    width: int = 64
    """Channels between the per-patch linear map and the target's own output layer."""
    side: int = 56
    """Side the head predicts and trains at (labels resized to it); scored at the label's own side."""
    finetune_backbone: bool = False
    """False: a linear probe, the encoder frozen; True: the encoder trains too, at ``backbone_learning_rate``."""
    backbone_learning_rate: float = 1e-5
    max_rows: int = 5_000
    """Training rows read into memory at most (the first ones, by shard); held-out rows are all read."""
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.target in map_modalities(), "probe.target", f"{self.target!r} is not a map: {map_modalities()}")
        check(self.target not in of_kind("image"), "probe.target", "the image is the backbone's input, not a label")
        for key in ("steps", "batch_size", "width", "side", "max_rows"):
            check(getattr(self, key) >= 1, f"probe.{key}", "must be >= 1")
        check(self.learning_rate > 0 and self.backbone_learning_rate > 0, "probe.learning_rate", "must be > 0")


@dataclass(frozen=True)
class Config:
    root: str = "data/default"
    """The dataset root: every stage reads and writes under it."""
    verify_checksums: bool = True
    """On resume, re-hash finished shards before trusting them (off for huge runs: sizes still count)."""
    ray: RayConfig = field(default_factory=RayConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    card: CardConfig = field(default_factory=CardConfig)

    def __post_init__(self) -> None:
        self.finetuned()  # a recipe that does not make a valid train section stops at load, naming its key

    def finetuned(self) -> Config:
        """The config ``make finetune`` trains with: ``train`` with ``finetune.train``'s changes made
        (and then emptied: the run's ``config.yaml`` holds the resolved ``train`` section)."""
        if not self.finetune.train:
            return self
        try:
            changed = _build(TrainConfig, {**_plain(self.train), **self.finetune.train}, "train.")
        except ConfigError as err:
            raise ConfigError(f"finetune.train (the fine-tune's train section): {err}") from None
        return dataclasses.replace(self, train=changed, finetune=dataclasses.replace(self.finetune, train={}))

    def section_hash(self, section: str) -> str:
        """A short stable hash of what in one section shapes the output: markers record it."""
        return shaping_hash(getattr(self, section))

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self), sort_keys=False)

    def recorded_yaml(self) -> str:
        """What a root records beside its outputs: ``to_yaml`` but ``root``, which is where the file
        lies; the same work in another root (or a moved root) then records the same bytes.
        ``load_config(file, root=...)`` reads it back."""
        plain = _plain(self)
        del plain["root"]
        return yaml.safe_dump(plain, sort_keys=False)


def shaping_hash(*parts: Any) -> str:
    """Hash the fields of ``parts`` that shape output (runtime-only fields left out, nested too)."""
    blob = json.dumps([_shaping(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _shaping(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _shaping(v) for k, v in value.items()}
    if not dataclasses.is_dataclass(value):
        return value
    return {
        f.name: _shaping(getattr(value, f.name))
        for f in dataclasses.fields(value)
        if not f.metadata.get("runtime_only")
        and not (f.metadata.get("shaping_if_set") and getattr(value, f.name) == f.default)
    }


def load_config(path: str | Path, overrides: list[str] = (), root: str | None = None) -> Config:
    """Load a YAML config, apply ``section.key=value`` overrides, and validate everything.

    ``path`` may also be a bare name such as ``default`` for ``configs/default.yaml``.
    """
    file = resolve_config_path(path)
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{file}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of sections")
    for item in overrides:
        _apply_override(data, item)
    if root is not None:
        data["root"] = root
    try:
        return _build(Config, data, "")
    except ConfigError as err:
        raise ConfigError(f"{file}: {err}") from None


def resolve_config_path(path: str | Path) -> Path:
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    named = CONFIG_DIR / f"{path}.yaml"
    if named.is_file():
        return named
    raise ConfigError(f"config {path!s} not found (neither a file nor a name in {CONFIG_DIR})")


def _apply_override(data: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[leaf] = yaml.safe_load(raw)


def _build(cls: type, data: Any, prefix: str, base: Any = None) -> Any:
    """``cls`` from a YAML mapping; keys it leaves out take ``base``'s values if given (a modality's
    declared section), else the class defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    sections = next((f for f in dataclasses.fields(cls) if SECTIONS in f.metadata), None)
    known = {f.name for f in dataclasses.fields(cls) if f is not sections}
    defaults = _defaults(sections.metadata[SECTIONS]) if sections else {}
    unknown = sorted(set(data) - known - set(defaults))
    if unknown:
        listed = ", ".join(sorted(known | set(defaults)))
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known: {listed})")
    values = {name: _coerce(hints[name], data[name], f"{prefix}{name}") for name in known & set(data)}
    if sections:
        values[sections.name] = {
            name: _build(type(default), data[name], f"{prefix}{name}.", default) if name in data else default
            for name, default in defaults.items()
        }
    return dataclasses.replace(base, **values) if base is not None else cls(**values)


def _defaults(attribute: str) -> dict[str, Any]:
    """Per registered modality that declares one, its default section (``ModalitySpec.<attribute>``);
    for ``filter_config``, per registered curation filter its declared section."""
    if attribute == FILTER_CONFIG:
        from four_m.core.curation import FILTERS  # the filters' registry reads the dataset layout

        return {n: s.config for n, s in FILTERS.items()}
    return {n: getattr(s, attribute) for n, s in MODALITIES.items() if getattr(s, attribute) is not None}


def check_modalities(names: tuple[str, ...], key: str, *, pixels: bool = False) -> None:
    """Every name is a registered modality (or, with ``pixels``, an image's pixel input), each once;
    else one line naming the key and the known ones."""
    known = input_modalities() if pixels else token_modalities()
    unknown = sorted(set(names) - set(known))
    check(not unknown, key, f"unknown {unknown}; known: {', '.join(known)}")
    check(len(set(names)) == len(names), key, f"names repeat: {list(names)}")


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Check ``value`` against a field's type hint; the few safe conversions YAML needs happen here."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, key) for v in value)
    if typing.get_origin(hint) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(args[0], k, key): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def check(ok: bool, key: str, requirement: str) -> None:
    """Stop with a one-line ``ConfigError`` naming ``key`` unless ``ok``: every config class validates with it."""
    if not ok:
        raise ConfigError(f"{key}: {requirement}")


def _check_folder_name(value: str, key: str) -> None:
    """``value`` becomes a folder under the root, so it must stay one: no separator, no ``..``, not
    empty or absolute (``train.run=../../elsewhere`` would write the model outside the root)."""
    ok = FOLDER_NAME.fullmatch(value) is not None and ".." not in value
    check(ok, key, f"{value!r} is not a folder name (letters, digits, '.', '_', '-'; starting with a letter or digit)")


def _plain(value: Any) -> Any:
    """Plain YAML data that ``load_config`` reads back: tuples as lists, sections as keys of their section."""
    if dataclasses.is_dataclass(value):
        plain = {}
        for f in dataclasses.fields(value):
            if SECTIONS in f.metadata:
                plain.update(_plain(getattr(value, f.name)))
            else:
                plain[f.name] = _plain(getattr(value, f.name))
        return plain
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
