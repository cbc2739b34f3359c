"""The Ingress deployment; the Encoder is in :mod:`serve.encoder`, the shards in :mod:`serve.shard`, the catalog in :mod:`serve.catalog`.

A query image goes ingress (decode, transform) -> Encoder (batched forward
pass, sign bits) -> every IndexShard (exact top-k of its partition) -> ingress
(exact merge, ids and class names). A query by id skips the Encoder: the one
shard that owns the id (its hash % shards) returns its code, then every shard
is searched; with a single shard that is one call. The ingress replicas are
alike and hold no index: each follows the catalog's current generation and
pins it per request. The HTTP routes are in :mod:`serve.api`, the pin and
reload rules in :mod:`serve.generations`.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from contracts.codes import CodesDir
from contracts.ids import owner
from models.errors import find_cause
from models.transforms import decode_image, eval_transform
from serve.api import MAX_SAMPLE, BackendUnavailable, create_api
from serve.config import ServeInputs
from serve.generations import WATCH_S, Generation, Generations
from serve.images import ImageStore
from serve.index import Hits, merge_hits
from serve.memory import rss_bytes

logger = logging.getLogger(__name__)

# Pillow formats a query may use: plugins that run external programs
# (EPS through Ghostscript) stay out of reach of an upload.
QUERY_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Search batches the ingress keeps in flight at once: with one, every query that
# arrives while a batch is at the shards waits for its round trip to end before
# its own starts, and the CPUs idle between the two (155 -> 270 queries/s with 4
# on 2 cores, 8 clients).
SEARCH_BATCHES_IN_FLIGHT = 4
# Times a request is run again whole when a shard had already dropped its generation.
RETRIES = 3


class GenerationRetired(Exception):
    """A shard no longer holds the generation a request pinned: the request runs again on the current one."""


@dataclass(frozen=True)
class CodeQuery:
    """One search as the ingress batches it."""

    generation: Generation
    code: np.ndarray
    k: int
    radius: int | None


@dataclass(frozen=True)
class IdQuery:
    """One id lookup (or, with one shard, search by id) as the ingress batches it: asked of the shard that owns the id."""

    generation: Generation
    item_id: str
    k: int = 0
    radius: int | None = None

    @property
    def shard(self) -> int:
        return owner(self.item_id, self.generation.shards)


def grouped(items: list, key) -> list[list[int]]:
    """Positions of ``items`` grouped by ``key(item)``, groups in first-seen order."""
    groups: dict[Any, list[int]] = {}
    for row, item in enumerate(items):
        groups.setdefault(key(item), []).append(row)
    return list(groups.values())


@serve.deployment
@serve.ingress()
class Ingress:
    """The HTTP API: scatters each query to every shard and merges exactly.

    Any number of replicas: each follows the catalog's current generation
    (:meth:`follow`, a long poll) and pins it per request, so a reload reaches
    every replica before its answer is sent and no answer mixes generations.
    """

    async def __init__(
        self, encoder: DeploymentHandle, shards: list[DeploymentHandle], catalog: DeploymentHandle, inputs: ServeInputs
    ) -> None:
        self.cfg = inputs.cfg
        self.run = inputs.run
        # By value over Serve's gRPC channel: a search is a few small arrays,
        # and this skips the object store round trip of every actor call.
        self.encoder = encoder.options(_by_reference=False)
        self.shards = [shard.options(_by_reference=False) for shard in shards]
        self.catalog = catalog
        self.replica = uuid.uuid4().hex[:12]
        self.bits = inputs.run.config.bits
        self.transform = eval_transform(inputs.run.config.image_size)
        self.classes = inputs.data.classes
        self.images = await asyncio.to_thread(ImageStore, inputs.data, cache_row_groups=self.cfg.image_cache_row_groups)
        self.page = importlib.resources.files("serve").joinpath("page.html").read_text(encoding="utf-8")
        for batched in (self.search_code, self.lookup, self.search_ids):
            batched.set_max_batch_size(self.cfg.search_batch_size)
            batched.set_batch_wait_timeout_s(self.cfg.search_batch_wait_s)
        self.generations = Generations()
        self._sample: tuple[int, pa.Table] | None = None  # (generation, rows) of the last sample read
        self.generations.adopt(await self.catalog.current.remote())
        self._follower = asyncio.ensure_future(self.follow())

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self)

    @property
    def generation(self) -> Generation:
        """The generation later requests get."""
        return self.generations.current

    async def follow(self) -> None:
        """Adopt every generation the catalog makes current, and tell it when older ones are drained here."""
        while True:
            try:
                latest = await self.catalog.watch.remote(
                    self.replica, self.generation, self.generations.oldest_in_use(), WATCH_S
                )
            except Exception as error:  # the catalog is restarting: keep serving what is current here
                logger.warning("the catalog did not answer (%s); retrying", error)
                await asyncio.sleep(WATCH_S / 4)
                continue
            if self.generations.adopt(latest):
                asyncio.ensure_future(self._report_drained(latest))

    async def _report_drained(self, generation: Generation) -> None:
        await self.generations.drained(generation.number)
        if self.generation.number == generation.number:
            await self.catalog.report.remote(self.replica, generation, self.generations.oldest_in_use())

    async def reload(self, uri: str | None) -> Generation:
        """Serve the codes dir at ``uri`` everywhere (the catalog loads it on every shard); current here on return."""
        try:
            generation = await self.catalog.reload.remote(uri)
        except Exception as error:
            raise (find_cause(error) or error) from None
        self.generations.adopt(generation)
        return generation

    async def on_current(self, request):
        """``await request(generation)`` on a pinned generation; run again whole if a shard had dropped it."""
        for attempt in range(RETRIES):
            with self.generations.pinned() as generation:
                try:
                    return await request(generation)
                except GenerationRetired:
                    logger.info("generation %d was retired mid-request (try %d)", generation.number, attempt + 1)
        raise BackendUnavailable(f"the index changed {RETRIES} times during one request")

    async def scatter(self, generation: Generation, method: str, *args: Any, timeout_s: float | None = None) -> list:
        """Call ``method(part, *args)`` on every shard at once; answers in shard order.

        With ``timeout_s``, a shard that has not answered by then (its replica is
        gone and Serve has not restarted it yet) raises :class:`BackendUnavailable`
        for the whole call: no partial merge of the shards that did answer.
        """
        calls = asyncio.gather(
            *(getattr(shard, method).remote(part, *args) for shard, part in zip(self.shards, generation.parts))
        )
        try:
            answers = await asyncio.wait_for(calls, timeout_s)
        except TimeoutError:
            raise BackendUnavailable(f"a shard did not answer {method} within {timeout_s} s") from None
        if any(answer is None for answer in answers):
            raise GenerationRetired(generation.number)
        return answers

    async def search(self, code: np.ndarray, k: int, radius: int | None) -> Hits:
        """Exact top-k of one packed code, on the generation current when it starts."""
        return await self.on_current(lambda generation: self.search_code(CodeQuery(generation, code, k, radius)))

    async def search_item(self, item_id: str, k: int, radius: int | None) -> Hits | None:
        """Exact top-k of an indexed item's own code; None when no indexed item has ``item_id``."""

        async def request(generation: Generation) -> Hits | None:
            if generation.shards == 1:  # one round trip instead of two
                return await self.search_ids(IdQuery(generation, item_id, k, radius))
            code = await self.lookup(IdQuery(generation, item_id))
            return None if code is None else await self.search_code(CodeQuery(generation, code, k, radius))

        return await self.on_current(request)

    @serve.batch(max_concurrent_batches=SEARCH_BATCHES_IN_FLIGHT)
    async def lookup(self, queries: list[IdQuery]) -> list[np.ndarray | None]:
        """Codes of concurrent ids: one call to each owning shard per generation."""
        results: list[np.ndarray | None] = [None] * len(queries)

        async def run_group(rows: list[int]) -> None:
            first = queries[rows[0]]
            shard = self.shards[first.shard]
            call = shard.lookup.remote(first.generation.parts[first.shard], [queries[row].item_id for row in rows])
            try:
                codes = await asyncio.wait_for(call, self.cfg.search_timeout_s)
            except TimeoutError:
                raise BackendUnavailable(f"shard {first.shard} did not answer within {self.cfg.search_timeout_s} s")
            if codes is None:
                raise GenerationRetired(first.generation.number)
            for row, code in zip(rows, codes):
                results[row] = None if code is None else np.frombuffer(code, dtype=np.uint8)

        await asyncio.gather(*(run_group(rows) for rows in grouped(queries, lambda q: (q.generation.number, q.shard))))
        return results

    @serve.batch(max_concurrent_batches=SEARCH_BATCHES_IN_FLIGHT)
    async def search_ids(self, queries: list[IdQuery]) -> list[Hits | None]:
        """Exact top-k of concurrent ids when one shard holds every code: one call per (generation, radius).

        With several shards, searching the owner's part first and then the
        others' halves the queries per scan, which costs more than the lookup
        round it saves (10M codes, 2 shards: 213 -> 174 queries/s).
        """
        results: list[Hits | None] = [None] * len(queries)

        async def run_group(rows: list[int]) -> None:
            first = queries[rows[0]]
            k = max(queries[row].k for row in rows)
            (per_id,) = await self.scatter(
                first.generation,
                "search_ids",
                [queries[row].item_id for row in rows],
                k,
                first.radius,
                timeout_s=self.cfg.search_timeout_s,
            )
            for row, hits in zip(rows, per_id):
                results[row] = None if hits is None else merge_hits([hits], queries[row].k)

        await asyncio.gather(*(run_group(rows) for rows in grouped(queries, lambda q: (q.generation.number, q.radius))))
        return results

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
            per_shard = await self.scatter(
                first.generation, "search", codes, k, first.radius, timeout_s=self.cfg.search_timeout_s
            )
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
            {"id": item_id, "distance": int(distance), **self.labelled(label_ids)}
            for item_id, distance, label_ids in zip(hits.ids, hits.distances, hits.labels)
        ]

    def labelled(self, label_ids: list[int]) -> dict[str, Any]:
        """Class names and class indices of one item."""
        names = [self.classes[i] if 0 <= i < len(self.classes) else str(i) for i in label_ids]
        return {"labels": names, "label_ids": label_ids}

    async def sample(self, n: int) -> list[dict[str, Any]]:
        """``n`` indexed items spread evenly over the current codes (ids and labels), first to last.

        The rows are read once per generation, in a thread, on the first call.
        """
        generation = self.generation
        if self._sample is None or self._sample[0] != generation.number:
            self._sample = (generation.number, await asyncio.to_thread(read_sample, generation.codes, MAX_SAMPLE))
        table = self._sample[1].take(spread(self._sample[1].num_rows, n))
        return [
            {"id": item_id, **self.labelled(label_ids)}
            for item_id, label_ids in zip(table.column("id").to_pylist(), table.column("labels").to_pylist())
        ]

    async def health(self) -> dict[str, Any]:
        """Readiness, the generation, and each process's resident memory (this replica's and every shard's)."""

        async def request(generation: Generation) -> tuple[Generation, list[dict[str, int]]]:
            return generation, await self.scatter(generation, "status", timeout_s=self.cfg.search_timeout_s)

        generation, shards = await self.on_current(request)
        return {
            "status": "ok",
            "codes": sum(shard["rows"] for shard in shards),
            "bits": self.bits,
            "shards": len(self.shards),
            "generation": generation.number,
            "shard_rows": [shard["rows"] for shard in shards],
            "shard_rss_bytes": [shard["rss_bytes"] for shard in shards],
            "ingress_replica": self.replica,
            "ingress_rss_bytes": rss_bytes(),
        }


def spread(count: int, n: int) -> np.ndarray:
    """``min(n, count)`` positions in ``range(count)`` spread evenly, first and last included."""
    return np.unique(np.linspace(0, count - 1, min(n, count)).round().astype(np.int64)) if count else np.zeros(0, int)


def read_sample(codes: CodesDir, n: int) -> pa.Table:
    """Ids and labels of ``n`` rows of ``codes`` spread evenly (:func:`spread`), one row group in memory at a time."""
    wanted = spread(codes.count, n)
    pieces = []
    for start, table in codes.row_groups(columns=("id", "labels")):
        rows = wanted[(wanted >= start) & (wanted < start + table.num_rows)] - start
        if len(rows):
            pieces.append(table.take(pa.array(rows, pa.int64())))
    return pa.concat_tables(pieces) if pieces else codes.read(columns=("id", "labels"), stop=0)
