"""``hashray encode``: the encoder worker, bad inputs, and train -> encode -> evaluate end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from contracts.codes import CodesDir, codes_matrix, codes_schema, label_lists
from contracts.dataset import DATASET_SCHEMA, DatasetDir, multi_hot
from contracts.fs import write_json
from contracts.run import RunDir
from hashray.cli import main
from models.codes import pack_codes
from models.errors import HashrayError
from models.loss import build_loss
from models.network import HashNetConfig, ResNetHash
from models.transforms import model_input
from pipelines.encode import CodeEncoder, EncodeConfig, run
from pipelines.evaluate import EvaluateConfig
from pipelines.evaluate import run as evaluate
from pipelines.preprocess import PreprocessConfig, Preprocessor
from pipelines.synthetic import synthetic_classes, synthetic_example

CLASSES = tuple(synthetic_classes(6))


def save_untrained(run_dir: Path, classes: tuple[str, ...] = CLASSES) -> str:
    torch.manual_seed(0)
    config = HashNetConfig(arch="resnet18", bits=16, image_size=32, classes=classes, loss="cosine")
    ResNetHash.from_config(config).save(run_dir)
    return str(run_dir)


def test_label_lists_inverts_multi_hot():
    labels = [[0, 3], [5], [1, 2, 4]]
    lists = label_lists(multi_hot(labels, 6))
    assert lists.type == pa.list_(pa.int32()) and lists.to_pylist() == labels


def test_code_encoder_packs_codes_and_lists_rejects(tmp_path):
    run_dir = save_untrained(tmp_path / "run")
    examples = [synthetic_example(i, split="query", seed=0, image_size=32, num_classes=6) for i in range(5)]
    images = np.array([image for image, _ in examples], dtype=object)
    images[2] = b"\xff\xd8 not really a jpeg"
    raw = {
        "id": np.array([f"q{i}" for i in range(5)]),
        "image": images,
        "labels": np.array([np.array(labels) for _, labels in examples], dtype=object),
    }
    batch = Preprocessor(PreprocessConfig(image_size=32), num_classes=6)(raw)
    rejects_dir = tmp_path / "out" / "_rejects"
    table = CodeEncoder(RunDir.open(run_dir), rejects_uri=str(rejects_dir))(batch)

    assert table.schema == codes_schema(16)
    assert table.column("id").to_pylist() == ["q0", "q1", "q3", "q4"]
    assert table.column("labels").to_pylist() == [sorted(set(examples[i][1])) for i in (0, 1, 3, 4)]
    model, config = ResNetHash.from_run(run_dir), RunDir.open(run_dir).config
    expected = pack_codes(model.encode(model_input(torch.from_numpy(batch["image"][[0, 1, 3, 4]]), config)).numpy())
    np.testing.assert_array_equal(codes_matrix(table), expected)
    (part,) = rejects_dir.glob("*.jsonl")
    reject = json.loads(part.read_text())
    assert reject["id"] == "q2" and reject["reason"].startswith("not_an_image")


def write_dataset(root: Path, classes: tuple[str, ...] = CLASSES, rows: int = 4) -> str:
    """A one-file query split of synthetic images, for the checks that fail before any work."""
    examples = [
        synthetic_example(i, split="query", seed=1, image_size=32, num_classes=len(CLASSES)) for i in range(rows)
    ]
    (root / "query").mkdir(parents=True)
    table = pa.table(
        {"id": [f"q{i}" for i in range(rows)], "image": [e[0] for e in examples], "labels": [e[1] for e in examples]},
        schema=DATASET_SCHEMA,
    )
    pq.write_table(table, root / "query" / "part-0.parquet")
    write_json(
        str(root / "dataset.json"), {"name": "t", "classes": list(classes), "splits": {"query": rows}, "created": "now"}
    )
    return str(root)


def test_bad_inputs_are_refused_before_any_work(tmp_path):
    data = write_dataset(tmp_path / "data")
    run_dir = save_untrained(tmp_path / "run")
    out = tmp_path / "codes"

    (tmp_path / "empty_run").mkdir()
    with pytest.raises(HashrayError, match="has no model.pt"):
        run(EncodeConfig(run=str(tmp_path / "empty_run"), data=data, split="query", out=str(out)))
    other = save_untrained(tmp_path / "other", classes=CLASSES[:5] + ("zebra",))
    with pytest.raises(HashrayError, match=r"differ from the model's.*zebra"):
        run(EncodeConfig(run=other, data=data, split="query", out=str(out)))
    shuffled = save_untrained(tmp_path / "shuffled", classes=CLASSES[::-1])
    with pytest.raises(HashrayError, match="different order"):
        run(EncodeConfig(run=shuffled, data=data, split="query", out=str(out)))
    with pytest.raises(HashrayError, match="split 'database' is empty or missing"):
        run(EncodeConfig(run=run_dir, data=data, split="database", out=str(out)))
    with pytest.raises(HashrayError, match="--pool-size must be at least 1"):
        run(EncodeConfig(run=run_dir, data=data, split="query", out=str(out), pool_size=0))
    with pytest.raises(HashrayError, match="dataset.json is missing"):
        run(EncodeConfig(run=run_dir, data=str(tmp_path / "nowhere"), split="query", out=str(out)))
    assert not out.exists()


def test_cli_reports_a_bad_run_dir_in_one_line(ray_session, tmp_path, capsys):
    data = write_dataset(tmp_path / "data")
    code = main(
        ["encode", "--run", str(tmp_path / "missing"), "--data", data, "--split", "query", "--out", str(tmp_path / "c")]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hashray encode: error:") and "model.pt" in err and "\n" not in err


# ---------------------------------------------------------------- end to end


def corrupt_copy(dataset: str, root: Path, bad_row: int) -> tuple[str, str]:
    """A copy of ``dataset`` whose database split has one undecodable image; returns (dir, bad id)."""
    shutil.copytree(dataset, root)
    first = sorted((root / "database").glob("*.parquet"))[0]
    table = pq.read_table(first)
    images = table.column("image").to_pylist()
    images[bad_row] = b"GIF89a but truncated"
    pq.write_table(
        table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary())), first
    )
    return str(root), table.column("id")[bad_row].as_py()


def code_rows(codes_dir: str) -> tuple[list[str], bytes]:
    table = CodesDir.open(codes_dir).read()
    return table.column("id").to_pylist(), codes_matrix(table).tobytes()


def fit_run(dataset: str, run_dir: Path, epochs: int = 6) -> str:
    """A short training run in-process: AdamW on the cosine loss over the train split.

    ``pipelines.train`` (Ray Train, augmentation) reaches only ~0.72 mAP@20
    against ~0.69 for random codes on this tiny set after 10 epochs and takes
    minutes on 2 CPUs, so this test fits the same network with the same loss
    and eval transform in a few seconds; test_train.py covers the Ray Train run.
    """
    table = pq.read_table(DatasetDir.open(dataset).split_files("train"))
    batch = {name: np.array(table.column(name).to_pylist(), dtype=object) for name in ("id", "image", "labels")}
    prepared = Preprocessor(PreprocessConfig(image_size=32), num_classes=len(CLASSES))(batch)
    config = HashNetConfig(arch="resnet18", bits=16, image_size=32, classes=CLASSES, loss="cosine")
    images, labels = model_input(torch.from_numpy(prepared["image"]), config), torch.from_numpy(prepared["labels"])
    torch.manual_seed(0)
    model, loss_fn = ResNetHash.from_config(config), build_loss("cosine")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for rows in torch.randperm(len(images)).split(16):
            optimizer.zero_grad()
            loss_fn(model(images[rows]), labels[rows]).backward()
            optimizer.step()
    model.eval().save(run_dir)
    return str(run_dir)


@pytest.mark.heavy
def test_train_encode_evaluate(ray_session, tiny_dataset, tmp_path):
    run_dir = fit_run(tiny_dataset, tmp_path / "run")
    data, bad_id = corrupt_copy(tiny_dataset, tmp_path / "data", bad_row=5)
    info = DatasetDir.open(data).info
    codes = {split: str(tmp_path / "codes" / split) for split in ("query", "database")}
    manifests = {
        split: run(EncodeConfig(run=run_dir, data=data, split=split, out=out, batch_size=16))
        for split, out in codes.items()
    }

    # Rows in = rows written + rows rejected; the rejected row is listed with its reason.
    assert manifests["query"]["count"] == info["splits"]["query"]
    assert manifests["database"]["count"] == info["splits"]["database"] - 1
    rejects = [json.loads(line) for line in Path(codes["database"], "rejects.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rejects] == [bad_id] and rejects[0]["reason"]
    ids, code_bytes = code_rows(codes["database"])
    dataset_ids = pq.read_table(DatasetDir.open(data).split_files("database")).column("id").to_pylist()
    assert ids == [i for i in dataset_ids if i != bad_id]  # database order = dataset order
    assert manifests["database"]["bits"] == 16 and len(code_bytes) == 2 * len(ids)

    # A complete output of the same inputs is reused; an incomplete one is redone, identically.
    assert run(EncodeConfig(run=run_dir, data=data, split="database", out=codes["database"])) == manifests["database"]
    Path(codes["database"], "manifest.json").unlink()
    Path(codes["database"], "leftover.parquet").write_bytes(b"half-written")
    redone = run(EncodeConfig(run=run_dir, data=data, split="database", out=codes["database"], batch_size=16))
    assert redone["count"] == manifests["database"]["count"]
    assert not Path(codes["database"], "leftover.parquet").exists()
    assert code_rows(codes["database"]) == (ids, code_bytes)

    topk = 20
    metrics = evaluate(
        EvaluateConfig(query=codes["query"], database=codes["database"], out=str(tmp_path / "eval"), topk=topk)
    )
    assert {"bits", "topk", "mAP", "NDCG", "ACG", "WAP", "P@r2"} <= set(metrics)
    # The chance level: random codes of the same length on the same labels.
    assert metrics["mAP"] > metrics["mAP_random"] + 0.1, (metrics["mAP"], metrics["mAP_random"])
