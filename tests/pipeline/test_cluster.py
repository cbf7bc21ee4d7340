"""The cluster path for real: a two-node Ray cluster on 127.0.0.1, the stages submitted as Ray jobs.

``ray start`` starts a head node and one worker node, each in its own session, with a private
temporary folder, private ports and a private auth token, so that nothing here touches the other Ray
sessions on this machine (and never ``ray stop``, which stops every one of them). The download and
label stages run as ``ray job submit`` jobs whose driver joins the cluster through the
``RAY_ADDRESS`` that Ray sets for a job, into a dataset root on an S3 server (moto's, on 127.0.0.1);
their outputs are then checked. Slow: ``make cluster-test``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from four_m.core import storage
from four_m.core.config import RayConfig
from four_m.core.modalities import labelled_modalities
from four_m.pipeline.executor import cluster_address

RAY = Path(sys.executable).with_name("ray")
START_LIMIT_S = 180
JOB_LIMIT_S = 600
ROWS = 14  # the embedded sample: ten photos and four planted failures
SHARDS = 4


@dataclass(frozen=True)
class Cluster:
    dashboard: str
    """The address ``ray job submit`` talks to."""
    env: dict[str, str]
    """What a client of this cluster needs: its auth token, and no other cluster's address."""

    def get(self, path: str) -> dict:
        token = Path(self.env["RAY_AUTH_TOKEN_PATH"]).read_text()
        request = urllib.request.Request(f"{self.dashboard}{path}", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def alive_nodes(self) -> list[dict]:
        nodes = self.get("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE"]


def _start_node(args: list[str], ports: list[int], env: dict[str, str], log: Path) -> subprocess.Popen:
    """One ``ray start --block`` in its own session (killing that session stops the node), on the
    given four free ports for its agents."""
    agent, agent_grpc, runtime_env, metrics = ports
    command = [
        str(RAY),
        "start",
        *args,
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        "--object-store-memory=200000000",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}",
        "--block",
    ]
    with log.open("ab") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(condition, what: str, log: Path) -> None:
    deadline = time.monotonic() + START_LIMIT_S
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (OSError, urllib.error.URLError, KeyError, ValueError):
            pass  # not up yet
        time.sleep(1)
    raise AssertionError(f"{what} not within {START_LIMIT_S} s; see {log}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, free_ports, kill_session) -> Iterator[Cluster]:
    # Ray's socket paths must stay short: its own folder directly under /tmp.
    temp = Path(tempfile.mkdtemp(prefix="fm-ray-", dir="/tmp"))
    logs = tmp_path_factory.mktemp("cluster")
    token = temp / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0")
    gcs, dashboard, client, *agents = free_ports(11)
    nodes = []
    try:
        head_args = [
            "--head",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            f"--ray-client-server-port={client}",
            f"--temp-dir={temp}",
        ]
        nodes.append(_start_node(head_args, agents[:4], env, logs / "head.log"))
        cluster = Cluster(f"http://127.0.0.1:{dashboard}", env)
        _wait_for(lambda: len(cluster.alive_nodes()) == 1, "the head node", logs / "head.log")
        nodes.append(_start_node([f"--address=127.0.0.1:{gcs}"], agents[4:], env, logs / "worker.log"))
        _wait_for(lambda: len(cluster.alive_nodes()) == 2, "the worker node", logs / "worker.log")
        yield cluster
    finally:
        for node in reversed(nodes):
            kill_session(node)
        shutil.rmtree(temp, ignore_errors=True)


def _submit(cluster: Cluster, verb: str, config_file: Path, log: Path, env: dict[str, str]) -> tuple[bool, str]:
    """``ray job submit`` one stage, ``env`` in its runtime env, and wait for it: whether it
    succeeded, and its output."""
    run = subprocess.run(
        [
            str(RAY),
            "job",
            "submit",
            f"--address={cluster.dashboard}",
            # A job-level runtime env, as real submissions have: it must combine with the stages' own.
            "--runtime-env-json",
            json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1", **env}}),
            "--",
            sys.executable,
            "-m",
            "four_m",
            verb,
            "--config",
            str(config_file),
            "--no-progress",
        ],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=JOB_LIMIT_S,
    )
    output = run.stdout + run.stderr
    log.write_text(output)
    return run.returncode == 0 and f"Job '{_job_id(output)}' succeeded" in output, output


def _finished_tasks(cluster: Cluster) -> list[dict]:
    """The finished plain tasks Ray's state API knows of: the download stage's are one per shard."""
    tasks = cluster.get("/api/v0/tasks?limit=1000")["data"]["result"]["result"]
    return [t for t in tasks if t["type"] == "NORMAL_TASK" and t["state"] == "FINISHED"]


def _job_id(output: str) -> str:
    return output.split("Job '", 1)[1].split("'", 1)[0] if "Job '" in output else ""


def _keys(folder: storage.RootPath) -> Counter:
    files = sorted(folder.glob("*.parquet"))
    return Counter(k for f in files for k in storage.read_table(f, columns=["key"])["key"].to_pylist())


def _config_file(small_config, root: str, path: Path, *overrides: str) -> Path:
    config = small_config(root, f"download.samples_per_shard={-(-ROWS // SHARDS)}", *overrides)
    path.write_text(config.to_yaml())
    return path


@pytest.mark.slow
def test_download_and_label_run_as_jobs_on_a_two_node_cluster_into_an_object_store(
    cluster, object_store, tmp_path, small_config, free_ports
):
    """The dataset root is an S3 bucket (on 127.0.0.1) that both nodes read and write; the jobs get
    its endpoint and credentials through their runtime env, as a real submission would."""
    uri = object_store.uri("cluster-root")
    root = storage.location(uri)
    config_file = _config_file(
        small_config,
        uri,
        tmp_path / "config.yaml",
        f"sample.port={free_ports(1)[0]}",
        # Nodes of one CPU: the labelers' shared actor (six labelers) must fit on one of them.
        *(f"label.{name}.num_cpus=0.1" for name in labelled_modalities()),
    )

    ok, out = _submit(cluster, "download", config_file, tmp_path / "download.log", object_store.env)
    assert ok and f"rows in {ROWS}, rows out 10, failed 4" in out and f"shards done {SHARDS}" in out, out[-3000:]
    images = _keys(root / "images")
    assert len(images) == ROWS and set(images.values()) == {1}
    # Workers report their tasks' states to Ray's state API every second or so, not before the job
    # ends: wait for every shard's report rather than read what has come in by now.
    _wait_for(lambda: len(_finished_tasks(cluster)) >= SHARDS, "the shards' finished tasks", tmp_path / "download.log")
    shards = _finished_tasks(cluster)
    assert len(shards) == SHARDS and len({t["node_id"] for t in shards}) == 2, "the shards should use both nodes"

    # 6 x 0.25 CPUs: the whole cluster has them, but no node can hold the actor. Refused, not hung.
    too_big = _config_file(small_config, uri, tmp_path / "too_big.yaml")
    ok, out = _submit(cluster, "label", too_big, tmp_path / "label-too-big.log", object_store.env)
    assert not ok and "needs 1.5 CPUs and 0 GPUs on one node, but no node of the Ray cluster" in out, out[-3000:]
    assert not list(root.glob("labels/*/*.parquet"))

    ok, out = _submit(cluster, "label", config_file, tmp_path / "label.log", object_store.env)
    assert ok, out[-3000:]
    for name in labelled_modalities():
        assert f"label/{name}: rows {ROWS}, labelled 10, failed 4 (no_image: 4); shards done {SHARDS}" in out
        assert _keys(root / f"labels/{name}") == images, name
    depth = storage.read_table(root / "labels/depth/00000.parquet")
    assert [d is not None for d in depth["depth"].to_pylist()] == [e is None for e in depth["error"].to_pylist()]


def test_the_cluster_is_the_configured_address_else_ray_address_else_none(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(RayConfig(num_cpus=2)) is None  # start Ray here, sized by the config
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # what `ray job submit` sets for its driver
    assert cluster_address(RayConfig(num_cpus=2)) == "10.0.0.1:6379"
    assert cluster_address(RayConfig(address="auto")) == "auto"
