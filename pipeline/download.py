"""The download stage: url lists -> ``images/<shard>.parquet`` with img2dataset, on Ray.

Per shard, img2dataset's own ``Downloader`` (its threads, resizer, parquet writer and key scheme)
fetches the rows into a private temporary folder; we then put back the rows it must not fetch
(unsupported url schemes), restore img2dataset's keys for them, sort by key so a shard's bytes
do not depend on the order downloads finished, add provenance, and move the shard into place.
Every input row ends in the output exactly once: as an image, or as a failure with its reason.
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from img2dataset.downloader import Downloader, compute_key
from img2dataset.writer import ParquetSampleWriter

from four_m import __version__
from four_m.core.config import Config, DownloadConfig
from four_m.core.dataset_root import (
    SHARD_DIGITS,
    DatasetRoot,
    atomic_path,
    clear_temporaries,
    shard_name,
    write_text_atomic,
)
from four_m.core.errors import UserError
from four_m.core.summary import ShardReport, StageSummary
from four_m.pipeline import sample_site
from four_m.pipeline.executor import ray_session, run_shards
from four_m.pipeline.failures import failure_reason
from four_m.pipeline.image_check import CheckedResizer
from four_m.pipeline.url_list import make_plan, read_shard_input

STAGE = "download"
SUCCESS = "success"
ROW_GROUP_ROWS = 256  # ~8 MB of 256 px JPEGs: small enough to stream, large enough to compress well
# img2dataset's defaults: respect sites that opt out of AI training through X-Robots-Tag.
DISALLOWED_HEADER_DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]


@dataclass(frozen=True)
class ShardDownloader:
    """Downloads one planned shard; a small picklable object that Ray ships to its workers."""

    root: str
    cfg: DownloadConfig
    config_hash: str

    def __call__(self, shard: int) -> tuple[ShardReport, list[Path]]:
        root = DatasetRoot(self.root)
        rows = read_shard_input(root, shard)
        rejected = _rejected_urls(rows["url"].to_pylist(), self.cfg.allowed_schemes)
        workdir = root / f"images/_tmp/{shard_name(shard)}-{uuid.uuid4().hex[:8]}"
        workdir.mkdir(parents=True)
        try:
            fetchable = rows.filter(pa.array([i not in rejected for i in range(rows.num_rows)]))
            fetched, seconds = self._fetch(shard, fetchable, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        table = _with_rejected(fetched, rows, rejected, shard, self.cfg.samples_per_shard)
        if table.num_rows != rows.num_rows or len(set(table["key"].to_pylist())) != rows.num_rows:
            raise RuntimeError(
                f"shard {shard_name(shard)}: img2dataset returned {table.num_rows} rows for {rows.num_rows} urls"
            )
        report = _report(shard, table, seconds)
        return report, self._write(root, shard, table, report)

    def _fetch(self, shard: int, rows: pa.Table, workdir: Path) -> tuple[pa.Table, float]:
        """Run img2dataset's Downloader on the fetchable rows; returns its table and its seconds."""
        feather = workdir / "input.arrow"
        with pa.ipc.new_file(str(feather), rows.schema) as out:
            out.write_table(rows)
        self._downloader(workdir).download_shard((shard, str(feather)))
        stats = json.loads((workdir / f"{shard_name(shard)}_stats.json").read_text())
        return pq.read_table(workdir / f"{shard_name(shard)}.parquet"), stats["duration"]

    def _downloader(self, workdir: Path) -> Downloader:
        cfg = self.cfg
        resizer = CheckedResizer(
            max_pixels=cfg.max_image_pixels,
            image_size=cfg.image_size,
            resize_mode=cfg.resize_mode,
            resize_only_if_bigger=cfg.resize_only_if_bigger,
            encode_quality=cfg.encode_quality,
            encode_format=cfg.encode_format,
            min_image_size=cfg.min_image_size,
        )
        return Downloader(
            sample_writer_class=ParquetSampleWriter,
            resizer=resizer,
            thread_count=cfg.threads_per_shard,
            save_caption=True,
            extract_exif=True,
            output_folder=str(workdir),
            # img2dataset's Reader order: extra columns, then caption, then url.
            column_list=["row_index", "caption", "url"],
            timeout=cfg.timeout_s,
            number_sample_per_shard=cfg.samples_per_shard,
            oom_shard_count=SHARD_DIGITS,
            compute_hash="sha256",
            verify_hash_type=None,
            encode_format=cfg.encode_format,
            retries=cfg.retries,
            user_agent_token=cfg.user_agent_token,
            disallowed_header_directives=DISALLOWED_HEADER_DIRECTIVES,
        )

    def _write(self, root: DatasetRoot, shard: int, table: pa.Table, report: ShardReport) -> list[Path]:
        images = root / f"images/{shard_name(shard)}.parquet"
        stats = root / f"images/{shard_name(shard)}_stats.json"
        metadata = {
            "stage": STAGE,
            "package": f"four-m {__version__}",
            "img2dataset": version("img2dataset"),
            "config_hash": self.config_hash,
            "image_size": str(self.cfg.image_size),
            "resize_mode": self.cfg.resize_mode,
        }
        table = table.replace_schema_metadata({f"four_m.{k}": v for k, v in metadata.items()})
        with atomic_path(images) as temp:
            pq.write_table(table, temp, row_group_size=ROW_GROUP_ROWS)
        errors = Counter(m for m in table["error_message"].to_pylist() if m is not None)
        write_text_atomic(stats, json.dumps({**asdict(report), "errors": dict(errors.most_common(50))}, indent=1))
        return [images, stats]


def _rejected_urls(urls: list[str | None], allowed: tuple[str, ...]) -> dict[int, str]:
    """Rows that must not reach urllib, which would read file:// and ftp:// urls, by row index."""
    rejected = {}
    for index, url in enumerate(urls):
        if not url or not url.strip():
            rejected[index] = "empty url"
            continue
        scheme = urlsplit(url.strip()).scheme.lower()
        if scheme not in allowed:
            rejected[index] = f"unsupported url scheme {scheme or '(none)'!r} (allowed: {', '.join(allowed)})"
    return rejected


def _with_rejected(fetched: pa.Table, rows: pa.Table, rejected: dict[int, str], shard: int, per_shard: int) -> pa.Table:
    """All rows of the shard, sorted by img2dataset key (derived from each row's place in the list)."""
    digits = math.ceil(math.log10(per_shard)) if per_shard > 1 else 1
    if rejected:
        indices = sorted(rejected)
        columns = {
            "row_index": pa.array(indices, pa.int64()),
            "caption": rows["caption"].take(indices),
            "url": rows["url"].take(indices),
            "status": pa.array(["failed_to_download"] * len(indices)),
            "error_message": pa.array([rejected[i] for i in indices]),
        }
        extra = pa.table(
            {n: columns.get(n, pa.nulls(len(indices), fetched.schema.field(n).type)) for n in fetched.column_names}
        )
        fetched = pa.concat_tables([fetched, extra.cast(fetched.schema)])
    keys = [compute_key(i, shard, digits, SHARD_DIGITS) for i in fetched["row_index"].to_pylist()]
    table = fetched.set_column(fetched.column_names.index("key"), "key", pa.array(keys, pa.string()))
    return table.drop_columns(["row_index"]).sort_by("key")


def _report(shard: int, table: pa.Table, seconds: float) -> ShardReport:
    ok = pc.equal(table["status"], SUCCESS)
    failed = table.filter(pc.invert(ok))["error_message"].to_pylist()
    return ShardReport(
        shard=shard,
        rows_in=table.num_rows,
        rows_out=pc.sum(ok).as_py() or 0,
        failures=dict(Counter(failure_reason(m) for m in failed)),
        seconds=round(seconds, 3),
    )


def run_download(config: Config, progress: bool = True) -> StageSummary:
    """Plan the shards (once per root), then download every shard that is not finished."""
    root = DatasetRoot(config.root)
    with sample_site.serving_if_enabled(config.sample, root):
        plan = make_plan(root, config.download)
        state = root.stage(STAGE)
        config_hash = config.section_hash(STAGE)
        stale = state.stale_shards(plan.shard_ids, config_hash)
        if stale:
            raise StaleShardsError(
                f"{len(stale)} finished download shards of {root.path} were made with another download"
                f" config (see {state.folder / 'config.yaml'});"
                " use a new root or delete images/ and _state/download/"
            )
        for folder in (root / "images", state.folder, state.folder / "inputs"):
            clear_temporaries(folder)
        state.write_run_config(config.to_yaml())
        with ray_session(config.ray):
            summary = run_shards(
                state,
                plan.shard_ids,
                ShardDownloader(str(root.path), config.download, config_hash),
                config_hash=config_hash,
                cpus_per_shard=config.download.cpus_per_shard,
                verify_checksums=config.verify_checksums,
                progress=progress,
            )
        clear_temporaries(root / "images")  # the shards' emptied work folders
    write_text_atomic(state.folder / "summary.json", json.dumps(summary.as_dict(), indent=1))
    return summary


class StaleShardsError(UserError):
    """Finished shards were made with another config: mixing them would make an incoherent dataset."""
