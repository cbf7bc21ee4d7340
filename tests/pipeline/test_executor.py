"""The executor's locally started Ray: reachable from this machine only, its workers at the driver's
priority with the driver's environment."""

from __future__ import annotations

import json
import subprocess
import sys

# Started by the driver beside its Ray, listening on every interface: a process this test did not
# ask Ray for, as other jobs on the machine are (other Ray instances among them). It must not count.
DECOY = """
import socket, sys, time
with socket.create_server(("0.0.0.0", 0)) as server:
    print(server.getsockname()[1], flush=True)
    time.sleep(600)
"""

# Writes [[process name, listening address, pid], ...] for the listening sockets of this Ray only:
# the processes its node started (GCS, raylet, monitors), their descendants (workers, agents) and
# the driver. A process that ends while it is read (a worker retired mid-scan) is passed over.
LISTENING = """
import json, subprocess, sys, psutil, ray
from ray._private import worker
from four_m.core.config import RayConfig
from four_m.pipeline.executor import ray_session

out, decoy_source = sys.argv[1:]
decoy = subprocess.Popen([sys.executable, "-c", decoy_source], stdout=subprocess.PIPE, text=True)
try:
    decoy.stdout.readline()  # listening now
    with ray_session(RayConfig(num_cpus=1)):
        ray.get(ray.remote(lambda: 1).remote())  # a worker process too, not only the node's servers
        started = [info.process.pid for infos in worker._global_node.all_processes.values() for info in infos]
        ours = {psutil.Process().pid}
        for pid in started:
            try:
                ours |= {pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))}
            except psutil.NoSuchProcess:
                pass
        found = []
        for pid in sorted(ours):
            try:
                process = psutil.Process(pid)
                found += [
                    [process.name(), connection.laddr.ip, pid]
                    for connection in process.net_connections(kind="inet")
                    if connection.status == psutil.CONN_LISTEN
                ]
            except (psutil.NoSuchProcess, psutil.AccessDenied):  # ZombieProcess is a NoSuchProcess
                pass
    decoy_listens = [c.laddr.ip for c in psutil.Process(decoy.pid).net_connections(kind="inet")]
    with open(out, "w") as handle:
        json.dump({"ray": found, "decoy": [decoy.pid, decoy_listens]}, handle)
finally:
    decoy.kill()
"""
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def test_a_locally_started_ray_listens_on_127_0_0_1_only(tmp_path):
    out = tmp_path / "listening.json"
    run = subprocess.run(
        [sys.executable, "-c", LISTENING, str(out), DECOY], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    found = json.loads(out.read_text())
    decoy_pid, decoy_listens = found["decoy"]
    assert decoy_listens == ["0.0.0.0"], "the decoy should listen beyond this machine, beside Ray"
    names = {name for name, _, _ in found["ray"]}
    assert {"gcs_server", "raylet"} <= names, f"Ray's servers should be among the processes: {names}"
    assert decoy_pid not in {pid for _, _, pid in found["ray"]}, "only Ray's processes are looked at"
    exposed = sorted({(name, ip) for name, ip, _ in found["ray"] if ip not in LOOPBACK})
    assert not exposed, f"listening beyond this machine: {exposed}"


# A Ray started here: what its workers inherit, and at which priority they run.
LOCAL_WORKERS = """
import json, os, sys, ray
from four_m.core.config import RayConfig
from four_m.pipeline.executor import ray_session, worker_options

os.environ.pop("RAY_worker_niceness", None)  # Ray's own default, nice 15, unless the session sets it
with ray_session(RayConfig(num_cpus=1)):
    niceness = ray.get(ray.remote(lambda: os.nice(0)).remote())
    inherited = worker_options()
    os.environ["HF_HOME"] = "/set/after/ray/started"
    changed = worker_options()
with open(sys.argv[1], "w") as handle:
    json.dump({"niceness": niceness, "inherited": inherited, "changed": changed}, handle)
"""


def test_a_locally_started_ray_runs_workers_at_the_drivers_priority_with_its_environment(tmp_path):
    """Workers at Ray's nice 15 starve beside any other job on the machine; a runtime environment
    that only repeats what they inherit keeps them off the prestarted workers. One set since Ray
    started is still handed on."""
    out = tmp_path / "workers.json"
    run = subprocess.run([sys.executable, "-c", LOCAL_WORKERS, str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    found = json.loads(out.read_text())
    assert found["niceness"] == 0
    assert found["inherited"] == {}
    assert found["changed"]["runtime_env"]["env_vars"]["HF_HOME"] == "/set/after/ray/started"
