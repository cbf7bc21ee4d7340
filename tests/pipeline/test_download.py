"""The download stage for real: img2dataset on Ray against an HTTP server on 127.0.0.1."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, quote

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from four_m.core.config import Config, DownloadConfig, RayConfig, SampleConfig
from four_m.core.dataset_root import DatasetRoot
from four_m.pipeline.download import run_download
from four_m.pipeline.sample_site import QuietHandler, serve_directory

IMAGE_SIZE = 64
PLANTED = {  # path (or full url) -> the reason it must be counted under
    "/missing.jpg": "http_404",
    "/not_an_image.jpg": "not_an_image",
    "/truncated.jpg": "truncated_image",
    "/slow/not_an_image.jpg": "timeout",
    "file:///etc/hostname": "unsupported_scheme",
    "ftp://127.0.0.1/x.jpg": "unsupported_scheme",
    "": "empty_url",
}


def _rows(server: str, site: Path) -> list[tuple[str, str]]:
    """Good photos with the planted failures spread between them, so every shard has some."""
    good = [(f"{server}/{p.name}", f"photo {p.stem}") for p in sorted(site.glob("0*"))]
    bad = [
        (path if "://" in path or not path else f"{server}{path}", f"planted {reason}")
        for path, reason in PLANTED.items()
    ]
    rows = []
    for index in range(max(len(good), len(bad))):
        rows += good[index : index + 1] + bad[index : index + 1]
    return rows


def _config(root: Path, rows, **download) -> Config:
    (root / "urls").mkdir(parents=True, exist_ok=True)
    (root / "urls/list.tsv").write_text("".join(f"{u}\t{c}\n" for u, c in rows))
    settings = dict(samples_per_shard=5, image_size=IMAGE_SIZE, timeout_s=1.0, threads_per_shard=8, cpus_per_shard=0.5)
    return Config(
        root=str(root),
        ray=RayConfig(num_cpus=2),
        download=DownloadConfig(**{**settings, **download}),
        sample=SampleConfig(enabled=False),
    )


def _all_rows(root: Path) -> list[dict]:
    return [row for f in sorted((root / "images").glob("*.parquet")) for row in pq.read_table(f).to_pylist()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, ray_local, server, site):
    root = tmp_path_factory.mktemp("dl") / "root"
    rows = _rows(server, site)
    config = _config(root, rows)
    return config, rows, run_download(config, progress=False)


def test_counts_match_the_planted_failures_exactly(finished):
    config, rows, summary = finished
    good = len(rows) - len(PLANTED)
    assert summary.rows_in == len(rows)
    assert summary.rows_out == good
    assert dict(summary.failures) == dict(Counter(PLANTED.values()))
    assert summary.shards_done == -(-len(rows) // 5) and not summary.shards_failed


def test_every_row_is_kept_once_with_its_caption_and_reason(finished):
    config, rows, _ = finished
    written = _all_rows(Path(config.root))
    assert len(written) == len(rows)
    assert len({r["key"] for r in written}) == len(rows)
    assert sorted((r["url"], r["caption"]) for r in written) == sorted(rows)
    for row in written:
        if row["status"] == "success":
            image = Image.open(io.BytesIO(row["jpg"]))
            assert min(image.size) == IMAGE_SIZE and (row["width"], row["height"]) == image.size
        else:
            assert row["jpg"] is None and row["error_message"]


def test_keys_follow_img2dataset_and_shards_are_sorted(finished):
    config, rows, _ = finished
    first, second = (pq.read_table(Path(config.root) / f"images/0000{s}.parquet") for s in (0, 1))
    # 5 rows a shard: one digit for the row, five for the shard, as img2dataset names them
    assert first["key"].to_pylist() == ["000000", "000001", "000002", "000003", "000004"]
    assert second["key"].to_pylist() == ["000010", "000011", "000012", "000013", "000014"]
    assert first["url"].to_pylist() == [u for u, _ in rows[:5]]


def test_shards_carry_provenance_and_stats(finished):
    config, _, summary = finished
    root = Path(config.root)
    metadata = pq.read_schema(root / "images/00000.parquet").metadata
    assert metadata[b"four_m.stage"] == b"download"
    assert metadata[b"four_m.config_hash"] == config.section_hash("download").encode()
    stats = [json.loads(p.read_text()) for p in sorted((root / "images").glob("*_stats.json"))]
    assert sum(s["rows_in"] for s in stats) == summary.rows_in
    assert Counter() + sum((Counter(s["failures"]) for s in stats), Counter()) == summary.failures
    assert yaml.safe_load((root / "_state/download/config.yaml").read_text())["download"]["image_size"] == IMAGE_SIZE


def test_a_rerun_skips_finished_shards_and_redoes_broken_ones(finished):
    config, rows, first = finished
    root = DatasetRoot(config.root)
    again = run_download(config, progress=False)
    assert (again.shards_done, again.shards_skipped) == (0, first.shards_done)

    shard1 = root / "images/00001.parquet"
    shard1.write_bytes(shard1.read_bytes()[:100])  # a partial file under a finished marker
    (root / "_state/download/00002.done.json").unlink()  # a shard whose marker never got written
    before = (root / "images/00003.parquet").stat().st_mtime_ns
    redo = run_download(config, progress=False)
    assert redo.shards_done == 2 and redo.shards_skipped == first.shards_done - 2
    assert (root / "images/00003.parquet").stat().st_mtime_ns == before
    assert len({r["key"] for r in _all_rows(root.path)}) == len(rows) == len(_all_rows(root.path))


def _cli(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "four_m", *args, "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def test_a_killed_run_resumes_with_every_key_exactly_once(tmp_path, ray_local, server, site, kill_after_first_marker):
    root = tmp_path / "root"
    good = [(f"{server}/{p.name}", p.stem) for p in sorted(site.glob("0*"))]
    rows = (good * 3)[:24]
    config = _config(root, rows, samples_per_shard=4, timeout_s=10.0, threads_per_shard=1)
    config_file = tmp_path / "c.yaml"
    config_file.write_text(config.to_yaml())
    done_at_kill = kill_after_first_marker("download", config_file, root / "_state/download")
    assert done_at_kill == 1, "the run halts after its first marker until it is killed"

    resumed = run_download(config, progress=False)
    assert resumed.shards_skipped == done_at_kill and resumed.shards_done == 6 - done_at_kill
    written = _all_rows(root)
    assert Counter(r["key"] for r in written) == Counter({k: 1 for k in {r["key"] for r in written}})
    assert len(written) == len(rows) and all(r["status"] == "success" for r in written)
    assert not list((root / "images").glob(".*.tmp")) and not (root / "images/_tmp").exists()


def test_cli_stops_on_a_malformed_list_before_any_work(tmp_path):
    root = tmp_path / "root"
    (root / "urls").mkdir(parents=True)
    (root / "urls/list.parquet").write_bytes(b"PAR1 not really")
    run = _cli("download", "--root", str(root), "--set", "sample.enabled=false")
    out, err = run.communicate(timeout=120)
    assert run.returncode == 2
    assert err.strip().count("\n") == 0 and "list.parquet: unreadable parquet" in err
    assert not (root / "images").exists()


def test_a_stage_missing_its_input_fails_in_one_line(tmp_path):
    run = _cli("sample", "--root", str(tmp_path / "root"))
    out, err = run.communicate(timeout=60)
    assert run.returncode == 2 and "run `make train`" in err and err.strip().count("\n") == 0


TRICKLE_S = 0.5  # a byte per interval, well within the socket timeout: only the deadline cuts it
TRICKLE_BYTES = 480  # each trickled answer below would take four minutes


class HostileHandler(QuietHandler):
    """The site's files, plus ``/redirect?to=URL`` (a 302 there), ``/trickle-body`` (a body sent a
    byte at a time) and ``/trickle-headers`` (the headers sent the same way)."""

    def do_GET(self):
        path, _, query = self.path.partition("?")
        if path == "/redirect":
            self.send_response(302)
            self.send_header("Location", parse_qs(query)["to"][0])
            self.end_headers()
        elif path == "/trickle-body":
            self.send_response(200)
            self.send_header("Content-Length", str(TRICKLE_BYTES))
            self.end_headers()
            self._trickle(b"x" * TRICKLE_BYTES)
        elif path == "/trickle-headers":
            self.wfile.write(b"HTTP/1.0 200 OK\r\n")
            self._trickle(b"X-Padding: " + b"x" * TRICKLE_BYTES + b"\r\n\r\n")
        else:
            super().do_GET()

    def _trickle(self, data: bytes) -> None:
        for byte in data:
            self.wfile.write(bytes([byte]))
            time.sleep(TRICKLE_S)


@pytest.fixture(scope="module")
def hostile(site):
    with serve_directory(site, "127.0.0.1", 0, HostileHandler) as base_url:
        yield base_url


def _redirect(base: str, target: str) -> str:
    return f"{base}/redirect?to={quote(target, safe='')}"


def test_a_redirect_obeys_the_url_rule_before_any_connection(tmp_path, ray_local, hostile, site):
    photo = f"{hostile}/{sorted(site.glob('0*'))[0].name}"
    with socket.create_server(("127.0.0.1", 0)) as listener:  # the ftp "server": records connections
        ftp = f"ftp://127.0.0.1:{listener.getsockname()[1]}/x.jpg"
        rows = [
            (_redirect(hostile, ftp), "to ftp"),
            (_redirect(hostile, "file:///etc/hostname"), "to file"),
            (_redirect(hostile, "https:///x.jpg"), "to no host"),
            (_redirect(hostile, photo), "to a photo"),
        ]
        summary = run_download(_config(tmp_path / "root", rows, samples_per_shard=len(rows)), progress=False)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):  # a connection, even one closed since, would wait here
            listener.accept()
    assert summary.rows_out == 1 and dict(summary.failures) == {"unsupported_scheme": 2, "invalid_url": 1}
    written = {r["caption"]: r for r in _all_rows(tmp_path / "root")}
    assert written["to ftp"]["error_message"] == (
        f"unsupported url scheme 'ftp' (allowed: http, https), redirected from {rows[0][0]}"
    )
    assert written["to a photo"]["status"] == "success"


def test_a_trickling_server_is_cut_off_at_the_deadline(tmp_path, ray_local, hostile, site):
    photos = [(f"{hostile}/{p.name}", "photo") for p in sorted(site.glob("0*"))[:2]]
    rows = [(f"{hostile}/trickle-body", "body"), (f"{hostile}/trickle-headers", "headers"), *photos]
    config = _config(tmp_path / "root", rows, samples_per_shard=len(rows), timeout_s=5.0, deadline_s=2.0)
    started = time.monotonic()
    summary = run_download(config, progress=False)
    # Half the trickle's time, not a bound on the machine's pace: Ray's scheduling and a loaded machine
    # cost seconds, waiting out the trickle (a deadline noticed only at the end) minutes.
    assert time.monotonic() - started < TRICKLE_BYTES * TRICKLE_S / 2, "the shard waited for the trickle"
    assert summary.rows_out == 2 and dict(summary.failures) == {"deadline_exceeded": 2}
    failed = [r for r in _all_rows(tmp_path / "root") if r["status"] != "success"]
    assert {r["caption"]: r["error_message"] for r in failed} == {
        "body": "deadline exceeded: 2 s",
        "headers": "deadline exceeded: 2 s",
    }
