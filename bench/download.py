"""Download-stage throughput against img2dataset's own multiprocessing distributor.

Same machine, same local HTTP server, same images, same resize settings, in one run. Ray is
started before the clock (on a cluster it is already running); both sides then pay their own
process start-up, and img2dataset its logger process. Prints images/s for each, best of the
repeats, and the ratio (goal: ours / img2dataset >= 0.9), then the ratio with Ray's start counted.

    .venv/bin/python bench/download.py [--images 800] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import img2dataset
import pyarrow.parquet as pq
import ray
from common import make_images

from four_m.core.config import Config, DownloadConfig, RayConfig, SampleConfig
from four_m.pipeline.download import run_download
from four_m.pipeline.sample_site import serve_directory

IMAGE_SIZE = 256
THREADS = 32
PROCESSES = 2


def ours(url_list: Path, out: Path, per_shard: int) -> tuple[float, int]:
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
    return time.perf_counter() - started, summary.rows_out


def theirs(url_list: Path, out: Path, per_shard: int) -> tuple[float, int]:
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
    rows = sum(
        pq.read_table(f, columns=["status"])["status"].to_pylist().count("success") for f in out.glob("*.parquet")
    )
    return seconds, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    per_shard = -(-args.images // args.shards)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "site").mkdir()
        names = make_images(tmp / "site", args.images)
        megabytes = sum(p.stat().st_size for p in (tmp / "site").iterdir()) / 2**20
        with serve_directory(tmp / "site", "127.0.0.1", 0) as base:
            rows = "".join(f"{base}/{name}\tbench image {name}\n" for name in names)
            (tmp / "ours.tsv").write_text(rows)  # CC12M style, no header
            (tmp / "img2dataset.tsv").write_text("url\tcaption\n" + rows)  # img2dataset needs one
            started = time.perf_counter()
            ray.init(num_cpus=PROCESSES, include_dashboard=False, logging_level="warning")
            ray_start = time.perf_counter() - started
            best = {"ours": float("inf"), "img2dataset": float("inf")}
            for repeat in range(args.repeats):
                for name, run in (("ours", ours), ("img2dataset", theirs)):
                    seconds, ok = run(tmp / f"{name}.tsv", tmp / f"out-{name}-{repeat}", per_shard)
                    assert ok == args.images, f"{name} kept {ok} of {args.images} images"
                    best[name] = min(best[name], seconds)
                    print(f"{name:12s} run {repeat + 1}: {seconds:6.2f} s  {args.images / seconds:7.1f} images/s")
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


if __name__ == "__main__":
    main()
