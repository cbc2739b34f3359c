"""``hashray serve`` on a port that is taken: one clear error, no traceback from Serve's proxy."""
from __future__ import annotations

import socket

import pytest

import serve_support as support
from models.errors import HashrayError
from serve import app as serve_app


def test_port_in_use_is_a_clear_error(tiny_dataset, tmp_path):
    servable = support.make_servable(tiny_dataset, tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", support.free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = serve_app.ServeConfig(
            run=servable.run, codes=servable.codes_dir, data=tiny_dataset, shards=1, port=port,
            encoder_cpus=0.1, shard_cpus=0.1, ingress_cpus=0.1, app_name="hashray-port-test",
        )
        with pytest.raises(HashrayError, match=f"127.0.0.1:{port}: the port is in use"):
            serve_app.run(cfg)
