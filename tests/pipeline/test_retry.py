"""``download --retry-failed`` for real: img2dataset on Ray against local servers that answer 503,
or are not listening yet, the first time and serve the images afterwards."""

from __future__ import annotations

import io
import json
import socket
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from four_m.cli import main
from four_m.core.dataset_root import DatasetRoot, sha256_file
from four_m.core.failures import failure_reason
from four_m.pipeline.download import run_download, run_retry_failed
from four_m.pipeline.sample_site import QuietHandler, serve_directory


class FlakyHandler(QuietHandler):
    """A path under /flaky/ answers 503 the first time it is asked for, then serves the file."""

    asked: set[str] = set()

    def do_GET(self):
        if self.path.startswith("/flaky/"):
            first = self.path not in self.asked
            self.asked.add(self.path)
            if first:
                self.send_error(503, "try again later")
                return
            self.path = self.path.removeprefix("/flaky")
        super().do_GET()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _snapshot(root: Path) -> dict[str, str]:
    """Checksums of every shard, stats file and marker."""
    files = [*(root / "images").glob("*.*"), *(root / "_state/download").glob("*.done.json")]
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(files)}


def _rows(root: Path) -> list[dict]:
    return [r for p in sorted((root / "images").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


@pytest.fixture(scope="module")
def retried(tmp_path_factory, ray_local, site, small_config):
    root = tmp_path_factory.mktemp("retry") / "root"
    good = sorted(p.name for p in site.glob("0*"))
    later = f"http://127.0.0.1:{_free_port()}"  # nothing listens there during the first run
    with serve_directory(site, "127.0.0.1", 0, type("Flaky", (FlakyHandler,), {"asked": set()})) as server:
        rows = [  # four a shard: shard 2 has nothing a retry can recover
            (f"{server}/{good[0]}", "good"),
            (f"{server}/flaky/{good[1]}", "503 the first time"),
            (f"{server}/{good[2]}", "good"),
            (f"{server}/missing.jpg", "404 every time"),
            (f"{later}/{good[3]}", "refused the first time"),
            (f"{server}/{good[4]}", "good"),
            ("file:///etc/hostname", "never fetched"),
            (f"{server}/flaky/{good[5]}", "503 the first time"),
            (f"{server}/{good[6]}", "good"),
            (f"{server}/gone.jpg", "404 every time"),
            ("ftp://127.0.0.1/x.jpg", "never fetched"),
        ]
        (root / "urls").mkdir(parents=True)
        (root / "urls/list.tsv").write_text("".join(f"{u}\t{c}\n" for u, c in rows))
        config = small_config(
            root,
            "sample.enabled=false",
            "download.urls=urls/list.tsv",
            "download.samples_per_shard=4",
            "download.image_size=64",
            "download.threads_per_shard=8",
            "download.cpus_per_shard=0.5",
        )
        first = run_download(config, progress=False)
        before = (_rows(root), _snapshot(root))
        with serve_directory(site, "127.0.0.1", int(later.rsplit(":", 1)[1])):
            retry = run_retry_failed(config, progress=False)
            middle = (_rows(root), _snapshot(root))
            again = run_retry_failed(config, progress=False)
    return root, rows, first, before, retry, middle, again


def test_the_first_run_counts_every_failure(retried):
    _, rows, first, *_ = retried
    assert dict(first.failures) == {"http_503": 2, "connection_error": 1, "http_404": 2, "unsupported_scheme": 2}
    assert first.rows_out == len(rows) - 7


def test_a_retry_recovers_the_passing_failures_and_says_so(retried):
    *_, retry, _, _ = retried
    assert (retry.shards_retried, retry.shards_rewritten, retry.urls_retried) == (3, 2, 5)
    assert retry.recovered == 3
    assert dict(retry.still_failing) == {"http_404": 2} and dict(retry.skipped) == {"unsupported_scheme": 2}
    assert "urls retried 5, recovered 3, still failing 2 (http_404: 2); not retried 2 (unsupported_scheme: 2)" in (
        retry.line()
    )


def test_recovered_rows_take_their_old_place_with_the_same_key(retried):
    root, rows, _, (old_rows, _), _, (new_rows, _), _ = retried
    assert [r["key"] for r in new_rows] == [r["key"] for r in old_rows]
    assert len({r["key"] for r in new_rows}) == len(rows)
    assert [(r["url"], r["caption"]) for r in new_rows] == rows  # the list's order, url as listed
    for old, new in zip(old_rows, new_rows, strict=True):
        if old["status"] == "success" or new["status"] != "success":
            assert new == old  # untouched, or failing again for the same reason
        else:
            assert new["caption"] in ("503 the first time", "refused the first time")
            assert min(Image.open(io.BytesIO(new["jpg"])).size) == 64 and new["error_message"] is None


def test_stats_and_markers_follow_the_rewritten_shards_only(retried):
    root, _, _, (_, before), _, (rows, after), _ = retried
    changed = {path for path in after if after[path] != before[path]}
    shard_files = {f"images/0000{s}.parquet" for s in (0, 1)}
    stats_files = {f"images/0000{s}_stats.json" for s in (0, 1)}
    markers = {f"_state/download/0000{s}.done.json" for s in (0, 1)}
    assert changed == shard_files | stats_files | markers  # shard 2 retried its 404 and stays as it was
    state = DatasetRoot(root).stage("download")
    for shard in (0, 1):
        stats = json.loads((root / f"images/0000{shard}_stats.json").read_text())
        shard_rows = [r for r in rows if r["key"].startswith(f"0000{shard}")]
        failed = Counter(failure_reason(r["error_message"]) for r in shard_rows if r["status"] != "success")
        assert stats["failures"] == dict(failed) and stats["rows_in"] == stats["rows_out"] + failed.total()
        assert stats["retries"][-1]["recovered"] >= 1
        assert state.is_done(shard, verify_checksums=True)


def test_a_second_retry_with_nothing_recoverable_changes_nothing(retried):
    *_, (_, middle), again = retried
    root = retried[0]
    assert again.recovered == 0 and again.shards_rewritten == 0 and again.urls_retried == 2
    assert _snapshot(root) == middle


def test_cli_retry_on_a_root_with_nothing_finished_stops_in_one_line(tmp_path, capsys):
    root = tmp_path / "root"
    (root / "urls").mkdir(parents=True)
    (root / "urls/list.tsv").write_text("http://127.0.0.1:9/x.jpg\tx\n")
    status = main(["download", "--retry-failed", "--root", str(root), "--no-progress", "--set", "sample.enabled=false"])
    err = capsys.readouterr().err
    assert status == 2 and err.strip().count("\n") == 0 and "no finished download shards" in err
    assert not (root / "images").exists()
