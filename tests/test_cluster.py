"""The `hashray` commands on a Ray cluster of several nodes (one machine), and what losing a worker node does.

The cluster (tests/cluster_support.py) is a head without work resources and two
worker nodes; every command runs as a `hashray` process that joins it through
``RAY_ADDRESS``. A test that removes a node adds a fresh one afterwards, so
every test starts with two worker nodes. ``HASHRAY_FAULT_REPEAT=N`` runs each
node-loss test N times in a row on the same cluster (default once).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cluster_support import LocalCluster, local_cluster, wait_for
from serve_support import expected_ids, write_codes

from contracts.run import HISTORY_JSON

pytestmark = pytest.mark.heavy

# Small and fast, as in test_train.py: 32 px, 16 rows per step, a few validation images.
TRAIN = (
    "--arch resnet18 --bits 16 --batch-size 16 --image-size 32 --val-queries 8 --val-database 32 "
    "--data-cpus 0.5 --cpus-per-worker 0.5 --workers 2 --placement spread"
).split()
BATCH = 16
# Written when Ray Train has committed a checkpoint (not only uploaded it).
CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"
REPEAT = int(os.environ.get("HASHRAY_FAULT_REPEAT", "1"))
repeated = pytest.mark.parametrize("attempt", range(REPEAT))
# Ray Data's actor pool workers (their class name in the actor table).
ENCODER_ACTOR = "MapWorker"


@pytest.fixture(scope="module")
def cluster() -> LocalCluster:
    with local_cluster() as cluster:
        yield cluster


@pytest.fixture()
def nodes(cluster: LocalCluster) -> LocalCluster:
    """The cluster with two worker nodes at the start of the test, and again after it (a removed node is replaced)."""
    yield cluster
    while len(cluster.workers) < 2:
        cluster.add_node()


@pytest.fixture(scope="module")
def dataset(cluster: LocalCluster, tmp_path_factory) -> str:
    """A tiny synthetic dataset dir, ingested on the cluster."""
    out = str(tmp_path_factory.mktemp("cluster") / "data")
    cluster.hashray(
        *"ingest synthetic --train 96 --query 24 --database 128 --image-size 32 --num-classes 6 --rows-per-file 64".split(),
        "--out",
        out,
    )
    return out


def history(run_dir: str) -> list[dict]:
    return json.loads(Path(run_dir, HISTORY_JSON).read_text())["epochs"]


@pytest.fixture(scope="module")
def trained(cluster: LocalCluster, dataset: str, tmp_path_factory) -> str:
    """A run dir trained on the cluster with two workers spread over the two nodes (what encode and serve use)."""
    run_dir = str(tmp_path_factory.mktemp("cluster") / "run")
    cluster.hashray("train", "--data", dataset, "--run", run_dir, "--epochs", "2", *TRAIN)
    return run_dir


def test_train_puts_two_workers_on_two_nodes_and_pairs_across_them(nodes: LocalCluster, trained: str) -> None:
    run_dir = trained
    epochs = history(run_dir)
    assert [h["epoch"] for h in epochs] == [1, 2]
    for h in epochs:
        assert len(h["nodes"]) == 2 and set(h["nodes"]) == set(nodes.workers)  # one worker on each node
        assert h["pair_pool"] == 2 * BATCH  # each batch paired with the other node's batch (gloo all-gather)
        assert 0.0 <= h["val_mAP"] <= 1.0
    assert Path(run_dir, "model.pt").exists()


@repeated
def test_train_resumes_on_the_nodes_left_when_a_worker_node_is_lost(
    nodes: LocalCluster, dataset, tmp_path, attempt: int
) -> None:
    run_dir = tmp_path / "run"
    epochs = 4
    job = nodes.start("train", "--data", dataset, "--run", str(run_dir), "--epochs", str(epochs), *TRAIN)
    try:
        wait_for(lambda: (run_dir / CHECKPOINT_SNAPSHOT).exists() or job.poll() is not None, 240, "a checkpoint")
        assert job.poll() is None, f"training ended before a node could be removed:\n{job.stdout.read()}"
        lost = nodes.workers[-1]
        nodes.remove_node(lost)
        output, _ = job.communicate(timeout=300)
    finally:
        job.kill()
    assert job.returncode == 0, output
    done = history(str(run_dir))
    assert [h["epoch"] for h in done] == list(range(1, epochs + 1))  # every epoch, once
    resumed = [h for h in done if h["resumed_from"] > 0]
    assert resumed, f"no epoch was resumed from a checkpoint: {done}"
    # Resumed from a checkpoint, not from scratch, and only on the node left.
    assert all(h["resumed_from"] >= 1 for h in resumed)
    assert all(lost not in h["nodes"] and len(h["nodes"]) == 2 for h in resumed)
    print(f"node loss during training: resumed from epoch {resumed[0]['resumed_from']}, {len(done)}/{epochs} epochs")
    assert Path(run_dir, "model.pt").exists()


def read_codes(codes_dir: str) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted(Path(codes_dir).glob("*.parquet")))


def encode(trained: str, dataset: str, out: Path) -> list[str]:
    """The `hashray encode` command of the database split with an actor pool of two."""
    return [
        *("encode", "--run", trained, "--data", dataset, "--split", "database", "--out", str(out)),
        *("--pool-size", "2", "--batch-size", "8"),
    ]


@pytest.fixture(scope="module")
def clean_codes(cluster: LocalCluster, trained: str, dataset: str, tmp_path_factory) -> tuple[str, set[str]]:
    """The database codes of an encode on two healthy nodes, and the nodes its encoder actors ran on."""
    out = tmp_path_factory.mktemp("cluster") / "codes"
    before = set(cluster.actors(ENCODER_ACTOR).get("DEAD", []))
    cluster.hashray(*encode(trained, dataset, out))
    actor_nodes = cluster.actors(ENCODER_ACTOR)
    return str(out), set(actor_nodes.get("DEAD", [])) - before | set(actor_nodes.get("ALIVE", []))


def database_ids(dataset: str) -> list[str]:
    return read_codes(str(Path(dataset, "database"))).column("id").to_pylist()


def check_exact(codes_dir: str, dataset: str) -> pa.Table:
    """Every database row exactly once: the count, the ids, and the manifest agree."""
    table = read_codes(codes_dir)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == json.loads(Path(codes_dir, "manifest.json").read_text())["count"]
    assert sorted(ids) == sorted(database_ids(dataset))
    return table.sort_by("id")


def test_encode_spreads_the_actor_pool_over_both_nodes(nodes: LocalCluster, clean_codes, dataset) -> None:
    codes_dir, actor_nodes = clean_codes
    assert actor_nodes == set(nodes.workers)
    check_exact(codes_dir, dataset)


@repeated
def test_encode_writes_every_row_once_when_a_worker_node_is_lost(
    nodes: LocalCluster, trained, dataset, clean_codes, tmp_path, attempt: int
) -> None:
    out = tmp_path / "codes"
    job = nodes.start(*encode(trained, dataset, out))
    try:
        wait_for(
            lambda: len(set(nodes.actors(ENCODER_ACTOR).get("ALIVE", []))) == 2 or job.poll() is not None,
            120,
            "encoder actors on both nodes",
            poll=0.05,
        )
        assert job.poll() is None, f"encode ended before a node could be removed:\n{job.stdout.read()}"
        nodes.remove_node(nodes.workers[-1])
        output, _ = job.communicate(timeout=300)
    finally:
        job.kill()
    assert job.returncode == 0, output
    again, clean = check_exact(str(out), dataset), check_exact(clean_codes[0], dataset)
    assert again.column("code").equals(clean.column("code"))  # bit for bit a clean run's codes
    assert again.column("labels").equals(clean.column("labels"))
    print(f"node loss during encode: {again.num_rows} rows, unique ids, codes equal to a clean run's")


# ---------------------------------------------------------------- serve

SERVE = "--shards 2 --encoder-cpus 0.25 --shard-cpus 0.25 --ingress-cpus 0.25".split()


class Service:
    """A `hashray serve` process on the cluster and what its answers are checked against."""

    def __init__(self, cluster: LocalCluster, trained: str, codes_dir: str, dataset: str) -> None:
        self.cluster = cluster
        self.port = cluster.serve_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = cluster.start(
            *("serve", "--run", trained, "--codes", codes_dir, "--data", dataset, "--port", str(self.port)), *SERVE
        )
        table = read_codes(codes_dir)
        self.truth = {codes_dir: table}
        wait_for(self._ready, 180, "the service to answer /healthz", poll=1)

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"hashray serve exited {self.process.returncode}:\n{self.process.stdout.read()}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def replica_nodes(self, deployment: str) -> list[str]:
        return self.cluster.actors(f"ServeReplica:hashray:{deployment}").get("ALIVE", [])

    def exact(self, response: httpx.Response, item_id: str, codes_dir: str, k: int) -> bool:
        """Whether a 200 answer is the brute-force top-k of ``item_id`` in ``codes_dir``."""
        table = self.truth[codes_dir]
        ids = table.column("id").to_pylist()
        codes = np.stack([np.frombuffer(c, dtype=np.uint8) for c in table.column("code").to_pylist()])
        want = expected_ids(codes, ids, codes[ids.index(item_id)], k)
        results = response.json()["results"]
        return ([r["id"] for r in results], [r["distance"] for r in results]) == want

    def close(self) -> None:
        """Ctrl-C: `hashray serve` deletes its app (Serve itself, and its HTTP port, stay up on the cluster)."""
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except Exception:
            self.process.kill()


def test_serve_puts_the_shards_on_two_nodes_and_answers_exactly(nodes: LocalCluster, trained, dataset, clean_codes):
    service = Service(nodes, trained, clean_codes[0], dataset)
    try:
        assert sorted(service.replica_nodes("IndexShard0") + service.replica_nodes("IndexShard1")) == sorted(
            nodes.workers
        )
        for item_id in database_ids(dataset)[::16]:
            response = httpx.get(f"{service.url}/search/{item_id}", params={"k": 10}, timeout=30)
            assert response.status_code == 200 and service.exact(response, item_id, clean_codes[0], 10)
    finally:
        service.close()


class Prober(threading.Thread):
    """Queries by id in a loop, classifying every answer: exact, wrong, a status code, or a dropped connection."""

    def __init__(self, service: Service, ids: list[str], *codes_dirs: str) -> None:
        super().__init__(daemon=True)
        self.service, self.ids, self.codes_dirs = service, ids, codes_dirs
        self.outcomes: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=60) as client:
            for n in range(10**9):
                if self.stop.is_set():
                    return
                item_id = self.ids[n % len(self.ids)]
                try:
                    response = client.get(f"{self.service.url}/search/{item_id}", params={"k": 10})
                except httpx.HTTPError as error:
                    self.outcomes.append(f"dropped ({type(error).__name__})")
                    continue
                if response.status_code != 200:
                    self.outcomes.append(str(response.status_code))
                else:
                    exact = any(self.service.exact(response, item_id, d, 10) for d in self.codes_dirs)
                    self.outcomes.append("exact" if exact else "wrong")
                time.sleep(0.02)

    def exact_streak(self, n: int) -> bool:
        return len(self.outcomes) >= n and all(o == "exact" for o in self.outcomes[-n:])


@repeated
def test_serve_answers_503_while_a_lost_shard_comes_back_then_exactly(
    nodes: LocalCluster, trained, dataset, clean_codes, tmp_path, attempt: int
) -> None:
    codes_dir = clean_codes[0]
    table = read_codes(codes_dir)
    # The codes to reload during the outage: fewer rows, reverse order (every tie-break changes).
    keep = list(range(table.num_rows - 1, 19, -1))
    ids = [table.column("id")[i].as_py() for i in keep]
    other_dir = write_codes(
        tmp_path / "other",
        ids,
        np.stack([np.frombuffer(table.column("code")[i].as_py(), dtype=np.uint8) for i in keep]),
        [table.column("labels")[i].as_py() for i in keep],
        files=2,
    )
    service = Service(nodes, trained, codes_dir, dataset)
    service.truth[other_dir] = read_codes(other_dir)
    try:
        ingress = service.replica_nodes("Ingress")
        shards = service.replica_nodes("IndexShard0") + service.replica_nodes("IndexShard1")
        lost = next(node for node in nodes.workers if node in shards and node not in ingress)
        prober = Prober(service, ids, codes_dir, other_dir)  # either is exact while the reload swaps
        prober.start()
        wait_for(lambda: prober.exact_streak(10), 60, "exact answers before the fault")
        before = len(prober.outcomes)
        nodes.remove_node(lost)
        wait_for(lambda: len(prober.outcomes) > before + 3, 60, "answers after the fault")
        reload = httpx.post(f"{service.url}/admin/reload", json={"codes": other_dir}, timeout=180)
        assert reload.status_code in (200, 503) or 400 <= reload.status_code < 500, reload.text
        current = other_dir if reload.status_code == 200 else codes_dir
        during = Counter(prober.outcomes[before:])
        prober.stop.set()
        prober.join()
        # Then every query is exact again, on the generation the reload's answer says is current.
        after = Prober(service, ids, current)
        after.start()
        wait_for(
            lambda: after.exact_streak(30),
            180,
            lambda: f"exact answers again (so far {Counter(after.outcomes)}, the last {after.outcomes[-5:]})",
        )
        after.stop.set()
        after.join()
        health = httpx.get(f"{service.url}/healthz", timeout=30).json()
        assert health["codes"] == service.truth[current].num_rows
    finally:
        service.close()
    print(f"during the outage: {dict(during)}; reload {reload.status_code}; after: {dict(Counter(after.outcomes))}")
    # While the shard was gone: exact answers (of either generation while the reload swapped) or 503, nothing else.
    assert set(during) <= {"exact", "503"}, dict(during)
    assert set(after.outcomes) <= {"exact", "503"}, dict(Counter(after.outcomes))
