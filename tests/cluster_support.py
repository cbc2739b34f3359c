"""A multi-node Ray cluster on this machine for the cluster tests, and the `hashray` commands run against it.

``ray.cluster_utils.Cluster`` starts a head (no CPUs: it runs no work, as in
cluster.yaml) and worker nodes, each with its own raylet and object store.
It runs in a child process of its own (``python tests/cluster_support.py``)
with its own ``RAY_TMPDIR``: Cluster records its address in
``$RAY_TMPDIR/ray_current_cluster``, where any plain ``ray.init()`` on the
machine would find and join it, and the test session's own Ray (conftest)
must neither join it nor be joined. The tests talk to it only through
``hashray`` sub-processes with ``RAY_ADDRESS`` set, as a user's job does, and
tell the child on its stdin which node to remove.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from serve_support import free_port

from serve.start import FAST_HTTP_ENV

ROOT = Path(__file__).resolve().parent.parent
HASHRAY = str(Path(sys.executable).with_name("hashray"))
# Ray resources are logical: two CPUs per worker node lets one surviving node
# take every actor of both, on a 2-core machine.
WORKER_CPUS = 2
WORKER_NODES = 2
OBJECT_STORE_BYTES = 200 * 1024 * 1024
# The GCS notices a removed node after 3 failed health checks 1 s apart
# instead of Ray's default 5 checks 3 s apart: the node-loss tests wait less,
# and a slow but living raylet still has each check's 10 s timeout.
HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
# What starts the child's answers on its stdout.
REPLY = "cluster: "


@dataclass
class LocalCluster:
    """The child process holding the cluster, its address, and its live worker nodes' ids."""

    process: subprocess.Popen
    address: str
    tmpdir: str
    workers: list[str] = field(default_factory=list)
    # Serve keeps the HTTP port of the first `hashray serve` for the cluster's lifetime.
    serve_port: int = field(default_factory=free_port)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a `hashray` command that joins this cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env.update(RAY_ADDRESS=self.address, RAY_TMPDIR=self.tmpdir, RAY_DEDUP_LOGS="0", **extra)
        return env

    def hashray(self, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
        """Run ``hashray ARGS`` against the cluster to the end; its output is returned, and shown on failure."""
        done = subprocess.run(
            [HASHRAY, *args], cwd=ROOT, env=self.env(**env), capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, f"hashray {args[0]} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done

    def start(self, *args: str, **env: str) -> subprocess.Popen:
        """Start ``hashray ARGS`` against the cluster and return at once (the test removes a node meanwhile)."""
        return subprocess.Popen(
            [HASHRAY, *args],
            cwd=ROOT,
            env=self.env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def remove_node(self, node_id: str) -> None:
        """Kill every process of worker node ``node_id`` (as a lost machine would)."""
        self._command({"remove": node_id})
        self.workers.remove(node_id)

    def add_node(self) -> str:
        """Start one more worker node; returns its id."""
        node_id = self._command({"add": True})["node"]
        self.workers.append(node_id)
        return node_id

    def actors(self, class_name: str) -> dict[str, list[str]]:
        """Node ids of every actor whose class name contains ``class_name``, alive or dead, by state."""
        by_state: dict[str, list[str]] = {}
        for actor in self._command({"actors": class_name})["actors"]:
            by_state.setdefault(actor["state"], []).append(actor["node"])
        return by_state

    def _command(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return _read_reply(self.process)


def _read_reply(process: subprocess.Popen) -> dict:
    """The child's next reply; other lines on its stdout (Ray may print there) are skipped."""
    line = ""
    while not line.startswith(REPLY):
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the cluster process exited with {process.wait()}")
    reply = json.loads(line[len(REPLY) :])
    if "error" in reply:
        raise RuntimeError(reply["error"])
    return reply


@contextlib.contextmanager
def local_cluster() -> Iterator[LocalCluster]:
    """A head with no CPUs and :data:`WORKER_NODES` worker nodes of :data:`WORKER_CPUS` CPUs; all stopped after."""
    # Short: Ray's Unix socket paths live under it and must stay under 108 bytes.
    tmpdir = tempfile.mkdtemp(prefix="hrc-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_TMPDIR"] = tmpdir
    for name, value in FAST_HTTP_ENV.items():  # Serve's HTTP mode comes from the cluster's own environment
        env.setdefault(name, value)
    process = subprocess.Popen(
        [sys.executable, __file__],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        ready = _read_reply(process)
        yield LocalCluster(process, ready["address"], tmpdir, list(ready["workers"]))
    finally:
        with contextlib.suppress(OSError, ValueError):
            process.stdin.write(json.dumps({"exit": True}) + "\n")
            process.stdin.close()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(tmpdir, ignore_errors=True)


def wait_for(predicate, timeout: float, what: str | Callable[[], str], poll: float = 0.2):
    """Poll ``predicate()`` until it returns something truthy; that value, or an AssertionError naming ``what``.

    ``what`` may be a function, called only on a timeout, so the message can tell the state it ended in.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what() if callable(what) else what}")


# ---------------------------------------------------------------- the child process


def _serve_cluster() -> None:
    """Start the cluster, report its address on stdout, then obey one JSON command per stdin line."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": HEALTH_CHECKS},
    )
    nodes = {}

    def add() -> str:
        node = cluster.add_node(num_cpus=WORKER_CPUS, object_store_memory=OBJECT_STORE_BYTES)
        nodes[node.node_id] = node
        return node.node_id

    def reply(message: dict) -> None:
        print(REPLY + json.dumps(message), flush=True)

    try:
        workers = [add() for _ in range(WORKER_NODES)]
        cluster.wait_for_nodes()
        reply({"address": cluster.address, "workers": workers})
        for line in sys.stdin:
            request = json.loads(line)
            if "exit" in request:
                break
            try:
                if "remove" in request:
                    cluster.remove_node(nodes.pop(request["remove"]), allow_graceful=False)
                    reply({"removed": request["remove"]})
                elif "actors" in request:
                    table = cluster.global_state.actor_table(None)
                    found = [
                        {"state": a["State"], "node": a["Address"]["NodeID"], "name": a["ActorClassName"]}
                        for a in table.values()
                        if request["actors"] in a["ActorClassName"]
                    ]
                    reply({"actors": found})
                elif "add" in request:
                    node_id = add()
                    cluster.wait_for_nodes()
                    reply({"node": node_id})
            except Exception as error:  # reported to the test, which fails with it
                reply({"error": f"{type(error).__name__}: {error}"})
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    _serve_cluster()
