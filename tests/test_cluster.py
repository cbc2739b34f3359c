"""The `hashray` commands on a Ray cluster of several nodes (one machine), and what losing a worker node does.

The cluster (tests/cluster_support.py) is a head without work resources and two
worker nodes; every command runs as a `hashray` process that joins it through
``RAY_ADDRESS``. A test that removes a node adds a fresh one afterwards, so
every test starts with two worker nodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cluster_support import LocalCluster, local_cluster, wait_for

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


def test_train_resumes_on_the_nodes_left_when_a_worker_node_is_lost(nodes: LocalCluster, dataset, tmp_path) -> None:
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


def test_encode_writes_every_row_once_when_a_worker_node_is_lost(
    nodes: LocalCluster, trained, dataset, clean_codes, tmp_path
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
