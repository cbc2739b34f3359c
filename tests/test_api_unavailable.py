"""The HTTP answer while a backend replica is gone: 503 with a JSON detail, without Ray or Serve running."""

from __future__ import annotations

from types import SimpleNamespace

from fastapi.testclient import TestClient

from serve.api import BackendUnavailable, create_api
from serve.config import ServeConfig


class ShardDown:
    """An ingress whose shards do not answer (their node was lost)."""

    bits = 16
    cfg = ServeConfig(run="r", codes="c", data="d")
    generation = SimpleNamespace(codes=SimpleNamespace(uri="/codes"))

    async def search_item(self, item_id: str, k: int, radius: int | None):
        raise BackendUnavailable("a shard did not answer search within 10.0 s")

    async def health(self):
        raise BackendUnavailable("a shard did not answer load within 10.0 s")


def test_a_shard_that_does_not_answer_is_503_never_a_404_or_a_partial_answer() -> None:
    client = TestClient(create_api(ShardDown()))
    for path in ("/search/db-000001?k=5", "/healthz"):
        response = client.get(path)
        assert response.status_code == 503, path
        assert "retry" in response.json()["detail"]
