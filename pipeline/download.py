"""The download stage: url lists -> ``images/<shard>.parquet`` with img2dataset, on Ray.

Per shard, img2dataset's own ``Downloader`` (its threads, resizer, parquet writer and key scheme)
fetches the rows into a private temporary folder; we then put back the rows it must not fetch
(unsupported url schemes), restore img2dataset's keys for them, sort by key so a shard's bytes
do not depend on the order downloads finished, add provenance, and move the shard into place.
Every input row ends in the output exactly once: as an image, or as a failure with its reason.
Each request follows redirects only to urls a list may hold, and has a total deadline
(``pipeline/fetch.py``).

``--retry-failed`` (``run_retry_failed``) re-fetches only the failed rows of finished shards with
the same downloader and settings, and puts each result in its row's place (same key, same order).
Rows whose url the stage refuses (``file://``, empty) are never retried: no retry can fetch them.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from img2dataset.downloader import Downloader, compute_key
from img2dataset.writer import ParquetSampleWriter

from four_m import __version__
from four_m.core import storage
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
from four_m.core.failures import SUCCESS, failure_reason
from four_m.core.summary import ShardReport, StageSummary
from four_m.pipeline import sample_site
from four_m.pipeline.executor import map_shards, ray_session, run_shards
from four_m.pipeline.fetch import guarded_fetching, url_problem
from four_m.pipeline.image_check import CheckedResizer
from four_m.pipeline.stage import Output, StageRun, Summary, write_summary
from four_m.pipeline.url_list import make_plan, read_shard_input

STAGE = "download"
log = logging.getLogger(__name__)
ROW_GROUP_ROWS = 256  # ~8 MB of 256 px JPEGs: small enough to stream, large enough to compress well
# img2dataset's defaults: respect sites that opt out of AI training through X-Robots-Tag.
DISALLOWED_HEADER_DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]


@dataclass
class RetryReport:
    """One finished shard's retry of its failed rows."""

    shard: int
    retried: dict[str, int] = field(default_factory=dict)
    """Rows fetched again, by the reason they had failed."""
    recovered: int = 0
    still_failing: dict[str, int] = field(default_factory=dict)
    """Retried rows that failed again, by their new reason."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Failed rows not retried (their url is refused: file://, empty), by reason."""
    rewritten: bool = False
    """Whether any row changed, so that the shard (and its marker) was rewritten."""


@dataclass
class RetrySummary:
    """``download --retry-failed`` over every finished shard: one line, and ``retry_summary.json``."""

    shards_retried: int = 0
    shards_rewritten: int = 0
    urls_retried: int = 0
    recovered: int = 0
    still_failing: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    shards_unfinished: int = 0
    """Shards a plain ``download`` has not finished: not retried (run it first)."""
    shards_failed: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, report: RetryReport) -> None:
        self.shards_retried += bool(report.retried)
        self.shards_rewritten += report.rewritten
        self.urls_retried += sum(report.retried.values())
        self.recovered += report.recovered
        # Plain dicts, not Counters: dataclasses.asdict would turn a Counter into counts of pairs.
        self.still_failing = dict(Counter(self.still_failing) + Counter(report.still_failing))
        self.skipped = dict(Counter(self.skipped) + Counter(report.skipped))

    def line(self) -> str:
        def counts(by_reason: dict[str, int]) -> str:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(by_reason.items()))
            return f"{sum(by_reason.values())}{f' ({reasons})' if reasons else ''}"

        return (
            f"download --retry-failed: shards retried {self.shards_retried} (rewritten {self.shards_rewritten}),"
            f" urls retried {self.urls_retried}, recovered {self.recovered},"
            f" still failing {counts(self.still_failing)}; not retried {counts(self.skipped)};"
            f" shards not finished {self.shards_unfinished}, failed {len(self.shards_failed)}; {self.seconds:.1f} s"
        )


@dataclass(frozen=True)
class ShardDownloader:
    """Downloads one planned shard; a small picklable object that Ray ships to its workers."""

    root: str
    cfg: DownloadConfig
    config_hash: str

    def __call__(self, shard: int) -> tuple[ShardReport, list[storage.RootPath]]:
        root = DatasetRoot(self.root)
        rows = read_shard_input(root, shard)
        rejected = _rejected_urls(rows["url"].to_pylist(), self.cfg.allowed_schemes)
        fetchable = rows.filter(pa.array([i not in rejected for i in range(rows.num_rows)]))
        fetched, seconds = self._fetch(root, shard, fetchable)
        table = self._keyed(shard, _with_rejected(fetched, rows, rejected))
        if table.num_rows != rows.num_rows or len(set(table["key"].to_pylist())) != rows.num_rows:
            raise RuntimeError(
                f"shard {shard_name(shard)}: img2dataset returned {table.num_rows} rows for {rows.num_rows} urls"
            )
        report = _report(shard, table, seconds)
        return report, self._write(root, shard, table, report)

    def retry(self, shard: int) -> RetryReport:
        """Re-fetch the failed, fetchable rows of a finished shard; rewrite it if any row changed.

        Each retried row replaces its old self (same key, same place); the stats json gains a
        ``retries`` entry and the marker is rewritten, so later stages see a new input and redo
        the shard. A shard where nothing changed is left byte for byte as it was.
        """
        root = DatasetRoot(self.root)
        images = root / f"images/{shard_name(shard)}.parquet"
        table = storage.read_table(images)
        failed = table.filter(pc.invert(pc.equal(table["status"], SUCCESS)))
        refused = _rejected_urls(failed["url"].to_pylist(), self.cfg.allowed_schemes)
        messages = failed["error_message"].to_pylist()
        report = RetryReport(shard, skipped=dict(Counter(failure_reason(messages[i]) for i in refused)))
        keys = {k for i, k in enumerate(failed["key"].to_pylist()) if i not in refused}
        if not keys:
            return report
        report.retried = dict(Counter(failure_reason(m) for i, m in enumerate(messages) if i not in refused))
        planned = read_shard_input(root, shard)
        wanted = pa.array([k in keys for k in self._keys(shard, planned["row_index"].to_pylist())])
        fetched, seconds = self._fetch(root, shard, planned.filter(wanted))
        retried = self._keyed(shard, fetched)
        if sorted(retried["key"].to_pylist()) != sorted(keys):
            raise RuntimeError(
                f"shard {shard_name(shard)}: img2dataset returned other rows than the {len(keys)} retried"
            )
        ok = pc.equal(retried["status"], SUCCESS)
        report.recovered = pc.sum(ok).as_py() or 0
        still = retried.filter(pc.invert(ok))["error_message"].to_pylist()
        report.still_failing = dict(Counter(failure_reason(m) for m in still))
        merged = _merged(table, retried)
        if merged.equals(table):
            return report
        stats_file = root / f"images/{shard_name(shard)}_stats.json"
        stats = json.loads(stats_file.read_text())
        attempt = {**asdict(report), "seconds": round(seconds, 3), "at": time.time()}
        del attempt["shard"], attempt["rewritten"]
        files = self._write(
            root, shard, merged, _report(shard, merged, stats["seconds"]), [*stats.get("retries", []), attempt]
        )
        root.stage(STAGE).mark_done(shard, merged.num_rows, files, self.config_hash)
        report.rewritten = True
        return report

    def _fetch(self, root: DatasetRoot, shard: int, rows: pa.Table) -> tuple[pa.Table, float]:
        """Run img2dataset's Downloader on ``rows`` (their urls as URIs) in a private work folder;
        its table, with the urls as listed, and its seconds."""
        workdir = storage.scratch(root / "images/_tmp") / f"{shard_name(shard)}-{uuid.uuid4().hex[:8]}"
        workdir.mkdir(parents=True)
        listed = dict(zip(rows["row_index"].to_pylist(), rows["url"].to_pylist(), strict=True))
        uris = pa.array([as_uri(u) for u in listed.values()], pa.string())
        try:
            feather = workdir / "input.arrow"
            with pa.ipc.new_file(str(feather), rows.schema) as out:
                out.write_table(rows.set_column(rows.column_names.index("url"), "url", uris))
            with guarded_fetching(self.cfg.allowed_schemes, self.cfg.deadline_s, self.cfg.max_image_bytes):
                self._downloader(workdir).download_shard((shard, str(feather)))
            stats = json.loads((workdir / f"{shard_name(shard)}_stats.json").read_text())
            fetched = pq.read_table(workdir / f"{shard_name(shard)}.parquet")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        urls = pa.array([listed[i] for i in fetched["row_index"].to_pylist()], pa.string())
        return fetched.set_column(fetched.column_names.index("url"), "url", urls), stats["duration"]

    def _keys(self, shard: int, row_indices: list[int]) -> list[str]:
        """img2dataset's keys for the planned rows of a shard (derived from each row's place in the list)."""
        per_shard = self.cfg.samples_per_shard
        digits = math.ceil(math.log10(per_shard)) if per_shard > 1 else 1
        return [compute_key(i, shard, digits, SHARD_DIGITS) for i in row_indices]

    def _keyed(self, shard: int, table: pa.Table) -> pa.Table:
        """img2dataset's table with each row's key restored from its row index, sorted by key."""
        keys = pa.array(self._keys(shard, table["row_index"].to_pylist()), pa.string())
        table = table.set_column(table.column_names.index("key"), "key", keys)
        return table.drop_columns(["row_index"]).sort_by("key")

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

    def _write(
        self, root: DatasetRoot, shard: int, table: pa.Table, report: ShardReport, retries: list[dict] = ()
    ) -> list[storage.RootPath]:
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
            storage.write_table(table, temp, row_group_size=ROW_GROUP_ROWS)
        errors = Counter(m for m in table["error_message"].to_pylist() if m is not None)
        record = {**asdict(report), "errors": dict(errors.most_common(50)), **({"retries": retries} if retries else {})}
        write_text_atomic(stats, json.dumps(record, indent=1))
        return [images, stats]


def _rejected_urls(urls: list[str | None], allowed: tuple[str, ...]) -> dict[int, str]:
    """Rows that must not reach urllib, which would read file:// and ftp:// urls, by row index.

    No retry can fetch these: ``--retry-failed`` leaves them as they are.
    """
    problems = {index: url_problem(url, allowed) for index, url in enumerate(urls)}
    return {index: problem for index, problem in problems.items() if problem}


# Every printable ASCII character stays: only spaces and non-ASCII characters are percent-encoded.
_URI_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))


def as_uri(url: str) -> str:
    """The ASCII URI of a listed url, as a browser sends it: urllib refuses non-ASCII characters
    ('ascii' codec can't encode), which web lists hold in paths and queries (IRIs). Non-ASCII
    host names are not IDNA-encoded: they fail to resolve and are counted as such."""
    return quote(url.strip(), safe=_URI_SAFE)


def _with_rejected(fetched: pa.Table, rows: pa.Table, rejected: dict[int, str]) -> pa.Table:
    """The fetched rows plus the refused ones, each refused row failed with its reason."""
    if not rejected:
        return fetched
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
    return pa.concat_tables([fetched, extra.cast(fetched.schema)])


def _merged(table: pa.Table, retried: pa.Table) -> pa.Table:
    """``table`` with each row of ``retried`` in place of the row of the same key: each key once, same order."""
    kept = table.filter(pc.invert(pc.is_in(table["key"], value_set=retried["key"])))
    return pa.concat_tables([kept, retried.select(table.column_names).cast(table.schema)]).sort_by("key")


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
    with root.lock(STAGE), sample_site.serving_if_enabled(config.sample, root):
        run, downloader = _prepare(root, config, StageSummary(stage=STAGE))
        with ray_session(config.ray):
            run_shards(run, downloader, num_cpus=config.download.cpus_per_shard, progress=progress)
        clear_temporaries(root / "images")  # the shards' emptied work folders
    run.write_summary(run.summary.as_dict())
    return run.summary


def run_retry_failed(config: Config, progress: bool = True) -> RetrySummary:
    """Re-fetch the failed rows of every finished shard, merging what succeeds into place."""
    started = time.perf_counter()
    root = DatasetRoot(config.root)
    with root.lock(STAGE), sample_site.serving_if_enabled(config.sample, root):
        run, downloader = _prepare(root, config, RetrySummary())
        pending = set(run.pending(STAGE))
        finished = [s for s in run.inputs[STAGE] if s not in pending]
        if not finished:
            raise RetryError(f"no finished download shards under {root.path}: run the download stage first")
        summary = run.summary
        summary.shards_unfinished = len(pending)
        failing = [
            s for s in finished if json.loads((root / f"images/{shard_name(s)}_stats.json").read_text())["failures"]
        ]
        with ray_session(config.ray):
            reports, summary.shards_failed = map_shards(
                failing,
                downloader.retry,
                num_cpus=config.download.cpus_per_shard,
                desc="download --retry-failed",
                progress=progress,
            )
        clear_temporaries(root / "images")
    for shard in sorted(reports):
        report = reports[shard]
        summary.add(report)
        if report.still_failing:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(report.still_failing.items()))
            log.warning(
                "download --retry-failed: shard %05d: %d of %d retried urls still fail (%s)",
                shard,
                sum(report.still_failing.values()),
                sum(report.retried.values()),
                reasons,
            )
    summary.seconds = time.perf_counter() - started
    write_summary(root, STAGE, asdict(summary), "retry_summary.json")
    return summary


def _prepare(root: DatasetRoot, config: Config, summary: Summary) -> tuple[StageRun[Summary], ShardDownloader]:
    """The run over the plan's shards, checked against finished shards' config, with the temporaries
    of a killed run gone; and the downloader its tasks run."""
    plan = make_plan(root, config.download)
    config_hash = config.section_hash(STAGE)
    state = root.stage(STAGE)
    run = StageRun(
        root,
        config,
        STAGE,
        outputs={STAGE: Output("images", state, config_hash)},
        inputs={STAGE: dict.fromkeys(plan.shard_ids, ())},  # the url list is checked by the plan itself
        summary=summary,
    )
    run.check_not_stale(plan.shard_ids, StaleShardsError, "download config")
    run.begin(state.folder / "inputs")
    return run, ShardDownloader(str(root.path), config.download, config_hash)


class StaleShardsError(UserError):
    """Finished shards were made with another config: mixing them would make an incoherent dataset."""


class RetryError(UserError):
    """Nothing to retry: no download shard is finished."""
