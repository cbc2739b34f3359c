"""Where a local ``hashray serve`` listens: HAProxy's side ports, its launcher, and free loopback ports.

In Serve's high-throughput mode HAProxy takes the HTTP port, and by default
also a stats page on ``*:8404`` and a Prometheus page on ``*:9101`` (every
interface), and Serve's fallback proxy takes 8500: fixed ports, so a second
server on the same machine cannot start. Here each server gets free loopback side ports, and HAProxy is started
through :mod:`serve.haproxy_launcher`, which binds those two pages to
loopback and makes HAProxy die with the process that started it (a server
killed with SIGKILL leaves no HAProxy holding its port).

A cluster takes all of this from its own ``ray start`` environment.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import stat
import sys
import tempfile
from pathlib import Path

LOOPBACK = "127.0.0.1"
# Ray's workers take 10002-19999, Serve's ingress replicas 30000-31000 (HAProxy
# mode) and the kernel hands out 32768 and up: 20000-29999 is left to us.
FREE_PORTS = range(20000, 30000)
STATS_PORT_ENV = "RAY_SERVE_HAPROXY_STATS_PORT"
METRICS_PORT_ENV = "RAY_SERVE_HAPROXY_METRICS_PORT"
# Serve's Python proxy that HAProxy falls back to while no ingress replica is up (8500 by default).
FALLBACK_PORT_ENV = "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"
SIDE_PORT_ENVS = (STATS_PORT_ENV, METRICS_PORT_ENV, FALLBACK_PORT_ENV)
BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"
# The binary the launcher starts; Ray itself is pointed at the launcher.
REAL_BINARY_ENV = "HASHRAY_HAPROXY_BINARY"
# How HAProxy names the address it could not bind: "... cannot bind socket (...) [127.0.0.1:8000]".
BOUND_ADDRESS = re.compile(r"\[([0-9a-fA-F.:*]*):(\d+)\]")


def free_port(host: str = LOOPBACK) -> int:
    """A port in :data:`FREE_PORTS` that nothing on ``host`` listens on now."""
    for _ in range(200):
        port = random.randrange(FREE_PORTS.start, FREE_PORTS.stop)
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port in {FREE_PORTS.start}-{FREE_PORTS.stop - 1} on {host}")


def haproxy_env(real_binary: str) -> dict[str, str]:
    """The environment that gives the HAProxy of the Ray about to start free loopback side ports and the launcher.

    Values already in the environment win (except the binary, which the
    launcher starts in its place).
    """
    ports = {name: os.environ.get(name) or str(free_port()) for name in SIDE_PORT_ENVS}
    return {
        **ports,
        REAL_BINARY_ENV: os.environ.get(REAL_BINARY_ENV) or real_binary,
        BINARY_ENV: str(launcher_script()),
    }


def launcher_script() -> Path:
    """An executable that runs :mod:`serve.haproxy_launcher` with this Python (Ray wants a binary path).

    Written once per user and interpreter; its content depends on nothing else.
    """
    text = f'#!/bin/sh\nexec "{sys.executable}" -m serve.haproxy_launcher "$@"\n'
    folder = Path(tempfile.gettempdir()) / f"hashray-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / f"haproxy-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    if not path.exists():
        partial = path.with_suffix(f".{os.getpid()}")
        partial.write_text(text)
        partial.chmod(stat.S_IRWXU)
        partial.replace(path)
    return path


def port_in_error(message: str, default: int) -> int:
    """The port a bind error names (HAProxy writes ``[HOST:PORT]``), else ``default``."""
    match = BOUND_ADDRESS.search(message)
    return int(match.group(2)) if match else default


def metrics_url() -> str | None:
    """Where the Ray node of this driver serves Prometheus metrics (Ray's and Serve's); None when it has no such port."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id and node.get("MetricsExportPort"):
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return None
