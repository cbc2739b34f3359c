"""One shard, the default up to 2,000,000 codes: a query by id is one call to it, and stays exact."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest
import serve_support as support

pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module")
def served(tiny_dataset, tmp_path_factory) -> tuple[support.Servable, str, str, list[str]]:
    root = tmp_path_factory.mktemp("serve-one-shard")
    base = support.make_servable(tiny_dataset, root)
    keep = list(range(len(base.ids) - 1, 29, -1))  # fewer rows, reversed: the tie-breaks change
    other_ids = [base.ids[i] for i in keep]
    other_dir = support.write_codes(root / "codes-b", other_ids, base.codes[keep], [base.labels[i] for i in keep], 1)
    cfg = support.small_config(base, tiny_dataset, shards=1, app_name="hashray-one-shard-test")
    with support.running_app(cfg) as url:
        yield base, url, other_dir, other_ids


def exact(url: str, codes, ids: list[str], item: str, k: int, radius: int | None) -> bool:
    params = {"k": k} if radius is None else {"k": k, "radius": radius}
    body = httpx.get(f"{url}/search/{item}", params=params, timeout=30).json()
    expected, distances = support.expected_ids(codes, ids, codes[ids.index(item)], k, radius=radius)
    return [r["id"] for r in body["results"]] == expected and [r["distance"] for r in body["results"]] == distances


def test_concurrent_searches_by_id_with_mixed_k_and_radius_are_each_exact(served) -> None:
    base, url, _, _ = served
    cases = [(base.ids[row], k, radius) for row in (0, 33, 127) for k in (1, 9, 128) for radius in (None, 0, 3)]
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        assert all(pool.map(lambda case: exact(url, base.codes, base.ids, *case), cases))


def test_an_unknown_id_is_404_beside_known_ones(served) -> None:
    base, url, _, _ = served
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        paths = ["/search/no-such-id", f"/search/{base.ids[5]}", "/search/also-missing", f"/search/{base.ids[6]}"]
        codes = list(pool.map(lambda path: httpx.get(url + path, timeout=30).status_code, paths))
    assert codes == [404, 200, 404, 200]


def test_after_a_reload_ids_search_the_new_codes(served) -> None:
    base, url, other_dir, other_ids = served
    other_codes = base.codes[[base.ids.index(i) for i in other_ids]]
    try:
        assert httpx.post(f"{url}/admin/reload", json={"codes": other_dir}, timeout=60).status_code == 200
        assert exact(url, other_codes, other_ids, other_ids[10], 20, None)
        assert httpx.get(f"{url}/search/{base.ids[0]}", timeout=30).status_code == 404  # not in the new codes
    finally:
        assert httpx.post(f"{url}/admin/reload", json={"codes": base.codes_dir}, timeout=60).status_code == 200
    assert exact(url, base.codes, base.ids, base.ids[0], 20, None)
