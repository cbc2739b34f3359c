"""Builds a small servable set (run dir, codes dirs) and runs the Serve app for the serve tests."""
from __future__ import annotations

import contextlib
import dataclasses
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from models.codes import hamming_distances, pack_codes, topk_by_hamming
from models.errors import HashrayError
from models.network import HashNetConfig, ResNetHash
from models.transforms import decode_image, eval_transform, normalise
from pipelines import contracts
from serve.index import slice_bounds

BITS = 16
IMAGE_SIZE = 32


def make_run(path: Path, classes: list[str]) -> str:
    """An untrained ResNet-18 hash model saved as a finished run."""
    torch.manual_seed(0)
    config = HashNetConfig(arch="resnet18", bits=BITS, image_size=IMAGE_SIZE, classes=tuple(classes), loss="cosine")
    contracts.save_model(str(path), ResNetHash(config.arch, config.bits).eval(), config)
    return str(path)


def database_table(dataset: str) -> pa.Table:
    return pa.concat_tables(pq.read_table(f) for f in contracts.split_files(dataset, "database"))


def encode_images(run: str, images: list[bytes]) -> np.ndarray:
    """Packed codes computed the way the Encoder deployment computes them."""
    model, config = contracts.load_model(run)
    transform = eval_transform(config.image_size)
    pixels = torch.stack([transform(decode_image(data)) for data in images])
    return pack_codes(model.encode(normalise(pixels, config.mean, config.std)).numpy())


def write_codes(path: Path, ids: list[str], codes: np.ndarray, labels: list[list[int]], files: int) -> str:
    """A codes dir over ``files`` Parquet files, manifest last."""
    table = pa.table(
        {"id": ids, "code": [bytes(row) for row in codes], "labels": labels}, schema=contracts.codes_schema(BITS)
    )
    path.mkdir(parents=True)
    for part, (a, b) in enumerate(slice_bounds(len(ids), files)):
        pq.write_table(table.slice(a, b - a), path / f"part-{part:03d}.parquet")
    contracts.write_manifest(str(path), bits=BITS, count=len(ids), model="test", dataset="tiny", split="database")
    return str(path)


def expected_ids(codes: np.ndarray, ids: list[str], query: np.ndarray, k: int, radius: int | None = None) -> tuple[list[str], list[int]]:
    """Brute-force ranking (stable by database position): ids and distances."""
    distances = hamming_distances(query[None, :], codes)[0]
    if radius is not None:
        order = np.argsort(distances, kind="stable")
        chosen = order[distances[order] <= radius][:k]
    else:
        chosen = topk_by_hamming(distances, k)
    return [ids[i] for i in chosen], distances[chosen].tolist()


@dataclass(frozen=True)
class Servable:
    """A run dir and a codes dir of a dataset's database split, plus what the tests compare with."""

    run: str
    codes_dir: str
    ids: list[str]
    images: list[bytes]
    labels: list[list[int]]
    classes: list[str]
    codes: np.ndarray


def make_servable(dataset: str, root: Path) -> Servable:
    classes = contracts.read_dataset_info(dataset)["classes"]
    run = make_run(root / "run", classes)
    table = database_table(dataset)
    ids, images, labels = (table.column(c).to_pylist() for c in ("id", "image", "labels"))
    codes = encode_images(run, images)
    codes_dir = write_codes(root / "codes", ids, codes, labels, files=3)
    return Servable(run, codes_dir, ids, images, labels, classes, codes)


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range (32768 and up).

    A port handed out by ``bind(port=0)`` comes from the ephemeral range, where any of Ray's
    own sockets may take it again between this call and the moment Serve's proxy binds it.
    Ray's workers use 10002-19999 and Serve's ingress replicas 30000-31000 (HAProxy
    mode), so 20000-29999 is left to us.
    """
    for _ in range(200):
        port = random.randrange(20000, 30000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port in 20000-29999")


@contextlib.contextmanager
def running_app(cfg) -> Iterator[str]:
    """Run ``build_app(cfg)`` on loopback and yield its base URL; Serve is shut down after, Ray is not.

    If the port was taken in the meantime, Serve's proxy fails to bind: start again on another port.
    """
    from ray import serve

    from serve.app import build_app, start_http

    for attempt in range(3):
        try:
            start_http("127.0.0.1", cfg.port)
            break
        except HashrayError:  # the port was taken
            if attempt == 2:
                raise
            cfg = dataclasses.replace(cfg, port=free_port())
    try:
        serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/")
        url = f"http://127.0.0.1:{cfg.port}"
        httpx.get(f"{url}/healthz", timeout=30).raise_for_status()
        yield url
    finally:
        serve.shutdown()
