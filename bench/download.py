"""Download-stage throughput against img2dataset's own multiprocessing distributor.

Same machine, same local HTTP server, same images, same resize settings, in one run. Ray is
started before the clock (on a cluster it is already running); both sides then pay their own
process start-up, and img2dataset its logger process. Prints images/s for each, best of the
repeats, and the ratio (goal: ours / img2dataset >= 0.9), then the ratio with Ray's start counted.

Each run also prints what it kept and why the rest failed: a benchmark reports a failure and goes
on. Beside the figures stands the server's own ceiling (as many client processes and threads as
either side, fetching every image and doing nothing else), so that a reader sees whether the
server, rather than the code measured, set the pace.

    .venv/bin/python bench/download.py [--images 800] [--shards 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
import urllib.request
from collections import Counter
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import img2dataset
import pyarrow.parquet as pq
import ray
from common import make_images

from four_m.core.config import Config, DownloadConfig, RayConfig, SampleConfig
from four_m.core.failures import failure_reason
from four_m.pipeline.download import run_download
from four_m.pipeline.sample_site import serve_directory

IMAGE_SIZE = 256
THREADS = 32
PROCESSES = 2


@dataclass(frozen=True)
class Outcome:
    """One run: its wall time, the images it kept, and its failed rows by reason."""

    seconds: float
    kept: int
    failed: dict[str, int]

    def line(self, images: int, megabytes: float) -> str:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.failed.items()))
        return (
            f"{self.seconds:6.2f} s  {images / self.seconds:7.1f} images/s  {megabytes / self.seconds:6.1f} MB/s"
            f"  kept {self.kept}/{images}, failed {sum(self.failed.values())}{f' ({reasons})' if reasons else ''}"
        )


def ours(url_list: Path, out: Path, per_shard: int) -> Outcome:
    config = Config(
        root=str(out),
        ray=RayConfig(num_cpus=PROCESSES),
        download=DownloadConfig(
            urls=str(url_list),
            samples_per_shard=per_shard,
            image_size=IMAGE_SIZE,
            threads_per_shard=THREADS,
            cpus_per_shard=1,
        ),
        sample=SampleConfig(enabled=False),
    )
    started = time.perf_counter()
    summary = run_download(config, progress=False)
    return Outcome(time.perf_counter() - started, summary.rows_out, dict(summary.failures))


def theirs(url_list: Path, out: Path, per_shard: int) -> Outcome:
    started = time.perf_counter()
    img2dataset.download(
        url_list=str(url_list),
        input_format="tsv",
        url_col="url",
        caption_col="caption",
        output_format="parquet",
        output_folder=str(out),
        processes_count=PROCESSES,
        thread_count=THREADS,
        image_size=IMAGE_SIZE,
        resize_mode="keep_ratio",
        number_sample_per_shard=per_shard,
        distributor="multiprocessing",
    )
    seconds = time.perf_counter() - started
    columns = ["status", "error_message"]
    rows = [row for f in out.glob("*.parquet") for row in pq.read_table(f, columns=columns).to_pylist()]
    failed = Counter(failure_reason(r["error_message"]) for r in rows if r["status"] != "success")
    return Outcome(seconds, len(rows) - failed.total(), dict(failed))


def _fetch_all(urls: list[str]) -> int:
    """Fetch ``urls`` with THREADS threads, as one downloader process would; the bytes read."""

    def fetch(url: str) -> int:
        with urllib.request.urlopen(url, timeout=30) as response:
            return len(response.read())

    with ThreadPoolExecutor(THREADS) as threads:
        return sum(threads.map(fetch, urls))


def server_ceiling(clients: Executor, urls: list[str]) -> tuple[float, float]:
    """Images/s and MB/s of PROCESSES client processes x THREADS threads fetching every url and
    doing nothing else: the most this server lets either side reach."""
    started = time.perf_counter()
    read = sum(clients.map(_fetch_all, [urls[i::PROCESSES] for i in range(PROCESSES)]))
    seconds = time.perf_counter() - started
    return len(urls) / seconds, read / 2**20 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    per_shard = -(-args.images // args.shards)
    # The ceiling's clients are forked first, while this process has no server thread and no Ray.
    fork = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(PROCESSES, mp_context=fork) as clients:
        list(clients.map(_fetch_all, [[]] * PROCESSES))  # every client process started before any clock
        tmp = Path(tmp)
        (tmp / "site").mkdir()
        names = make_images(tmp / "site", args.images)
        megabytes = sum(p.stat().st_size for p in (tmp / "site").iterdir()) / 2**20
        with serve_directory(tmp / "site", "127.0.0.1", 0) as base:
            rows = "".join(f"{base}/{name}\tbench image {name}\n" for name in names)
            (tmp / "ours.tsv").write_text(rows)  # CC12M style, no header
            (tmp / "img2dataset.tsv").write_text("url\tcaption\n" + rows)  # img2dataset needs one
            ceiling, ceiling_mb = server_ceiling(clients, [f"{base}/{name}" for name in names])
            print(f"{'server only':12s}        {ceiling:7.1f} images/s  {ceiling_mb:6.1f} MB/s  (fetch, no decode)")
            started = time.perf_counter()
            ray.init(num_cpus=PROCESSES, include_dashboard=False, logging_level="warning")
            ray_start = time.perf_counter() - started
            best = {"ours": float("inf"), "img2dataset": float("inf")}
            for repeat in range(args.repeats):
                for name, run in (("ours", ours), ("img2dataset", theirs)):
                    outcome = run(tmp / f"{name}.tsv", tmp / f"out-{name}-{repeat}", per_shard)
                    best[name] = min(best[name], outcome.seconds)
                    print(f"{name:12s} run {repeat + 1}: {outcome.line(args.images, megabytes)}")
            ray.shutdown()
    rate = {name: args.images / seconds for name, seconds in best.items()}
    print(
        f"images: {args.images} ({megabytes:.0f} MB, {args.shards} shards), {PROCESSES} processes x {THREADS} threads,"
        f" {IMAGE_SIZE} px keep_ratio"
    )
    print(f"best: ours {rate['ours']:.1f} images/s, img2dataset multiprocessing {rate['img2dataset']:.1f} images/s")
    print(f"ratio ours / img2dataset: {rate['ours'] / rate['img2dataset']:.2f} (goal >= 0.9)")
    cold = args.images / (best["ours"] + ray_start)
    print(
        f"with Ray's start ({ray_start:.1f} s) counted too: {cold:.1f} images/s, ratio {cold / rate['img2dataset']:.2f}"
    )
    headroom = ceiling / max(rate.values())
    verdict = "the server did not set the pace" if headroom >= 1.5 else "the server may have set the pace"
    print(f"server ceiling {ceiling:.1f} images/s, {headroom:.1f}x the faster side: {verdict}")


if __name__ == "__main__":
    main()
