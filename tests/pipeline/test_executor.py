"""The executor's locally started Ray: reachable from this machine only."""

from __future__ import annotations

import json
import subprocess
import sys

LISTENING = """
import json, psutil, ray
from four_m.core.config import RayConfig
from four_m.pipeline.executor import ray_session

with ray_session(RayConfig(num_cpus=1)):
    ray.get(ray.remote(lambda: 1).remote())  # a worker process too, not only the node's servers
    me = psutil.Process()
    found = [
        [process.name(), connection.laddr.ip]
        for process in [me, *me.children(recursive=True)]
        for connection in process.net_connections(kind="inet")
        if connection.status == psutil.CONN_LISTEN
    ]
print(json.dumps(found))
"""
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def test_a_locally_started_ray_listens_on_127_0_0_1_only():
    run = subprocess.run([sys.executable, "-c", LISTENING], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    listening = json.loads(run.stdout.strip().splitlines()[-1])
    names = {name for name, _ in listening}
    assert {"gcs_server", "raylet"} <= names, f"Ray's servers should be among the processes: {names}"
    exposed = sorted({(name, ip) for name, ip in listening if ip not in LOOPBACK})
    assert not exposed, f"listening beyond this machine: {exposed}"
