"""Load test of `hashray serve` on loopback, and the sharded index against one faiss index.

Builds N random codes (default 1,000,000 x 64 bits), an untrained model and a
small dataset dir, starts the Serve app on 127.0.0.1, and runs C concurrent
clients for a fixed time against ``GET /search/{id}`` then ``POST /search``,
printing QPS, p50, p99 and errors. Then it times the in-process search of the
sharded index (per-shard faiss + exact tie handling + merge) beside a single
faiss ``IndexBinaryFlat`` over the same codes, one query at a time as served.

    python bench/serve_load.py [--codes 1000000] [--clients 8] [--seconds 15] [--shards 1]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from PIL import Image, ImageDraw
from ray import serve

from contracts.codes import codes_table, write_manifest
from contracts.dataset import DATASET_SCHEMA, write_dataset_info
from contracts.fs import now_iso
from models.network import HashNetConfig, ResNetHash
from serve.app import build_app
from serve.config import ServeConfig
from serve.index import ShardIndex, search_shards, slice_bounds
from serve.start import use_fast_http

INDEX_ROUNDS = 9
SAMPLE_IMAGES = 16  # stored images of the small dataset dir, posted by POST /search
TARGETS = (
    "targets: 0 errors; GET /search/{id} p50 <= 20 ms, p99 <= 100 ms at the client count above; index ratio >= 0.8"
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codes", type=int, default=1_000_000, help="database size")
    parser.add_argument("--bits", type=int, default=64, help="code length")
    parser.add_argument(
        "--shards", type=int, default=ServeConfig.shards, help="index shard replicas (default: as `hashray serve`)"
    )
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=15.0, help="load time per endpoint")
    parser.add_argument("--k", type=int, default=10, help="results per query")
    parser.add_argument("--index-queries", type=int, default=300, help="queries for the in-process index timing")
    parser.add_argument(
        "--index-threads",
        type=int,
        default=1,
        help="faiss threads in the in-process timing (a serving shard replica gets OMP_NUM_THREADS=1 from Ray)",
    )
    parser.add_argument("--image-size", type=int, default=64, help="model input size for POST /search")
    parser.add_argument("--port", type=int, default=8321, help="loopback port")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    return parser.parse_args()


def sample_image(rng: np.random.Generator, size: int) -> bytes:
    """A JPEG of a few coloured shapes on a coloured ground: what a stored photo costs to decode."""
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
        side = int(rng.integers(size // 8, size // 2))
        draw.ellipse((x, y, x + side, y + side), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_inputs(root: Path, args: argparse.Namespace, codes: np.ndarray) -> tuple[str, str, str, list[bytes]]:
    """Run dir, codes dir and a small dataset dir (a few stored images, the class names)."""
    classes = [f"class-{i}" for i in range(10)]
    torch.manual_seed(args.seed)
    config = HashNetConfig(
        arch="resnet18", bits=args.bits, image_size=args.image_size, classes=tuple(classes), loss="cosine"
    )
    ResNetHash.from_config(config).save(root / "run")

    rng = np.random.default_rng(args.seed)
    labels = pa.array(list(rng.integers(0, len(classes), size=(len(codes), 1))), type=pa.list_(pa.int32()))
    table = codes_table([f"item-{i:07d}" for i in range(len(codes))], codes, labels)
    codes_dir = root / "codes"
    codes_dir.mkdir()
    for part, (a, b) in enumerate(slice_bounds(len(codes), 4)):
        pq.write_table(table.slice(a, b - a), codes_dir / f"part-{part}.parquet")
    write_manifest(str(codes_dir), bits=args.bits, count=len(codes), model="bench", dataset="bench", split="database")

    images = [sample_image(rng, args.image_size) for _ in range(SAMPLE_IMAGES)]
    database = pa.table(
        {
            "id": [f"item-{i:07d}" for i in range(len(images))],
            "image": images,
            "labels": [[int(v)] for v in rng.integers(0, len(classes), size=len(images))],
        },
        schema=DATASET_SCHEMA,
    )
    (root / "data" / "database").mkdir(parents=True)
    pq.write_table(database, root / "data" / "database" / "part-0.parquet")
    write_dataset_info(
        str(root / "data"), name="bench", classes=classes, splits={"database": len(images)}, created=now_iso()
    )
    return str(root / "run"), str(codes_dir), str(root / "data"), images


class Connection:
    """One keep-alive HTTP/1.1 connection that sends prepared requests and reads status + body.

    The load generator shares the machine with the server, so it is kept to
    what a closed-loop client needs: a general HTTP client (httpx) spends about
    2 ms of CPU per request here, taken from the server it is measuring.

    Like any HTTP client, it sends a request again on a new connection when the
    server closed the kept-alive one before answering a byte (HAProxy does so
    to its open connections when Serve reloads its configuration, e.g. just
    after start-up); ``resent`` counts those.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.resent = 0

    async def send(self, request: bytes) -> tuple[int, bytes]:
        for attempt in range(2):
            reused = self.writer is not None
            if not reused:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.writer.write(request)
            try:
                head = await self.reader.readuntil(b"\r\n\r\n")
                break
            except (asyncio.IncompleteReadError, ConnectionResetError) as error:
                self.close()
                if not reused or attempt or (isinstance(error, asyncio.IncompleteReadError) and error.partial):
                    raise
                self.resent += 1
        status = int(head[9:12])
        length = next(
            (int(line[15:]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")), 0
        )
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def http_request(method: str, path: str, body: bytes = b"", content_type: str = "") -> bytes:
    """The bytes of one HTTP/1.1 request on a kept-alive connection."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    return head.encode() + b"\r\n" + body


def multipart_image(image: bytes, boundary: str = "hashray-bench-boundary") -> tuple[bytes, str]:
    """(body, content type) of a multipart form whose field ``image`` holds ``image``."""
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


async def load(
    port: int, clients: int, seconds: float, request: Callable[[random.Random], bytes]
) -> tuple[list[float], collections.Counter, float, int]:
    """C clients in a closed loop for ``seconds``: latencies (ms) of 200 answers, errors by kind, wall time, requests resent.

    ``request(rng)`` gives the bytes of each client's next request.
    """
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    resent: list[int] = []  # per client, when it stops

    async def client(rng: random.Random) -> None:
        connection = Connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    status, body = await connection.send(request(rng))
                except (OSError, asyncio.IncompleteReadError, ValueError) as error:
                    errors[f"{type(error).__name__}: {error}"[:120]] += 1
                    connection.close()
                    continue
                if status == 200:
                    latencies.append((time.perf_counter() - started) * 1000)
                else:
                    errors[f"{status} {body[:100].decode(errors='replace')}"] += 1
        finally:
            connection.close()
            resent.append(connection.resent)

    warm_up = Connection("127.0.0.1", port)
    status, body = await warm_up.send(request(random.Random(-1)))
    warm_up.close()
    if status != 200:
        raise SystemExit(f"the warm-up request was answered {status}: {body[:300]!r}")
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(client(random.Random(i)) for i in range(clients)))
    return latencies, errors, time.perf_counter() - started, sum(resent)


def report(name: str, latencies: list[float], errors: collections.Counter, wall: float, resent: int) -> None:
    p50, p99 = np.percentile(latencies, [50, 99]) if latencies else (float("nan"),) * 2
    print(
        f"{name:<22} {len(latencies) / wall:8.1f} QPS   p50 {p50:7.1f} ms   p99 {p99:7.1f} ms   errors {sum(errors.values())}"
    )
    for kind, count in errors.most_common(5):
        print(f"    {count} x {kind}")
    if resent:
        print(
            f"    ({resent} sent again after the server closed a kept-alive connection; their latency includes both tries)"
        )


def http_benchmark(args: argparse.Namespace, run: str, codes_dir: str, data: str, images: list[bytes]) -> None:
    cfg = ServeConfig(
        run=run,
        codes=codes_dir,
        data=data,
        shards=args.shards,
        port=args.port,
        encoder_cpus=0.5,
        shard_cpus=0.25,
        ingress_cpus=0.25,
        app_name="hashray-bench",
    )
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    started = time.perf_counter()
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/")
    print(f"app ready in {time.perf_counter() - started:.1f} s ({args.shards} shards, {args.codes} codes)")

    def get_by_id(rng: random.Random) -> bytes:
        return http_request("GET", f"/search/item-{rng.randrange(args.codes):07d}?k={args.k}")

    uploads = [multipart_image(image) for image in images]

    def post_image(rng: random.Random) -> bytes:
        return http_request("POST", f"/search?k={args.k}", *rng.choice(uploads))

    def get_page(rng: random.Random) -> bytes:
        return http_request("GET", "/")

    print(f"{args.clients} clients, {args.seconds:.0f} s per endpoint, k={args.k}")
    report("GET /search/{id}", *asyncio.run(load(args.port, args.clients, args.seconds, get_by_id)))
    report("POST /search", *asyncio.run(load(args.port, args.clients, args.seconds, post_image)))
    # The floor under every endpoint: the HTTP front (HAProxy, or Serve's Python
    # proxy) and the ingress with no backend call (the static page).
    report("GET / (HTTP floor)", *asyncio.run(load(args.port, args.clients, min(args.seconds, 5.0), get_page)))
    serve.delete(cfg.app_name)


def index_benchmark(args: argparse.Namespace, codes: np.ndarray) -> None:
    """Per-query search time: our shards + merge vs one faiss IndexBinaryFlat (same thread count).

    The two alternate in rounds and the median round counts, so a burst of
    load from other processes hits both alike.
    """
    faiss.omp_set_num_threads(args.index_threads)
    shards = [ShardIndex(codes[a:b], start=a) for a, b in slice_bounds(len(codes), args.shards)]
    flat = faiss.IndexBinaryFlat(args.bits)
    flat.add(codes)
    queries = codes[np.random.default_rng(args.seed + 1).integers(0, len(codes), size=args.index_queries)]
    searches = {
        f"sharded x{args.shards} (ours)": lambda q: search_shards(shards, q, args.k),
        "faiss IndexBinaryFlat": lambda q: flat.search(q, args.k),
    }
    rounds: dict[str, list[float]] = {name: [] for name in searches}
    for chunk in np.array_split(queries, INDEX_ROUNDS):
        for name, search in searches.items():
            started = time.perf_counter()
            for row in range(len(chunk)):
                search(chunk[row : row + 1])
            rounds[name].append((time.perf_counter() - started) / len(chunk) * 1000)
    ours_ms, faiss_ms = (float(np.median(times)) for times in rounds.values())
    print(
        f"in-process search, {len(codes)} codes, k={args.k}, one query per call, {faiss.omp_get_max_threads()} faiss threads:"
    )
    for name, ms in zip(searches, (ours_ms, faiss_ms)):
        print(f"  {name:<24} {ms:7.3f} ms/query (median of {INDEX_ROUNDS} rounds)")
    print(f"  ratio (faiss / ours)     {faiss_ms / ours_ms:7.2f}")


def main() -> None:
    args = parse_args()
    codes = np.random.default_rng(args.seed).integers(0, 256, size=(args.codes, args.bits // 8), dtype=np.uint8)
    with tempfile.TemporaryDirectory(prefix="hashray-bench-") as tmp:
        run, codes_dir, data, images = make_inputs(Path(tmp), args, codes)
        use_fast_http()  # as `hashray serve` does before it starts Ray
        ray.init(include_dashboard=False, log_to_driver=False)
        try:
            http_benchmark(args, run, codes_dir, data, images)
        finally:
            serve.shutdown()
            ray.shutdown()
    index_benchmark(args, codes)
    print(TARGETS)


if __name__ == "__main__":
    main()
