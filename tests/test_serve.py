"""The Serve app end to end on the tiny synthetic set, two ingress replicas: every endpoint, bad input, reloads."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import struct
import threading
import time
import zlib
from dataclasses import dataclass

import httpx
import numpy as np
import pyarrow as pa
import pytest
import serve_support as support
import yaml
from PIL import Image

from contracts.ids import owners
from models.errors import HashrayError
from serve.app import app_builder

pytestmark = pytest.mark.heavy


@dataclass(frozen=True)
class Served(support.Servable):
    url: str = ""
    other_codes_dir: str = ""  # a second codes dir to reload: fewer rows, reverse order
    other_ids: list[str] = dataclasses.field(default_factory=list)
    other_codes: np.ndarray | None = None


@pytest.fixture(scope="module")
def served(tiny_dataset, tmp_path_factory) -> Served:
    root = tmp_path_factory.mktemp("serve")
    base = support.make_servable(tiny_dataset, root)
    keep = list(range(len(base.ids) - 1, 19, -1))  # 108 rows, reversed: every tie-break changes
    other_ids = [base.ids[i] for i in keep]
    other_dir = support.write_codes(
        root / "codes-b", other_ids, base.codes[keep], [base.labels[i] for i in keep], files=2
    )
    cfg = support.small_config(
        base,
        tiny_dataset,
        shards=3,
        app_name="hashray-test",
        ingress_min_replicas=2,
        ingress_max_replicas=2,
        ingress_target_ongoing_requests=16,
        max_upload_mb=1.0,
        max_pixels=1_000_000,
    )
    with support.running_app(cfg) as url:
        yield Served(
            **vars(base), url=url, other_codes_dir=other_dir, other_ids=other_ids, other_codes=base.codes[keep]
        )


def get(served: Served, path: str, **kwargs) -> httpx.Response:
    return httpx.get(served.url + path, timeout=30, **kwargs)


def post(served: Served, path: str, **kwargs) -> httpx.Response:
    return httpx.post(served.url + path, timeout=30, **kwargs)


def test_healthz_counts_the_codes_and_reports_each_process(served: Served) -> None:
    response = get(served, "/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["codes"] == len(served.ids) == sum(body["shard_rows"])
    assert body["bits"] == support.BITS
    owned = np.bincount(owners(pa.array(served.ids), 3), minlength=3)
    assert body["shard_rows"] == owned.tolist()  # each shard holds its hash partition, nothing more
    assert len(body["shard_rss_bytes"]) == 3 and min(body["shard_rss_bytes"]) > 10_000_000
    assert body["ingress_rss_bytes"] > 10_000_000


def test_two_ingress_replicas_run_with_the_autoscaling_config(served: Served) -> None:
    from ray import serve
    from ray.serve.context import _get_global_client

    info, _ = _get_global_client().get_deployment_info("Ingress", "hashray-test")
    autoscaling = info.deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (2, 2)
    assert autoscaling.target_ongoing_requests == 16
    ingress = serve.status().applications["hashray-test"].deployments["Ingress"]
    assert ingress.replica_states.get("RUNNING") == 2
    # Both answer; each says which it is. A new connection per request: on one kept-alive
    # connection all 40 once reached the same replica.
    replicas = {
        httpx.get(f"{served.url}/healthz", headers={"Connection": "close"}, timeout=30).json()["ingress_replica"]
        for _ in range(40)
    }
    assert len(replicas) == 2


def test_page_is_served(served: Served) -> None:
    response = get(served, "/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert 'id="results"' in response.text


def test_sample_spreads_over_the_database_with_labels(served: Served) -> None:
    body = get(served, "/sample", params={"n": 5}).json()
    assert body["count"] == len(served.ids)
    ids = [r["id"] for r in body["results"]]
    assert len(set(ids)) == 5 and ids[0] == served.ids[0] and ids[-1] == served.ids[-1]
    assert ids == sorted(ids, key=served.ids.index)  # in database order
    labels = dict(zip(served.ids, served.labels))
    for row in body["results"]:
        assert row["label_ids"] == labels[row["id"]]
        assert row["labels"] == [served.classes[i] for i in row["label_ids"]]
    assert len(get(served, "/sample").json()["results"]) == 24
    assert get(served, "/sample", params={"n": 0}).status_code == 422
    assert get(served, "/sample", params={"n": 101}).status_code == 422


@pytest.mark.parametrize("k", [1, 5, 23, 128, 1000])
def test_search_by_id_is_the_brute_force_ranking(served: Served, k: int) -> None:
    for row in (0, 7, 64, 127):
        body = get(served, f"/search/{served.ids[row]}", params={"k": k}).json()
        ids, distances = support.expected_ids(served.codes, served.ids, served.codes[row], k)
        assert [r["id"] for r in body["results"]] == ids
        assert [r["distance"] for r in body["results"]] == distances
        assert body["bits"] == support.BITS and body["took_ms"] > 0


def test_concurrent_searches_with_mixed_k_and_radius_are_each_exact(served: Served) -> None:
    """The ingress batches concurrent searches; each still gets its own exact answer."""
    cases = [(row, k, radius) for row in (2, 40, 90) for k in (1, 8, 40) for radius in (None, 1, 4)]

    def run(case: tuple[int, int, int | None]) -> bool:
        row, k, radius = case
        params = {"k": k} if radius is None else {"k": k, "radius": radius}
        body = get(served, f"/search/{served.ids[row]}", params=params).json()
        ids, distances = support.expected_ids(served.codes, served.ids, served.codes[row], k, radius=radius)
        return [r["id"] for r in body["results"]] == ids and [r["distance"] for r in body["results"]] == distances

    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        assert all(pool.map(run, cases))


def test_results_carry_class_names_and_indices(served: Served) -> None:
    for result in get(served, f"/search/{served.ids[3]}", params={"k": 20}).json()["results"]:
        position = served.ids.index(result["id"])
        assert result["label_ids"] == served.labels[position]
        assert result["labels"] == [served.classes[i] for i in served.labels[position]]


@pytest.mark.parametrize("radius", [0, 2, 5])
def test_radius_keeps_only_close_items(served: Served, radius: int) -> None:
    body = get(served, f"/search/{served.ids[9]}", params={"k": 50, "radius": radius}).json()
    ids, distances = support.expected_ids(served.codes, served.ids, served.codes[9], 50, radius=radius)
    assert [r["id"] for r in body["results"]] == ids
    assert all(d <= radius for d in distances)


def test_post_image_gets_the_stored_code(served: Served) -> None:
    """The posted bytes of an indexed image get exactly its stored code (same decode and transform)."""
    row = 11
    ids, distances = support.expected_ids(served.codes, served.ids, served.codes[row], 10)
    multipart = post(served, "/search", params={"k": 10}, files={"image": ("q.jpg", served.images[row], "image/jpeg")})
    raw = post(served, "/search", params={"k": 10}, content=served.images[row], headers={"content-type": "image/jpeg"})
    for response in (multipart, raw):
        assert response.status_code == 200, response.text
        assert [r["id"] for r in response.json()["results"]] == ids
        assert [r["distance"] for r in response.json()["results"]] == distances


def test_post_png_with_radius(served: Served) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buffer, format="PNG")
    response = post(served, "/search", params={"k": 7, "radius": 16}, files={"image": ("red.png", buffer.getvalue())})
    assert response.status_code == 200
    assert len(response.json()["results"]) == 7


def test_item_image_is_the_stored_bytes(served: Served) -> None:
    response = get(served, f"/items/{served.ids[5]}/image")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert response.content == served.images[5]


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: a decompression bomb."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(data)


def chunked(data: bytes):
    """A body without Content-Length: the size limit must hold while streaming."""
    for start in range(0, len(data), 256 * 1024):
        yield data[start : start + 256 * 1024]


BAD_REQUESTS = {
    "text": (415, "POST", "/search", {"content": b"definitely not an image"}),
    "empty body": (415, "POST", "/search", {"content": b""}),
    "truncated jpeg": (415, "POST", "/search", {"content": "TRUNCATED"}),
    "multipart text": (415, "POST", "/search", {"files": {"image": ("a.txt", b"hello")}}),
    "too big": (413, "POST", "/search", {"content": b"\xff" * (1024 * 1024 + 1)}),
    "too big streamed": (413, "POST", "/search", {"content": "CHUNKED"}),
    "bomb": (400, "POST", "/search", {"content": png_declaring(20_000, 20_000)}),
    "k zero": (422, "GET", "/search/ID", {"params": {"k": 0}}),
    "k too large": (422, "POST", "/search", {"params": {"k": 1001}, "content": b"x"}),
    "k not a number": (422, "GET", "/search/ID", {"params": {"k": "ten"}}),
    "radius negative": (422, "GET", "/search/ID", {"params": {"radius": -1}}),
    "radius over bits": (422, "GET", "/search/ID", {"params": {"radius": support.BITS + 1}}),
    "radius not a number": (422, "POST", "/search", {"params": {"radius": "near"}, "content": b"x"}),
    "unknown id": (404, "GET", "/search/no-such-id", {}),
    "unknown image": (404, "GET", "/items/no-such-id/image", {}),
    "multipart no boundary": (
        400,
        "POST",
        "/search",
        {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}},
    ),
    "multipart garbage": (
        400,
        "POST",
        "/search",
        {"content": b"garbage", "headers": {"content-type": "multipart/form-data; boundary=zz"}},
    ),
    "multipart no image field": (400, "POST", "/search", {"files": {"picture": ("a.jpg", b"\xff\xd8")}}),
    "reload bad json": (400, "POST", "/admin/reload", {"content": b"{not json"}),
    "reload missing dir": (400, "POST", "/admin/reload", {"json": {"codes": "/nonexistent/codes"}}),
    "reload relative dir": (400, "POST", "/admin/reload", {"json": {"codes": "codes"}}),
    "reload not a dict": (400, "POST", "/admin/reload", {"json": ["codes"]}),
    "unknown route": (404, "GET", "/nope", {}),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_gets_its_status_and_the_service_keeps_answering(served: Served, name: str) -> None:
    status, method, path, kwargs = BAD_REQUESTS[name]
    kwargs = dict(kwargs)
    if kwargs.get("content") == "TRUNCATED":
        kwargs["content"] = served.images[0][: len(served.images[0]) // 2]
    if kwargs.get("content") == "CHUNKED":
        kwargs["content"] = chunked(b"\xff" * (2 * 1024 * 1024))
    response = httpx.request(method, served.url + path.replace("ID", served.ids[0]), timeout=30, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["detail"]
    after = post(served, "/search", params={"k": 3}, files={"image": ("q.jpg", served.images[1], "image/jpeg")})
    assert after.status_code == 200 and len(after.json()["results"]) == 3
    assert get(served, "/healthz").json()["codes"] == len(served.ids)


def test_reload_under_concurrent_queries_loses_none(served: Served) -> None:
    """Every query during two swaps succeeds and matches the old or the new index, never a mix."""
    expected = {}
    for item in (served.ids[i] for i in (25, 60, 99)):
        query = served.codes[served.ids.index(item)]
        expected[item] = {
            tuple(support.expected_ids(codes, ids, query, 30)[0])
            for codes, ids in ((served.codes, served.ids), (served.other_codes, served.other_ids))
        }
        assert len(expected[item]) == 2  # the two indexes rank differently
    stop = threading.Event()

    def query_loop(item: str) -> list[tuple[int, str, tuple[str, ...]]]:
        seen = []
        with httpx.Client(base_url=served.url, timeout=30) as client:
            while not stop.is_set():
                response = client.get(f"/search/{item}", params={"k": 30})
                seen.append((response.status_code, item, tuple(r["id"] for r in response.json().get("results", []))))
        return seen

    with concurrent.futures.ThreadPoolExecutor(len(expected)) as pool:
        futures = [pool.submit(query_loop, item) for item in expected]
        time.sleep(0.5)
        swapped = post(served, "/admin/reload", json={"codes": served.other_codes_dir})
        assert swapped.status_code == 200, swapped.text
        assert swapped.json()["codes"] == len(served.other_ids)
        assert get(served, "/healthz").json()["codes"] == len(served.other_ids)
        time.sleep(0.5)
        back = post(served, "/admin/reload", json={"codes": served.codes_dir})
        assert back.status_code == 200, back.text
        time.sleep(0.3)
        stop.set()
        seen = [answer for future in futures for answer in future.result()]
    assert len(seen) > 10
    assert all(status == 200 for status, _, _ in seen)
    assert all(ids in expected[item] for _, item, ids in seen)
    assert {ids for _, _, ids in seen} == set().union(*expected.values())  # both indexes answered
    assert get(served, "/healthz").json()["codes"] == len(served.ids)


def test_a_reload_every_second_under_load_loses_nothing(served: Served) -> None:
    """6 clients for ~8 s over both ingress replicas, a reload each second: every answer exact for one generation."""
    generations = {
        served.codes_dir: (served.codes, served.ids),
        served.other_codes_dir: (served.other_codes, served.other_ids),
    }
    items = [served.ids[i] for i in (25, 60, 99)]
    expected = {
        (uri, item): tuple(support.expected_ids(codes, ids, served.codes[served.ids.index(item)], 20)[0])
        for uri, (codes, ids) in generations.items()
        for item in items
    }
    stop, last = threading.Event(), threading.Event()

    def query_loop(item: str) -> list[tuple[int, str, tuple[str, ...], bool]]:
        seen = []
        with httpx.Client(base_url=served.url, timeout=30) as client:
            while not stop.is_set():
                after_last = last.is_set()
                response = client.get(f"/search/{item}", params={"k": 20})
                ids = tuple(r["id"] for r in response.json().get("results", []))
                seen.append((response.status_code, item, ids, after_last))
        return seen

    order = [served.other_codes_dir, served.codes_dir] * 4
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(query_loop, items[i % 3]) for i in range(6)]
        for uri in order:
            time.sleep(1.0)
            response = post(served, "/admin/reload", json={"codes": uri})
            assert response.status_code == 200, response.text
        last.set()  # from here on, every request starts after the last reload's answer
        time.sleep(1.0)
        stop.set()
        seen = [answer for future in futures for answer in future.result()]
    assert len(seen) > 50
    assert [status for status, *_ in seen if status != 200] == []
    assert all(
        ids in (expected[served.codes_dir, item], expected[served.other_codes_dir, item]) for _, item, ids, _ in seen
    )
    assert all(ids == expected[order[-1], item] for _, item, ids, after in seen if after)
    assert {
        ids for _, item, ids, _ in seen if ids == expected[served.other_codes_dir, item]
    }  # both generations answered
    print(f"reload under load: {len(seen)} answers, {len(order)} reloads")


def test_reload_with_an_empty_body_rereads_the_current_codes(served: Served) -> None:
    response = post(served, "/admin/reload", content=b"")
    assert response.status_code == 200
    assert response.json()["codes"] == len(served.ids)


def test_admin_token_is_required_when_configured() -> None:
    from fastapi import HTTPException
    from starlette.requests import Request

    from serve.api import check_admin

    def request(headers: dict[str, str]) -> Request:
        return Request({"type": "http", "headers": [(k.encode(), v.encode()) for k, v in headers.items()]})

    check_admin(request({}), None)
    check_admin(request({"x-admin-token": "s3cret"}), "s3cret")
    for headers in ({}, {"x-admin-token": "wrong"}):
        with pytest.raises(HTTPException) as error:
            check_admin(request(headers), "s3cret")
        assert error.value.status_code == 403


def test_serve_config_file_builds_the_app(served: Served, tiny_dataset: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    with open("serve/config.yaml") as handle:
        config = yaml.safe_load(handle)
    ServeDeploySchema.model_validate(config)  # the file `serve deploy` would accept
    (application,) = config["applications"]
    module, _, name = application["import_path"].partition(":")
    assert (module, name) == ("serve.app", "app_builder")
    args = {**application["args"], "run": served.run, "codes": served.codes_dir, "data": tiny_dataset}
    assert type(app_builder(args)).__name__ == "Application"
    with pytest.raises(HashrayError, match="unknown serve args"):
        app_builder({**args, "shard": 2})
    with pytest.raises(HashrayError, match="dataset.json"):
        app_builder({**args, "data": "/nonexistent"})


def test_cli_reports_missing_inputs_in_one_line(tmp_path, capsys) -> None:
    from hashray.cli import main

    code = main(["serve", "--run", str(tmp_path / "run"), "--codes", str(tmp_path / "codes"), "--data", str(tmp_path)])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("hashray serve: error:")
    assert "has no model.pt" in error
    assert "\n" not in error
