"""The HTTP API of the ingress: FastAPI routes and the checks that make every bad input a 4xx.

Only HTTP lives here (parameters, bodies, status codes, the JSON answer);
searching, encoding and reloading are the ingress's (:mod:`serve.deployments`),
so the routes stay a thin layer that can be read in one go.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from typing import TYPE_CHECKING, Any

import ray
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from models.errors import HashrayError
from models.transforms import BadImage
from serve.images import content_type
from serve.index import Hits

MAX_SAMPLE = 100  # most items GET /sample shows (the page opens on a sample of the database)

if TYPE_CHECKING:  # the ingress builds the API from itself; importing it here would be circular
    from serve.deployments import Ingress

logger = logging.getLogger(__name__)

MAX_K = 1000


class BackendUnavailable(Exception):
    """A backend replica did not answer in time (it is down or restarting): the request gets 503, never a guess."""


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
    async def search_image(request: Request, k: int = k_param(), radius: int | None = radius_param()) -> JSONResponse:
        started = time.perf_counter()
        check_radius(radius, service.bits)
        body = await read_body(request, service.cfg.max_upload_bytes)
        try:
            code = await service.encode(await image_part(request, body))
        except BadImage as error:
            raise HTTPException(400 if error.reason == "too_many_pixels" else 415, detail=str(error)) from error
        return answer(service, await service.search(code, k, radius), started)

    @api.get("/sample")
    async def sample(n: int = Query(24, ge=1, le=MAX_SAMPLE, description=f"items, 1..{MAX_SAMPLE}")) -> dict[str, Any]:
        """Items spread evenly over the database, with their labels: what the page opens on."""
        return {"results": await service.sample(n), "count": service.generation.count}

    @api.get("/search/{item_id:path}")
    async def search_item(item_id: str, k: int = k_param(), radius: int | None = radius_param()) -> JSONResponse:
        started = time.perf_counter()
        check_radius(radius, service.bits)
        hits = await service.search_item(item_id, k, radius)
        if hits is None:
            raise HTTPException(404, detail=f"no indexed item has id {item_id!r}")
        return answer(service, hits, started)

    @api.get("/items/{item_id:path}/image")
    async def item_image(item_id: str) -> Response:
        data = await asyncio.to_thread(service.images.get, item_id)
        if data is None:
            raise HTTPException(404, detail=f"the dataset's database split has no image with id {item_id!r}")
        return Response(data, media_type=content_type(data), headers={"Cache-Control": "public, max-age=3600"})

    @api.post("/admin/reload")
    async def reload(request: Request) -> dict[str, Any]:
        check_admin(request, service.cfg.admin_token)
        codes = reload_target(await read_body(request, service.cfg.max_upload_bytes), service.generation.codes.uri)
        started = time.perf_counter()
        try:
            generation = await service.reload(codes)
        except HashrayError as error:
            raise HTTPException(400, detail=str(error)) from error
        return {"codes": generation.count, "generation": generation.number, "took_ms": elapsed_ms(started)}

    @api.exception_handler(BackendUnavailable)
    @api.exception_handler(ray.exceptions.RayError)
    async def backend_unavailable(_: Request, error: Exception) -> JSONResponse:
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
