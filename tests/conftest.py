"""Shared fixtures: one real local Ray for the session, and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from four_m.pipeline.sample_site import QuietHandler, bundled_photo_paths, serve_directory

SLOW_SECONDS = 3.0  # longer than the tests' download timeout, so a /slow/ url times out


class SlowCapableHandler(QuietHandler):
    """Serves files; a path under /slow/ answers only after SLOW_SECONDS (to plant timeouts)."""

    def do_GET(self):
        if self.path.startswith("/slow/"):
            time.sleep(SLOW_SECONDS)
            self.path = self.path[len("/slow") :]
        super().do_GET()


def _kill_after_first_marker(verb: str, config_file: Path, markers: Path, limit_s: float = 300) -> int:
    """Run a stage's CLI, SIGKILL its whole process group (Ray included) as soon as one shard's
    marker appears, and return how many markers there were at the kill."""
    run = subprocess.Popen(
        [sys.executable, "-m", "four_m", verb, "--config", str(config_file), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + limit_s
    while not list(markers.glob("*.done.json")) and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    return len(list(markers.glob("*.done.json")))


@pytest.fixture
def kill_after_first_marker():
    return _kill_after_first_marker


@pytest.fixture(scope="session")
def ray_local():
    """Real Ray, started once: every stage's ray_session joins it instead of starting its own."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20, logging_level="warning")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def photos() -> list[tuple[Path, str]]:
    found = bundled_photo_paths()
    assert len(found) >= 8, "the bundled sample photos should be installed"
    return found


@pytest.fixture(scope="session")
def site(tmp_path_factory, photos) -> Path:
    """Good photos, an html page named .jpg and a truncated jpeg."""
    folder = tmp_path_factory.mktemp("site")
    for number, (path, _) in enumerate(photos):
        shutil.copyfile(path, folder / f"{number:03d}_{path.name}")
    (folder / "not_an_image.jpg").write_text("<html>moved</html>")
    jpeg = next(p for p, _ in photos if p.suffix == ".jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return folder


@pytest.fixture(scope="session")
def server(site) -> str:
    with serve_directory(site, "127.0.0.1", 0, SlowCapableHandler) as base_url:
        yield base_url
