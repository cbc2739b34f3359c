"""The load generator of bench/serve_load.py: closed-loop clients on kept-alive HTTP/1.1 connections.

Kept to what a closed-loop client needs because it shares the machine with
the server it measures (a general HTTP client costs ~2 ms of CPU a request).
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time
from collections.abc import Callable

import numpy as np


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


def report(
    name: str, latencies: list[float], errors: collections.Counter, wall: float, resent: int
) -> tuple[float, float, float, int]:
    """Print one endpoint's line (and its errors); return (QPS, p50 ms, p99 ms, errors)."""
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
    return len(latencies) / wall, float(p50), float(p99), sum(errors.values())


async def get_json(port: int, paths: list[str]) -> list[dict]:
    """The JSON answers of GET ``paths``, one after another on one connection (any non-200 is an error)."""
    connection, answers = Connection("127.0.0.1", port), []
    try:
        for path in paths:
            status, body = await connection.send(http_request("GET", path))
            if status != 200:
                raise RuntimeError(f"GET {path} was answered {status}: {body[:300]!r}")
            answers.append(json.loads(body))
    finally:
        connection.close()
    return answers


async def first_answer(port: int, path: str, timeout_s: float) -> None:
    """Return once GET ``path`` is answered 200: the app answers."""
    deadline = time.perf_counter() + timeout_s
    while True:
        try:
            await get_json(port, [path])
            return
        except (OSError, RuntimeError, asyncio.IncompleteReadError):
            if time.perf_counter() > deadline:
                raise
            await asyncio.sleep(0.05)
