"""HAProxy's side pages on loopback and its death with its parent, through serve.haproxy_launcher (no Ray)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from serve import haproxy_launcher, network

CONFIG = textwrap.dedent(
    """\
    global
        stats socket /tmp/x/admin.sock mode 666 level admin expose-fd listeners
    frontend prometheus
        bind :9101
        mode http
    frontend http_frontend
        bind *:8000
    listen stats
      bind *:8404
      stats enable
    """
)


def test_side_pages_bind_loopback_and_the_http_port_keeps_its_host():
    rewritten = haproxy_launcher.loopback_config(CONFIG)
    assert "    bind 127.0.0.1:9101\n" in rewritten
    assert "  bind 127.0.0.1:8404\n" in rewritten
    assert "    bind *:8000\n" in rewritten  # the user's --host 0.0.0.0 stands
    assert rewritten.count("\n") == CONFIG.count("\n")


def test_the_config_is_rewritten_in_place(tmp_path):
    path = tmp_path / "haproxy.cfg"
    path.write_text(CONFIG)
    haproxy_launcher.bind_side_pages_to_loopback(["-db", "-f", str(path), "-sf", "12"])
    assert path.read_text() == haproxy_launcher.loopback_config(CONFIG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["haproxy.cfg"]


def test_the_launched_process_dies_with_its_parent(tmp_path):
    """The parent (standing in for Ray's manager actor) is SIGKILLed; what the launcher started goes too."""
    pid_file = tmp_path / "pid"
    child = tmp_path / "child.py"  # stands in for HAProxy: the launcher execs it
    child.write_text(f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(600)\n")
    parent = tmp_path / "parent.py"
    parent.write_text(
        f"import subprocess, time\nsubprocess.Popen([{str(network.launcher_script())!r}, {str(child)!r}])\ntime.sleep(600)\n"
    )
    process = subprocess.Popen(
        [sys.executable, str(parent)], env={**os.environ, network.REAL_BINARY_ENV: sys.executable}
    )
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        pid = int(pid_file.read_text())
        assert state(pid) not in ("gone", "Z")  # running, as the launcher's exec of the "binary"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and state(pid) not in ("gone", "Z"):
        time.sleep(0.1)
    assert state(pid) in ("gone", "Z")


def state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_a_bind_error_names_the_port_haproxy_could_not_take():
    message = "[ALERT] (1) : Starting proxy stats: cannot bind socket (Address already in use) [127.0.0.1:8404]"
    assert network.port_in_error(message, 8000) == 8404
    assert network.port_in_error("Failed to bind to address", 8000) == 8000


def test_side_ports_are_free_and_differ_per_server(monkeypatch):
    for name in network.SIDE_PORT_ENVS:
        monkeypatch.delenv(name, raising=False)
    first = network.haproxy_env("/bin/true")
    second = network.haproxy_env("/bin/true")
    ports = {first[name] for name in network.SIDE_PORT_ENVS} | {second[name] for name in network.SIDE_PORT_ENVS}
    assert len(ports) == 6 and all(int(p) in network.FREE_PORTS for p in ports)
    assert first[network.BINARY_ENV] == second[network.BINARY_ENV]  # one launcher for every server
    assert os.access(first[network.BINARY_ENV], os.X_OK)
