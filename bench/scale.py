"""Scale: per-image cost of every stage as the corpus grows (download -> label -> tokenizers ->
tokenize -> one loader epoch), at several corpus sizes, on this machine.

A corpus of distinct, real-looking photos (crops, flips, colour and scale changes of the bundled
photos; each distinct in bytes, by sha256, and in perceptual hash, by a 64-bit dHash) is served on
127.0.0.1 and run through the real stages with configs/default.yaml plus ``BENCH_SETTINGS`` and
``--set`` overrides: the algorithmic labelers by default (``--labelers`` adds the tiny network
ones), tokenizers fitted once on a subset (``tokenize.train_samples``), every tokenized modality
read back by the trainer's own loader (``TokenDataModule``) for one epoch.

Each size runs in a fresh Python process, so the driver's peak memory is that size's alone. Per
stage and size: seconds per 1,000 images, the driver's peak RSS, the largest Ray worker's peak RSS
(the bench's own Ray; sampled every 0.2 s), files and bytes the stage wrote per 1,000 images; then,
per stage, the ratio of the largest size's per-image time to the smallest's (goal <= 1.2) and of
the driver's peak memory (goal <= 1.2). Figures go to ``--out`` as scale.json and scale.png
(seconds per 1,000 images against N, per stage).

    .venv/bin/python bench/scale.py [--sizes 1000,10000,50000] [--per-shard 1000]
        [--labelers canny_edge,color_palette,metadata] [--set KEY=VALUE ...] [--out DIR] [--work DIR]
    (100,000: --sizes 1000,100000; about 8 GB of photos and 2x that of root under --work)
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import math
import multiprocessing
import os
import pstats
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import psutil
from PIL import Image, ImageEnhance, ImageOps

from four_m.core.modalities import sequence_modalities
from four_m.pipeline.sample_site import bundled_photo_paths, serve_directory

STAGES = ("download", "label", "tokenizers", "tokenize", "loader")
WRITES = {  # what each stage writes under the root: its data folder and its state
    "download": ("images", "_state/download"),
    "label": ("labels", "_state/label"),
    "tokenizers": ("tokenizers", "_state/tokenizers"),
    "tokenize": ("tokens", "_state/tokenize"),
    "loader": (),
}
ALGORITHMIC = ("canny_edge", "color_palette", "metadata")
# What the bench changes in configs/default.yaml, and why: no sample site (the bench serves its own
# corpus); tokenizers fit once on a subset and train a few steps (their quality does not change the
# speed of anything measured); one crop per sample, so a size fits in this machine's time.
BENCH_SETTINGS = (
    "sample.enabled=false",
    "tokenize.train_samples=256",
    "tokenize.crops.n_crops=1",
    *(f"tokenize.{m}.steps=5" for m in ("rgb", "canny_edge")),
)
CORPUS_SEED = 0


def dhash(image: Image.Image) -> int:
    """64-bit difference hash: the signs of horizontal gradients of a 9 x 8 grey thumbnail."""
    grey = np.asarray(image.convert("L").resize((9, 8), Image.BILINEAR), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def variant(source: Image.Image, rng: random.Random) -> Image.Image:
    """A crop of ``source`` (random box), maybe mirrored, colour-jittered and rescaled to 300-600 px."""
    width, height = source.size
    crop_w, crop_h = rng.randint(width // 3, width), rng.randint(height // 3, height)
    left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
    image = source.crop((left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    for enhance in (ImageEnhance.Color, ImageEnhance.Brightness, ImageEnhance.Contrast):
        image = enhance(image).enhance(rng.uniform(0.7, 1.3))
    target = rng.randint(300, 600)
    return image.resize((target, max(1, target * crop_h // crop_w)), Image.BILINEAR)


_SOURCES: list[tuple[Image.Image, str]] = []
"""The bundled photos with their captions, loaded once per generating process."""
CHUNK = 250
"""Candidates one generating task draws."""


def _candidates(seed: int, chunk: int) -> list[tuple[bytes, int, str]]:
    """``CHUNK`` candidate JPEGs with their dHash and caption, drawn by their own seeded generator."""
    if not _SOURCES:
        _SOURCES.extend((Image.open(p).convert("RGB"), caption) for p, caption in bundled_photo_paths())
    rng = random.Random(seed * 1_000_003 + chunk)
    found = []
    for _ in range(CHUNK):
        source, caption = rng.choice(_SOURCES)
        image = variant(source, rng)
        data = io.BytesIO()
        image.save(data, "JPEG", quality=rng.randint(75, 95))
        found.append((data.getvalue(), dhash(image), caption))
    return found


def make_corpus(folder: Path, count: int, seed: int = CORPUS_SEED, apart: int = 1) -> list[tuple[str, str]]:
    """``count`` JPEGs, distinct by sha256 and by dHash (a candidate that repeats either is dropped;
    with ``apart`` > 1, one whose dHash is fewer than ``apart`` bits from a kept one's: a corpus a
    near-duplicate search must find nothing in), drawn in seeded chunks on every core; (file name,
    caption) per image. Kept in ``folder`` with a
    list, and reused when it has enough (the same seed draws the same corpus)."""
    listing = folder / "corpus.json"
    if listing.is_file():
        known = json.loads(listing.read_text())
        if len(known) >= count:
            return [tuple(row) for row in known[:count]]
    folder.mkdir(parents=True, exist_ok=True)
    digests: set[bytes] = set()
    hashes: set[int] = set()
    rows: list[tuple[str, str]] = []
    with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
        # imap, in order: a chunk is kept or dropped as it arrives, so memory holds a few chunks, not
        # every candidate (starmap returned all of them at once: about 4 GB for 50,000 images).
        for candidates in pool.imap(partial(_candidates, seed), count_chunks(count)):
            for data, phash, caption in candidates:
                digest = hashlib.sha256(data).digest()
                if len(rows) == count or digest in digests or phash in hashes:
                    continue
                if apart > 1 and _too_close(phash, hashes, apart):
                    continue
                digests.add(digest)
                hashes.add(phash)
                name = f"{len(rows):06d}.jpg"
                (folder / name).write_bytes(data)
                rows.append((name, f"{caption}, view {len(rows)}"))
            if len(rows) == count:
                break
    if len(rows) < count:
        raise RuntimeError(f"only {len(rows)} distinct images among the candidates drawn for {count}")
    listing.write_text(json.dumps(rows))
    return rows


def _too_close(candidate: int, kept: set[int], apart: int) -> bool:
    """Whether ``candidate`` is fewer than ``apart`` bits from any kept hash."""
    if not kept:
        return False
    xor = np.bitwise_xor(np.fromiter(kept, np.uint64, len(kept)), np.uint64(candidate))
    return bool((np.unpackbits(xor.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1) < apart).any())


def count_chunks(count: int) -> range:
    """Chunks enough for ``count`` images with a quarter spare for the dropped repeats."""
    return range(math.ceil(count * 1.25 / CHUNK) + 1)


@dataclass
class StageFigures:
    """One stage at one size."""

    seconds: float
    driver_cpu_seconds: float
    """CPU time of the driver process (all its threads): what grows if its bookkeeping does."""
    driver_peak_mb: float
    worker_peak_mb: float | None
    """None for the loader: it runs in the driver (``train.num_workers`` 0), Ray's workers idle."""
    files: int
    bytes: int
    rows: int
    """Rows the stage ended with (tokenizers: tokenizers trained)."""


RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
"""Ray's own per-node daemons, which also name themselves ``ray::``: not the pipeline's workers."""


def _is_ray_worker(proc: psutil.Process) -> bool:
    """A Ray task or actor process (``ray::<task>``, or ``default_worker.py`` before it names itself)."""
    try:
        cmdline = proc.cmdline()
    except psutil.Error:
        return False
    if not cmdline or cmdline[0].startswith(RAY_AGENTS):
        return False
    return cmdline[0].startswith("ray::") or any("default_worker.py" in c for c in cmdline)


class Peaks:
    """Peak RSS of this process and of its largest Ray worker (descendants only), sampled every 0.2 s."""

    def __init__(self) -> None:
        self.driver = 0
        self.worker = 0
        self._me = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        self.driver = max(self.driver, self._me.memory_info().rss)
        for proc in self._me.children(recursive=True):
            try:
                if _is_ray_worker(proc):
                    self.worker = max(self.worker, proc.memory_info().rss)
            except psutil.Error:  # ended between the listing and the read
                continue

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.sample()

    def __enter__(self) -> Peaks:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def written(root: Path, folders: tuple[str, ...]) -> tuple[int, int]:
    """Files and bytes under ``folders`` of ``root``."""
    files = [p for f in folders for p in (root / f).rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def loader_epoch(config) -> int:
    """One epoch of the trainer's loader over every token shard (nothing held out); the samples read."""
    import pyarrow.parquet as pq

    from four_m.core.dataset_root import DatasetRoot
    from four_m.train.data import TokenDataModule
    from four_m.train.masking import Masker, ModalityInfo
    from four_m.train.run import model_modalities

    cfg = config.train
    modalities = model_modalities(DatasetRoot(config.root), cfg.run_modalities)
    infos = [ModalityInfo(m.name, m.layout, m.positions, image_size=m.image_size) for m in modalities]
    data = TokenDataModule(
        root=config.root,
        modalities=[m.name for m in modalities],
        masker=Masker(infos, cfg.masking, seed=cfg.seed),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        shuffle_buffer=cfg.shuffle_buffer,
        seed=cfg.seed,
        holdout=0,
    )
    first = next(m.name for m in modalities if m.layout != "pixels")
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in (Path(config.root) / "tokens" / first).glob("*.parquet"))
    batches = iter(data.train_dataloader())
    for _ in range(math.ceil(rows / cfg.batch_size)):
        next(batches)
    return rows


def one_size(
    size: int, work: Path, base_url: str, corpus: list[tuple[str, str]], overrides: list[str], profile: Path | None
) -> dict:
    """Every stage over the first ``size`` images of the corpus, in this process; the figures. With
    ``profile``, each stage's driver profile (cProfile, top functions by own time) goes there."""
    from four_m.core.config import load_config
    from four_m.pipeline.download import run_download
    from four_m.pipeline.executor import ray_session
    from four_m.pipeline.label import run_label
    from four_m.pipeline.tokenize import run_tokenize
    from four_m.pipeline.tokenizers import run_tokenizer_training

    root = work / f"root-{size}"
    url_list = work / f"urls-{size}.tsv"
    url_list.write_text("".join(f"{base_url}/{name}\t{caption}\n" for name, caption in corpus[:size]))
    config = load_config("default", [*overrides, f"download.urls={url_list}"], root=str(root))
    # Each stage -> the rows it ended with (the fewest over labelers or modalities): a bench that
    # lost rows would measure less work than it claims.
    stages: dict[str, Callable[[], int]] = {
        "download": lambda: run_download(config, progress=False).rows_out,
        "label": lambda: min(run_label(config, progress=False).labelled.values()),
        "tokenizers": lambda: len(run_tokenizer_training(config).trained),
        "tokenize": lambda: min(s.rows_out for s in run_tokenize(config, progress=False).modalities.values()),
        "loader": lambda: loader_epoch(config),
    }
    figures = {}
    with ray_session(config.ray):  # started once, before any clock: a cluster's Ray is already running
        for stage, run in stages.items():
            profiler = cProfile.Profile() if profile else None
            with Peaks() as peaks, profiler or nullcontext():
                started, cpu = time.perf_counter(), time.process_time()
                rows = run()
                seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
            if profiler:
                report = io.StringIO()
                pstats.Stats(profiler, stream=report).sort_stats("tottime").print_stats(25)
                (profile / f"profile-{size}-{stage}.txt").write_text(report.getvalue())
            files, size_bytes = written(root, WRITES[stage])
            worker = peaks.worker / 2**20 if stage != "loader" else None
            figures[stage] = StageFigures(seconds, cpu, peaks.driver / 2**20, worker, files, size_bytes, rows)
            unit = "tokenizers" if stage == "tokenizers" else "rows"
            print(f"  N={size}: {stage} {seconds:.1f} s, {rows} {unit}", flush=True)
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    return {"stages": {s: asdict(f) for s, f in figures.items()}, "driver_maxrss_mb": maxrss_mb}


FIGURES: dict[str, Callable[[dict, int], float | None]] = {
    "s / 1k images": lambda f, n: f["seconds"] * 1000 / n,
    "driver CPU s / 1k images": lambda f, n: f["driver_cpu_seconds"] * 1000 / n,
    "driver peak MB": lambda f, n: f["driver_peak_mb"],
    "largest worker peak MB": lambda f, n: f["worker_peak_mb"],  # None for the loader
    "files / 1k images": lambda f, n: f["files"] * 1000 / n,
    "MB / 1k images": lambda f, n: f["bytes"] * 1000 / n / 2**20,
    "rows out": lambda f, n: f["rows"],
}
"""A table row per stage and figure: (the stage's figures, N) -> the value shown."""
RATIOS = ("s / 1k images", "driver CPU s / 1k images", "driver peak MB")
"""The figures whose largest-N / smallest-N ratio has a goal (<= 1.2)."""


def marginal(results: dict[int, dict], stage: str) -> list[float | None]:
    """Seconds per 1,000 images added from the size before (none for the smallest): the stage's
    fixed cost (Ray actors, model loads, tokenizer fits) cancels, so this is what each further
    image costs, and what rises if a cost grows faster than the corpus."""
    sizes = sorted(results)
    seconds = [results[n]["stages"][stage]["seconds"] for n in sizes]
    steps = zip(sizes, sizes[1:], seconds, seconds[1:], strict=False)
    return [None, *((t2 - t1) * 1000 / (n2 - n1) for n1, n2, t1, t2 in steps)]


def table(results: dict[int, dict]) -> list[str]:
    """A Markdown table: a row per stage and figure, a column per size, then the ratio of the
    largest size's value to the smallest's where it has a goal."""
    sizes = sorted(results)

    def row(stage: str, figure: str, values: list[float | None], ratio: bool) -> str:
        shown = ["–" if v is None else f"{v:,.2f}" if v % 1 else f"{v:,.0f}" for v in values]
        present = [v for v in values if v is not None]  # the marginal cost has none at the smallest size
        last = f"{present[-1] / present[0]:.2f}" if ratio and len(present) > 1 and present[0] else ""
        return f"| {stage} | {figure} | {' | '.join(shown)} | {last} |"

    lines = [
        f"| stage | figure | {' | '.join(f'N={n:,}' for n in sizes)} | ratio N={sizes[-1]:,} / N={sizes[0]:,} |",
        f"|---|---|{'---:|' * len(sizes)}---:|",
    ]
    for stage in STAGES:
        for figure, value in FIGURES.items():
            values = [value(results[n]["stages"][stage], n) for n in sizes]
            lines.append(row(stage, figure, values, figure in RATIOS))
            if figure == "s / 1k images":
                lines.append(row(stage, "marginal s / 1k images", marginal(results, stage), True))
    total = [sum(results[n]["stages"][s]["seconds"] for s in STAGES) * 1000 / n for n in sizes]
    lines.append(row("all stages", "s / 1k images", total, True))
    lines.append(row("driver", "max RSS MB (getrusage)", [results[n]["driver_maxrss_mb"] for n in sizes], True))
    return lines


def plot(results: dict[int, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for stage in STAGES:
        ax.plot(sizes, [results[n]["stages"][stage]["seconds"] * 1000 / n for n in sizes], marker="o", label=stage)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("images (N)")
    ax.set_ylabel("seconds per 1,000 images")
    ax.set_title("bench/scale.py: per-image cost of each stage against corpus size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


@contextmanager
def served(folder: Path) -> Iterator[str]:
    with serve_directory(folder, "127.0.0.1", 0) as base:
        yield base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,50000", help="corpus sizes, comma-separated")
    parser.add_argument("--per-shard", type=int, default=1000, help="download.samples_per_shard")
    parser.add_argument("--labelers", default=",".join(ALGORITHMIC), help="label.labelers (add tiny network ones)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work", type=Path, help="corpus (kept, reused) and roots (removed after each size)")
    parser.add_argument("--out", type=Path, help="scale.json and scale.png (default: --work)")
    parser.add_argument("--profile", action="store_true", help="each stage's driver cProfile to --out")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: one size, figures to --out
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    labelers = args.labelers.split(",")
    # Sequences (metadata, caption) share the text tokenizer, whose corpus is the caption labels:
    # without the caption labeler they are labelled but not tokenized.
    sequences = () if "caption" in labelers else sequence_modalities()
    modalities = ["rgb", *(m for m in labelers if m not in sequences)]
    overrides = [
        *BENCH_SETTINGS,
        f"download.samples_per_shard={args.per_shard}",
        f"label.labelers=[{','.join(labelers)}]",
        f"tokenize.modalities=[{','.join(modalities)}]",
        f"train.modalities=[{','.join(modalities)}]",
        *args.overrides,
    ]
    if args.one:
        corpus = make_corpus(args.work / "corpus", args.one)
        figures = one_size(args.one, args.work, args.base_url, corpus, overrides, args.out if args.profile else None)
        (args.out / f"size-{args.one}.json").write_text(json.dumps(figures))
        return
    sizes = sorted(int(s) for s in args.sizes.split(","))
    work = args.work or Path(tempfile.gettempdir()) / "four_m-scale"
    out = args.out or work
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    make_corpus(work / "corpus", sizes[-1])
    print(f"corpus: {sizes[-1]:,} distinct images (sha256 and dHash) in {time.perf_counter() - started:.0f} s")
    results = {}
    with served(work / "corpus") as base:
        for size in sizes:
            child = [sys.executable, __file__, f"--one={size}", f"--base-url={base}", f"--work={work}", f"--out={out}"]
            child += [f"--per-shard={args.per_shard}", f"--labelers={args.labelers}"]
            child += ["--profile"] if args.profile else []
            child += [f"--set={o}" for o in args.overrides]
            subprocess.run(child, check=True)
            results[size] = json.loads((out / f"size-{size}.json").read_text())
            shutil.rmtree(work / f"root-{size}")  # 50,000 images' root is several GB; the corpus is kept
    load = psutil.getloadavg()
    lines = table(results)
    print("\n".join(lines))
    print(f"labelers: {args.labelers}; {args.per_shard} images per shard; load average at the end {load[0]:.1f}")
    (out / "scale.json").write_text(json.dumps({"sizes": results, "overrides": overrides, "table": lines}, indent=1))
    plot(results, out / "scale.png")
    print(f"figures: {out / 'scale.json'}, plot: {out / 'scale.png'}")


if __name__ == "__main__":
    main()
