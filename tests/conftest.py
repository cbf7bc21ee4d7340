"""Shared fixtures: one real local Ray for the session, and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec.config
import pytest

from four_m.core.config import RayConfig
from four_m.core.halt import halt_after
from four_m.pipeline.executor import ray_session
from four_m.pipeline.sample_site import QuietHandler, bundled_photo_paths, serve_directory

SLOW_SECONDS = 3.0  # longer than the tests' download timeout, so a /slow/ url times out


class SlowCapableHandler(QuietHandler):
    """Serves files; a path under /slow/ answers only after SLOW_SECONDS (to plant timeouts)."""

    def do_GET(self):
        if self.path.startswith("/slow/"):
            time.sleep(SLOW_SECONDS)
            self.path = self.path[len("/slow") :]
        super().do_GET()


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now, all different (held open together while they are picked)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


@pytest.fixture(scope="session")
def free_ports():
    return _free_ports


@dataclass(frozen=True)
class ObjectStore:
    """A bucket on a real S3 API server on 127.0.0.1, and the environment that points fsspec at it."""

    bucket: str
    env: dict[str, str]

    def uri(self, name: str) -> str:
        return f"s3://{self.bucket}/{name}"


@pytest.fixture(scope="module")
def object_store() -> Iterator[ObjectStore]:
    """moto's S3 server (real HTTP, real S3 protocol: s3fs and pyarrow talk to it as to S3), with
    fsspec configured through the ``FSSPEC_S3_*`` variables docs/object-store.md documents, for this module."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
        "FSSPEC_S3_KEY": "test-key",
        "FSSPEC_S3_SECRET": "test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fsspec.config.set_conf_env(fsspec.config.conf)
    # A bucket name of this run only: a remote root's local scratch folder is named after its url
    # (storage.scratch), and test runs beside this one (another checkout's) must not share it.
    store = ObjectStore(f"four-m-test-{secrets.token_hex(4)}", env)
    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="test-key", aws_secret_access_key="test-secret"
    )
    client.create_bucket(Bucket=store.bucket)
    try:
        yield store
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        fsspec.config.conf.pop("s3", None)
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def _session_members(session: int) -> list[int]:
    """Live processes of a session. Ray's workers leave their driver's process group, not its session."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            state, _, _, sid = stat.read_text().rsplit(")", 1)[1].split()[:4]
            if int(sid) == session and state != "Z":
                members.append(int(stat.parent.name))
    return members


def _ended(run: subprocess.Popen) -> bool:
    """Whether ``run`` has ended, without reaping it as ``poll`` would: see ``_kill_session``."""
    if run.returncode is not None:
        return True
    return os.waitid(os.P_PID, run.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_session(run: subprocess.Popen) -> None:
    """SIGKILL every process of a run started with ``start_new_session=True``, Ray's workers included
    (a lost machine, not a shutdown), wait until none is left, then reap the run.

    The session's id is the run's pid, which the kernel gives no other process while the run is
    unreaped or any process of its session lives. Watch the run with ``run_ended``, never ``poll``
    or ``wait``, until this is called: then no other job's session (under a reused pid, on a busy
    machine) can be taken for the run's."""
    if run.returncode is not None and Path(f"/proc/{run.pid}").exists():
        return  # reaped already, and its pid is another process's: so nothing of its session is left
    deadline = time.monotonic() + 30
    while members := _session_members(run.pid):
        assert time.monotonic() < deadline, f"processes {members} survive SIGKILL"
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    run.wait()


@pytest.fixture(scope="session")
def kill_session():
    return _kill_session


@pytest.fixture(scope="session")
def run_ended():
    return _ended


@contextlib.contextmanager
def _halted_after_first_marker(verb: str, config_file: Path, markers: Path, limit_s: float = 300):
    """Run a stage's CLI until it has written exactly one shard marker and halted there (the
    ``halt_after`` hook blocks every process of the run before any further marker), yield the
    halted run, then SIGKILL all its processes, Ray's included. No race with the run's pace:
    however fast or loaded the machine, the kill lands after one shard, never after the last."""
    claims = config_file.with_name(f"{config_file.stem}.halt")
    shutil.rmtree(claims, ignore_errors=True)
    run = subprocess.Popen(
        [sys.executable, "-m", "four_m", verb, "--config", str(config_file), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, **halt_after(1, "*.done.json", claims)},
    )
    try:
        deadline = time.monotonic() + limit_s
        while not list(markers.rglob("*.done.json")):
            assert not _ended(run), f"{verb} ended before writing a marker"
            assert time.monotonic() < deadline, f"{verb} wrote no marker in {limit_s} s"
            time.sleep(0.2)
        yield run
    finally:
        _kill_session(run)


def _kill_after_first_marker(verb: str, config_file: Path, markers: Path) -> int:
    """Run a stage's CLI, SIGKILL it once it has written its first shard marker; the markers left."""
    with _halted_after_first_marker(verb, config_file, markers):
        pass
    return len(list(markers.rglob("*.done.json")))


@pytest.fixture
def kill_after_first_marker():
    return _kill_after_first_marker


@pytest.fixture
def halted_after_first_marker():
    return _halted_after_first_marker


@pytest.fixture(scope="session")
def ray_local():
    """Real Ray, started once as the stages start it (on 127.0.0.1 only): every stage's
    ray_session joins it instead of starting its own."""
    with ray_session(RayConfig(num_cpus=2, object_store_mb=256)):
        yield


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
