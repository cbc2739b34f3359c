"""The three Serve deployments: the Encoder, the IndexShards and the Ingress that joins them.

A query image goes ingress (decode, transform) -> Encoder (batched forward
pass, sign bits) -> every IndexShard (exact top-k of its slice) -> ingress
(exact merge, ids and class names). A query by id skips the Encoder: the
ingress keeps every id's code (:class:`serve.index.CodeBook`). The HTTP routes
are in :mod:`serve.api`, the pin/drain rules of a reload in
:mod:`serve.generations`; what is here is what runs inside the replicas.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import torch
from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from contracts.codes import CodesDir
from contracts.run import RunDir
from models.codes import pack_codes
from models.transforms import decode_image, eval_transform, model_input
from serve.api import MAX_SAMPLE, BackendUnavailable, create_api
from serve.config import ServeInputs, check_codes_fit
from serve.generations import Generation, Generations, ShardSlice
from serve.images import ImageStore
from serve.index import CodeBook, Hits, ShardIndex, merge_hits, slice_bounds

logger = logging.getLogger(__name__)

# Pillow formats a query may use: plugins that run external programs
# (EPS through Ghostscript) stay out of reach of an upload.
QUERY_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Search batches the ingress keeps in flight at once: with one, every query that
# arrives while a batch is at the shards waits for its round trip to end before
# its own starts, and the CPUs idle between the two (155 -> 270 queries/s with 4
# on 2 cores, 8 clients).
SEARCH_BATCHES_IN_FLIGHT = 4


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


@serve.deployment
class Encoder:
    """The run's model; concurrent queries share one forward pass (``@serve.batch``)."""

    def __init__(self, run: RunDir, max_batch_size: int, batch_wait_s: float) -> None:
        # A replica sees a GPU only when it was given one (encoder_gpus).
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.config = run.config
        self.model = run.load_model(map_location=self.device)
        self.encode.set_max_batch_size(max_batch_size)
        self.encode.set_batch_wait_timeout_s(batch_wait_s)

    @serve.batch
    async def encode(self, images: list[torch.Tensor]) -> list[bytes]:
        """uint8 (3, S, S) images from :func:`eval_transform` -> packed codes, one per image."""
        batch = model_input(torch.stack(images).to(self.device), self.config)
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
        table = part.codes.read(start=part.start, stop=part.stop)
        logger.info(
            "loaded codes [%d, %d) of %s (generation %d)", part.start, part.stop, part.codes.uri, part.generation
        )
        return ShardIndex.from_table(table, start=part.start, tie_margin=self._tie_margin)


@serve.deployment
@serve.ingress()
class Ingress:
    """The HTTP API's state: scatters each query to every shard and merges exactly.

    One replica: it holds the current index generation, so a reload swaps it
    in one step for every later request.
    """

    async def __init__(self, encoder: DeploymentHandle, shards: list[DeploymentHandle], inputs: ServeInputs) -> None:
        self.cfg = inputs.cfg
        self.run = inputs.run
        # By value over Serve's gRPC channel: a search is a few small arrays,
        # and this skips the object store round trip of every actor call.
        self.encoder = encoder.options(_by_reference=False)
        self.shards = [shard.options(_by_reference=False) for shard in shards]
        self.bits = inputs.run.config.bits
        self.transform = eval_transform(inputs.run.config.image_size)
        self.classes = inputs.data.classes
        self.images = await asyncio.to_thread(ImageStore, inputs.data, cache_row_groups=self.cfg.image_cache_row_groups)
        self.page = importlib.resources.files("serve").joinpath("page.html").read_text(encoding="utf-8")
        self.search_code.set_max_batch_size(self.cfg.search_batch_size)
        self.search_code.set_batch_wait_timeout_s(self.cfg.search_batch_wait_s)
        self.generations = Generations()
        self._sample: tuple[int, pa.Table] | None = None  # (generation, rows) of the last sample read
        await self.serve_codes(inputs.codes)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self)

    @property
    def generation(self) -> Generation:
        """The generation later requests get."""
        return self.generations.current

    async def reload(self, uri: str) -> Generation:
        """Open the codes dir at ``uri`` (its manifest read once, here) and serve it."""
        return await self.serve_codes(await asyncio.to_thread(CodesDir.open, uri))

    async def serve_codes(self, codes: CodesDir) -> Generation:
        """Load ``codes`` on every shard (and its code book here), then swap it in for all later requests.

        Requests that started on the previous generation finish on it; it is
        dropped once none is left. A codes dir that fails to load leaves the
        current one serving.
        """
        check_codes_fit(codes, self.run)
        generation = await self.generations.swap(lambda number: self._load(codes, number), self._retire_all_but)
        logger.info("serving %d codes from %s (generation %d)", codes.count, codes.uri, generation.number)
        return generation

    async def _load(self, codes: CodesDir, number: int) -> Generation:
        slices = tuple(ShardSlice(number, codes, a, b) for a, b in slice_bounds(codes.count, len(self.shards)))
        codebook, _ = await asyncio.gather(asyncio.to_thread(read_codebook, codes), self.scatter(slices, "load"))
        return Generation(number, codes, slices, codebook)

    async def _retire_all_but(self, generation: Generation) -> None:
        await self.scatter(generation.slices, "retire")

    async def scatter(
        self, slices: tuple[ShardSlice, ...], method: str, *args: Any, timeout_s: float | None = None
    ) -> list[Any]:
        """Call ``method(slice, *args)`` on every shard at once; answers in shard order.

        With ``timeout_s``, a shard that has not answered by then (its replica is
        gone and Serve has not restarted it yet) raises :class:`BackendUnavailable`
        for the whole call: no partial merge of the shards that did answer.
        """
        calls = asyncio.gather(
            *(getattr(shard, method).remote(part, *args) for shard, part in zip(self.shards, slices))
        )
        try:
            return await asyncio.wait_for(calls, timeout_s)
        except TimeoutError:
            raise BackendUnavailable(f"a shard did not answer {method} within {timeout_s} s") from None

    async def search(self, code: np.ndarray, k: int, radius: int | None) -> Hits:
        """Exact top-k of one packed code, on the generation current when it starts."""
        with self.generations.pinned() as generation:
            return await self.search_code(CodeQuery(generation, code, k, radius))

    async def search_item(self, item_id: str, k: int, radius: int | None) -> Hits | None:
        """Exact top-k of an indexed item's own code; None when no indexed item has ``item_id``."""
        with self.generations.pinned() as generation:
            code = generation.codebook.code_of(item_id)
            if code is None:
                return None
            return await self.search_code(CodeQuery(generation, code, k, radius))

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
                first.generation.slices, "search", codes, k, first.radius, timeout_s=self.cfg.search_timeout_s
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
        with self.generations.pinned() as generation:
            counts = await self.scatter(generation.slices, "load", timeout_s=self.cfg.search_timeout_s)
        return {
            "status": "ok",
            "codes": int(sum(counts)),
            "bits": self.bits,
            "shards": len(self.shards),
            "generation": generation.number,
        }


def spread(count: int, n: int) -> np.ndarray:
    """``min(n, count)`` positions in ``range(count)`` spread evenly, first and last included."""
    return np.unique(np.linspace(0, count - 1, min(n, count)).round().astype(np.int64)) if count else np.zeros(0, int)


def read_sample(codes: CodesDir, n: int) -> pa.Table:
    """Ids and labels of ``n`` rows of ``codes`` spread evenly (:func:`spread`)."""
    return codes.read(columns=("id", "labels")).take(spread(codes.count, n))


def read_codebook(codes: CodesDir) -> CodeBook:
    """The code book of a whole codes dir (read in the ingress, beside the shards' slices): two columns only."""
    return CodeBook.from_table(codes.read(columns=("id", "code")))
