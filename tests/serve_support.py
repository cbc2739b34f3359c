"""Builds a small servable set (run dir, codes dirs) and runs the Serve app for the serve tests."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from contracts.codes import codes_table, write_manifest
from contracts.dataset import DatasetDir
from contracts.run import RunDir
from models.codes import hamming_distances, pack_codes, topk_by_hamming
from models.errors import HashrayError
from models.network import HashNetConfig, ResNetHash
from models.transforms import decode_image, eval_transform, model_input
from serve import network
from serve.config import ServeConfig
from serve.index import slice_bounds

BITS = 16
IMAGE_SIZE = 32


def make_run(path: Path, classes: list[str]) -> str:
    """An untrained ResNet-18 hash model saved as a finished run."""
    torch.manual_seed(0)
    config = HashNetConfig(arch="resnet18", bits=BITS, image_size=IMAGE_SIZE, classes=tuple(classes), loss="cosine")
    ResNetHash.from_config(config).save(path)
    return str(path)


def database_table(dataset: str) -> pa.Table:
    return pa.concat_tables(pq.read_table(f) for f in DatasetDir.open(dataset).split_files("database"))


def encode_images(run: str, images: list[bytes]) -> np.ndarray:
    """Packed codes computed the way the Encoder deployment computes them."""
    run_dir = RunDir.open(run)
    model = run_dir.load_model()
    transform = eval_transform(run_dir.config.image_size)
    pixels = torch.stack([transform(decode_image(data)) for data in images])
    return pack_codes(model.encode(model_input(pixels, run_dir.config)).numpy())


def write_codes(path: Path, ids: list[str], codes: np.ndarray, labels: list[list[int]], files: int) -> str:
    """A codes dir over ``files`` Parquet files, manifest last."""
    table = codes_table(ids, np.asarray(codes, dtype=np.uint8), pa.array(labels, type=pa.list_(pa.int32())))
    path.mkdir(parents=True)
    for part, (a, b) in enumerate(slice_bounds(len(ids), files)):
        pq.write_table(table.slice(a, b - a), path / f"part-{part:03d}.parquet")
    write_manifest(str(path), bits=BITS, count=len(ids), model="test", dataset="tiny", split="database")
    return str(path)


def expected_ids(
    codes: np.ndarray, ids: list[str], query: np.ndarray, k: int, radius: int | None = None
) -> tuple[list[str], list[int]]:
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
    classes = list(DatasetDir.open(dataset).classes)
    run = make_run(root / "run", classes)
    table = database_table(dataset)
    ids, images, labels = (table.column(c).to_pylist() for c in ("id", "image", "labels"))
    codes = encode_images(run, images)
    codes_dir = write_codes(root / "codes", ids, codes, labels, files=3)
    return Servable(run, codes_dir, ids, images, labels, classes, codes)


def small_config(servable: Servable, dataset: str, *, shards: int, app_name: str, **fields) -> ServeConfig:
    """A config of ``servable`` on a free loopback port with 0.1-CPU replicas, so tests share 2 cores."""
    return ServeConfig(
        run=servable.run,
        codes=servable.codes_dir,
        data=dataset,
        shards=shards,
        port=free_port(),
        encoder_cpus=0.1,
        shard_cpus=0.1,
        ingress_cpus=0.1,
        app_name=app_name,
        **fields,
    )


def free_port() -> int:
    """A free loopback port in the range Ray leaves alone (see :func:`serve.network.free_port`)."""
    return network.free_port()


@contextlib.contextmanager
def running_app(cfg) -> Iterator[str]:
    """Run ``build_app(cfg)`` on loopback and yield its base URL; Serve is shut down after, Ray is not.

    If the port was taken in the meantime, Serve's proxy fails to bind: start again on another port.
    """
    from ray import serve

    from serve.app import build_app
    from serve.start import start_http

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
