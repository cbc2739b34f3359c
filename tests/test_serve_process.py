"""``hashray serve`` as a process: loopback only, two servers side by side, and nothing left after a stop or a kill."""

from __future__ import annotations

import signal
import socket
import time

import httpx
import pytest
import serve_support as support
from serve_process import READY, Server, assert_released, stop_and_check_released

from serve import network

pytestmark = pytest.mark.heavy
START_S = 240  # a fresh Ray and four replicas on a busy 2-core machine


@pytest.fixture(scope="module")
def servable(tiny_dataset, tmp_path_factory) -> support.Servable:
    return support.make_servable(tiny_dataset, tmp_path_factory.mktemp("served"))


def serve_argv(servable: support.Servable, data: str, port: int) -> list[str]:
    """The README's command (default resources) on ``port``."""
    return [
        "serve",
        "--run",
        servable.run,
        "--codes",
        servable.codes_dir,
        "--data",
        data,
        "--shards",
        "2",
        "--port",
        str(port),
    ]


def test_two_servers_side_by_side_listen_on_loopback_only_and_leave_nothing(servable, tiny_dataset, tmp_path):
    ports, metrics_port = [support.free_port(), support.free_port()], support.free_port()
    servers = [
        Server(serve_argv(servable, tiny_dataset, ports[0]) + ["--metrics-port", str(metrics_port)], tmp_path),
        Server(serve_argv(servable, tiny_dataset, ports[1]), tmp_path),
    ]
    try:
        for server in servers:
            assert server.wait_for(READY, START_S), server.output()[-3000:]
        for server, port in zip(servers, ports):
            health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).json()
            assert health["codes"] == len(servable.ids) and health["shards"] == 2
            opened = server.listeners()
            assert port in {listener.port for listener in opened}
            assert [listener for listener in opened if not listener.loopback] == []
        assert f"Prometheus metrics: http://127.0.0.1:{metrics_port}/metrics" in servers[0].output()
        check_serve_metrics(f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{metrics_port}/metrics", servable)
        # SIGINT (Ctrl-C) stops one, SIGTERM (a service manager's stop) the other, handed
        # to one of its Ray threads rather than the main one (the kernel may pick any).
        assert stop_and_check_released(servers[0], signal.SIGINT) < 20
        assert stop_and_check_released(servers[1], signal.SIGTERM, to_thread=True) < 20
    finally:
        for server in servers:
            server.kill()


def test_kill_9_before_and_after_ready_leaves_no_process_and_no_port(servable, tiny_dataset, tmp_path):
    # Two servers at once, so the minute Ray's node agents take to notice their raylet is
    # gone (after a SIGKILL nothing stops Ray in order) is waited for once, not twice.
    early_port, late_port = support.free_port(), support.free_port()
    early = Server(serve_argv(servable, tiny_dataset, early_port), tmp_path)
    late = Server(serve_argv(servable, tiny_dataset, late_port), tmp_path)
    try:
        # Before ready: once replicas are being placed (HAProxy holds the port by then).
        assert early.wait_for("waiting for replicas", START_S), early.output()[-3000:]
        assert READY not in early.output()
        early_ports, early_tree = killed(early, early_port)
        assert late.wait_for(READY, START_S), late.output()[-3000:]
        late_ports, late_tree = killed(late, late_port)
        assert_released(early_ports | late_ports, early_tree | late_tree, timeout_s=120, after="a SIGKILL")
    finally:
        early.kill()
        late.kill()


def killed(server: Server, port: int) -> tuple[set[int], set[int]]:
    """SIGKILL ``server``, asserting it listens on ``port``; the ports and processes it had then."""
    ports = {listener.port for listener in server.listeners()}
    assert port in ports, f"port {port} not listened on: {sorted(ports)}"
    tree = server.tree()
    server.kill()
    return ports, tree


def test_a_taken_side_port_is_named_in_the_error(servable, tiny_dataset, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", support.free_port()))
        taken.listen()
        side = taken.getsockname()[1]
        server = Server(
            serve_argv(servable, tiny_dataset, support.free_port()), tmp_path, env={network.STATS_PORT_ENV: str(side)}
        )
        try:
            server.process.wait(timeout=START_S)
        finally:
            server.kill()
        output = server.output()
        assert server.process.returncode == 2, output[-3000:]
        assert f"cannot listen on port {side}" in output.splitlines()[-1]


def check_serve_metrics(url: str, metrics: str, servable: support.Servable) -> None:
    """Requests show in Serve's counters and latency histograms (exported every few seconds)."""
    for item_id in servable.ids[:5]:
        httpx.get(f"{url}/search/{item_id}", timeout=30).raise_for_status()
    wanted = (
        "ray_serve_deployment_request_counter_total{",
        'deployment="Ingress"',
        "ray_serve_deployment_processing_latency_ms_bucket{",
    )
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:
        text = httpx.get(metrics, timeout=30).text
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    missing = [name for name in wanted if name not in text]
    assert not missing, (
        f"not in {metrics}: {missing}; ray_serve lines: {[line for line in text.splitlines() if 'ray_serve' in line][:20]}"
    )
