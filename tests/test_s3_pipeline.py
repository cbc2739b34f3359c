"""The whole pipeline with every path ``s3://``: ingest, train (and a rerun that resumes), encode, evaluate, serve, reload.

The source is a txtlist whose images and list files live in the bucket, with
ids that are relative paths (slashes included), as the literature's lists are.
"""

from __future__ import annotations

import httpx
import pyarrow.parquet as pq
import pytest
import serve_support as support
from faults import exit_once

from contracts.codes import CodesDir
from contracts.dataset import DatasetDir
from contracts.fs import exists, join, read_json, write_bytes
from hashray.cli import main
from pipelines.train import TrainConfig, run
from serve.config import ServeConfig

pytestmark = pytest.mark.heavy

TRAIN = dict(arch="resnet18", bits=16, batch_size=16, image_size=32, val_queries=8, val_database=32)


def upload_txtlist(tiny_dataset: str, raw: str) -> dict[str, str]:
    """The tiny dataset's query and database images as files under ``raw``, and txtlist files naming them.

    Train is the first 96 database images (the synthetic protocol). Returns the list and classes URIs.
    """
    dataset = DatasetDir.open(tiny_dataset)
    width = len(dataset.classes)
    lists: dict[str, list[str]] = {}
    for split in ("query", "database"):
        lines = []
        for file in dataset.split_files(split):
            for row in pq.read_table(file).to_pylist():
                path = f"images/{split}/c{row['labels'][0]}/{row['id']}.jpg"
                write_bytes(join(raw, path), row["image"])
                hot = ["1" if c in row["labels"] else "0" for c in range(width)]
                lines.append(" ".join([path, *hot]))
        lists[split] = lines
    lists["train"] = lists["database"][:96]
    uris = {}
    for split, lines in lists.items():
        uris[split] = join(raw, f"{split}.txt")
        write_bytes(uris[split], ("\n".join(lines) + "\n").encode())
    uris["classes"] = join(raw, "classes.txt")
    write_bytes(uris["classes"], ("\n".join(dataset.classes) + "\n").encode())
    return uris


def test_the_pipeline_on_s3(s3_store, tiny_dataset) -> None:
    raw, data, run_dir = s3_store.uri("raw"), s3_store.uri("data"), s3_store.uri("runs", "r18")
    codes, evaluation = s3_store.uri("codes"), s3_store.uri("eval")
    lists = upload_txtlist(tiny_dataset, raw)

    # ingest: the images are read from the bucket by Ray Data tasks
    assert main(["ingest", "txtlist", "--out", data, "--root", raw, "--train", lists["train"],
                 "--query", lists["query"], "--database", lists["database"], "--classes", lists["classes"],
                 "--rows-per-file", "64"]) == 0  # fmt: skip
    dataset = DatasetDir.open(data)
    assert dataset.info["splits"] == {"train": 96, "query": 24, "database": 128}
    first_id = pq.ParquetFile(dataset.split_files("database")[0].removeprefix("s3://"), filesystem=s3_store.filesystem()).read_row_group(0).column("id")[0].as_py()  # fmt: skip
    assert first_id.startswith("images/database/") and first_id.endswith(".jpg")

    # train: Ray Train's storage is the run dir on S3; a run that stops after
    # epoch 1 resumes from that S3 checkpoint when the same command runs again
    cfg = TrainConfig(data=data, run=run_dir, epochs=2, cpus_per_worker=0.5, data_cpus=0.5, max_failures=0, **TRAIN)
    with pytest.raises(Exception):
        run(cfg, on_epoch_start=exit_once(run_dir, epoch=1))
    assert not exists(join(run_dir, "model.pt"))
    final = run(cfg)
    assert final["epoch"] == 2 and final["resumed_from"] == 1
    assert [h["epoch"] for h in read_json(join(run_dir, "history.json"))["epochs"]] == [1, 2]

    # encode both splits, evaluate
    for split in ("query", "database"):
        out = join(codes, split)
        assert main(["encode", "--run", run_dir, "--data", data, "--split", split, "--out", out, "--batch-size", "64"]) == 0  # fmt: skip
        assert CodesDir.open(out).count == dataset.rows(split)
    assert main(["evaluate", "--query", join(codes, "query"), "--database", join(codes, "database"),
                 "--out", evaluation, "--topk", "100"]) == 0  # fmt: skip
    metrics = read_json(join(evaluation, "metrics.json"))
    assert 0.0 <= metrics["mAP"] <= 1.0 and exists(join(evaluation, "pr_hamming.png"))

    # serve the S3 dirs beside the store; ids with slashes route; reload a second codes dir
    database = CodesDir.open(join(codes, "database")).read()
    ids = database.column("id").to_pylist()
    serve_cfg = ServeConfig(run=run_dir, codes=join(codes, "database"), data=data, shards=2, port=support.free_port(),
                            encoder_cpus=0.1, shard_cpus=0.1, ingress_cpus=0.1, app_name="hashray-s3")  # fmt: skip
    with support.running_app(serve_cfg) as url:
        health = httpx.get(f"{url}/healthz", timeout=30).json()
        assert health["codes"] == 128
        found = httpx.get(f"{url}/search/{ids[3]}", params={"k": 5}, timeout=30)
        assert found.status_code == 200, found.text
        assert found.json()["results"][0]["distance"] == 0
        image = httpx.get(f"{url}/items/{ids[3]}/image", timeout=30)
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
        assert httpx.get(f"{url}/search/images/none.png", timeout=30).status_code == 404

        query_codes = join(codes, "query")
        reloaded = httpx.post(f"{url}/admin/reload", json={"codes": query_codes}, timeout=120)
        assert reloaded.status_code == 200, reloaded.text
        assert httpx.get(f"{url}/healthz", timeout=30).json()["codes"] == 24
        query_id = CodesDir.open(query_codes).read(["id"]).column("id")[0].as_py()
        assert httpx.get(f"{url}/search/{query_id}", params={"k": 3}, timeout=30).status_code == 200
