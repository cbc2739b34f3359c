"""hashray ingest: synthetic determinism, and txtlist/coco/folder sources with every kind of bad row."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from contracts.dataset import DATASET_SCHEMA, DatasetDir
from hashray.cli import main
from models.errors import HashrayError
from pipelines.ingest import IngestConfig, run
from pipelines.synthetic import synthetic_example

MAX_PIXELS = 40 * 40  # the 32x32 good images pass, a 64x64 one is "too many pixels"
GOOD = [f"img/good{i}.jpg" for i in range(8)]


def read_split(dataset: str | Path, split: str) -> dict[str, tuple[bytes, list[int]]]:
    files = sorted((Path(dataset) / split).glob("*.parquet"))
    rows = [row for f in files for row in pq.read_table(f).to_pylist()]
    assert all(pq.read_schema(f).remove_metadata() == DATASET_SCHEMA for f in files)
    assert len({row["id"] for row in rows}) == len(rows)
    return {row["id"]: (row["image"], row["labels"]) for row in rows}


def read_rejects(dataset: str | Path) -> dict[str, str]:
    lines = (Path(dataset) / "rejects.jsonl").read_text().splitlines()
    return {json.loads(line)["where"]: json.loads(line)["reason"] for line in lines}


def drawn(dataset: Path, summary: dict) -> dict[str, int]:
    """Rows each split drew (coco, folder): written, plus rejected for a bad image after the draw."""
    lines = (dataset / "rejects.jsonl").read_text().splitlines()
    rejected = Counter(split for line in lines for split in json.loads(line)["splits"])
    return {split: n + rejected[split] for split, n in summary["splits"].items()}


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    """An image folder with good JPEGs and one file for every kind of bad image."""
    root = tmp_path_factory.mktemp("source") / "root"
    (root / "img").mkdir(parents=True)
    for i, path in enumerate(GOOD):
        (root / path).write_bytes(synthetic_example(i, split="query", seed=1, image_size=32, num_classes=4)[0])
    (root / "img/empty.jpg").write_bytes(b"")
    good = (root / GOOD[0]).read_bytes()
    (root / "img/truncated.jpg").write_bytes(good[: len(good) * 3 // 4])  # header intact, scan cut
    (root / "img/text.jpg").write_bytes(b"this is not an image\n")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buffer, format="PNG")
    (root / "img/big.png").write_bytes(buffer.getvalue())
    (root.parent / "outside.jpg").write_bytes((root / GOOD[0]).read_bytes())  # exists, but not under root
    return root


BAD_IMAGES = {
    "img/empty.jpg": "empty_file",
    "img/truncated.jpg": "truncated_image",
    "img/text.jpg": "not_an_image",
    "img/big.png": "too_many_pixels",
    "img/missing.jpg": "missing_file",
}


def write_lists(root: Path) -> dict[str, str]:
    """train/query/database lists over 4 classes with bad lines at known line numbers."""
    lists = {
        "train": [
            f"{GOOD[0]} 1 0 0 1",
            f"{GOOD[1]} 0 1 0 0",
            "img/empty.jpg 1 0 0 0",
            f"{GOOD[2]} 1 0 1",
            f"{GOOD[3]} 0 0 2 1",
        ],
        "query": [f"{GOOD[4]} 0 0 1 0", "img/text.jpg 0 1 0 0", f"{GOOD[5]} 0 0 0 0", "", "../outside.jpg 1 0 0 0"],
        "database": [
            f"{GOOD[0]} 1 0 0 1",
            f"./{GOOD[1]} 0 1 0 0",
            f"{GOOD[6]} 0 1 1 0",
            f"{GOOD[6]} 0 1 1 0",
            "img/truncated.jpg 0 0 0 1",
            "img/big.png 0 1 0 0",
            "img/missing.jpg 1 0 0 0",
            "/etc/passwd 1 0 0 0",
        ],
    }
    paths = {}
    for split, lines in lists.items():
        paths[split] = str(root / f"{split}.txt")
        Path(paths[split]).write_text("\n".join(lines) + "\n")
    return paths


def test_txtlist_writes_good_rows_and_rejects_each_bad_one(ray_session, image_root, tmp_path):
    lists = write_lists(image_root)
    out = tmp_path / "ds"
    cfg = IngestConfig(
        source="txtlist",
        out=str(out),
        max_pixels=MAX_PIXELS,
        rows_per_file=3,
        **{f"{split}_list": path for split, path in lists.items()},
    )
    summary = run(cfg)

    assert summary["read"] == 17 == summary["written"] + summary["rejected"]
    assert read_rejects(out) == {
        f"{lists['train']}:3": "empty_file",
        f"{lists['train']}:4": "label_width",
        f"{lists['train']}:5": "label_value",
        f"{lists['query']}:2": "not_an_image",
        f"{lists['query']}:3": "no_label",
        f"{lists['query']}:5": "path_outside_root",
        f"{lists['database']}:4": "duplicate_id",
        f"{lists['database']}:5": "truncated_image",
        f"{lists['database']}:6": "too_many_pixels",
        f"{lists['database']}:7": "missing_file",
        f"{lists['database']}:8": "path_outside_root",
    }
    train, query, database = (read_split(out, split) for split in ("train", "query", "database"))
    assert {k: v[1] for k, v in train.items()} == {GOOD[0]: [0, 3], GOOD[1]: [1]}
    assert {k: v[1] for k, v in query.items()} == {GOOD[4]: [2]}
    assert {k: v[1] for k, v in database.items()} == {GOOD[0]: [0, 3], GOOD[1]: [1], GOOD[6]: [1, 2]}
    assert database[GOOD[6]][0] == (image_root / GOOD[6]).read_bytes()  # stored as read, never re-encoded
    info = DatasetDir.open(str(out)).info
    assert info["classes"] == ["class_0", "class_1", "class_2", "class_3"]
    assert info["splits"] == summary["splits"] == {"train": 2, "query": 1, "database": 3}


def test_coco_labels_are_the_categories_present(ray_session, image_root, tmp_path):
    images = [*GOOD[:6], "img/empty.jpg", "img/missing.jpg", GOOD[0], "../outside.jpg", GOOD[7], GOOD[6]]
    boxes = {
        0: [7, 3],
        1: [1],
        2: [3, 3],
        3: [7],
        4: [1, 3, 7],
        5: [3],
        6: [1],
        7: [1],
        8: [1],
        9: [1],
        10: [],
        11: [99],
    }
    payload = {
        "categories": [{"id": 7, "name": "zebra"}, {"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}],
        "images": [{"id": 100 + i, "file_name": name} for i, name in enumerate(images)] + [{"id": 1}],
        "annotations": [{"image_id": 100 + i, "category_id": c} for i, cs in boxes.items() for c in cs],
    }
    annotations = image_root / "instances_test.json"
    annotations.write_text(json.dumps(payload))
    out = tmp_path / "coco"
    summary = run(IngestConfig(source="coco", out=str(out), annotations=str(annotations), query=2, train=3, seed=5))

    where = f"{annotations}: images"
    assert read_rejects(out) == {
        f"{where}[6]": "empty_file",
        f"{where}[7]": "missing_file",
        f"{where}[8]": "duplicate_id",
        f"{where}[9]": "path_outside_root",
        f"{where}[10]": "no_label",
        f"{where}[11]": "unknown_label",
        f"{where}[12]": "malformed_row",
    }
    query, database, train = (read_split(out, split) for split in ("query", "database", "train"))
    # 8 rows pass the parser: 2 become queries, 6 database rows of which 3 train; the
    # empty and the missing file are rejected later, from whichever split drew them.
    assert drawn(out, summary) == {"train": 3, "query": 2, "database": 6}
    assert set(query).isdisjoint(database) and set(train) <= set(database)
    assert set(query) | set(database) == set(GOOD[:6])
    # cat (id 1) -> 0, dog (id 3) -> 1, zebra (id 7) -> 2
    expected = {GOOD[0]: [1, 2], GOOD[1]: [0], GOOD[2]: [1], GOOD[3]: [2], GOOD[4]: [0, 1, 2], GOOD[5]: [1]}
    assert {k: v[1] for k, v in {**query, **database}.items()} == expected
    assert DatasetDir.open(str(out)).info["classes"] == ["cat", "dog", "zebra"]  # ordered by category id
    assert summary["read"] == 13 == summary["written"] + summary["rejected"]


def test_folder_csv_with_a_classes_file(ray_session, image_root, tmp_path):
    rows = [f"{GOOD[i]},{labels}" for i, labels in enumerate(["cat|dog", "dog", "bird", "cat", "cat|bird|dog"])]
    rows += ["img/text.jpg,cat", f"{GOOD[5]},", f"{GOOD[6]},cat|unicorn", f"{GOOD[7]},dog,extra", "img/big.png,dog"]
    csv_file = image_root / "labels.csv"
    csv_file.write_text("path,labels\n" + "\n".join(rows) + "\n")
    classes = image_root / "classes.txt"
    classes.write_text("dog\ncat\nbird\nfish\n")
    out = tmp_path / "folder"
    summary = run(
        IngestConfig(
            source="folder",
            out=str(out),
            csv=str(csv_file),
            classes_file=str(classes),
            root=str(image_root),
            query=1,
            train=4,
            max_pixels=MAX_PIXELS,
        )
    )

    assert read_rejects(out) == {
        f"{csv_file}:7": "not_an_image",
        f"{csv_file}:8": "no_label",
        f"{csv_file}:9": "unknown_label",
        f"{csv_file}:10": "malformed_row",
        f"{csv_file}:11": "too_many_pixels",
    }
    everything = {**read_split(out, "query"), **read_split(out, "database")}
    assert {k: v[1] for k, v in everything.items()} == {
        GOOD[0]: [0, 1],
        GOOD[1]: [0],
        GOOD[2]: [2],
        GOOD[3]: [1],
        GOOD[4]: [0, 1, 2],
    }
    assert drawn(out, summary) == {"train": 4, "query": 1, "database": 6}
    assert DatasetDir.open(str(out)).info["classes"] == ["dog", "cat", "bird", "fish"]


def test_strict_stops_at_the_first_bad_row_and_leaves_no_dataset_json(ray_session, image_root, tmp_path):
    lists = write_lists(image_root)
    with pytest.raises(HashrayError, match=rf"{lists['train']}:4: label_width"):
        run(IngestConfig(source="txtlist", out=str(tmp_path / "a"), train_list=lists["train"], strict=True))
    assert not (tmp_path / "a").exists()
    good_labels = image_root / "strict.txt"
    good_labels.write_text(f"{GOOD[0]} 1 0\nimg/truncated.jpg 0 1\n")
    with pytest.raises(HashrayError, match=f"{good_labels}:2: truncated_image"):
        run(IngestConfig(source="txtlist", out=str(tmp_path / "b"), database_list=str(good_labels), strict=True))
    assert (tmp_path / "b" / "rejects.jsonl").exists() and not (tmp_path / "b" / "dataset.json").exists()


def test_synthetic_is_deterministic_and_train_is_a_subset_of_database(tiny_dataset, tmp_path):
    again = tmp_path / "again"
    run(
        IngestConfig(
            source="synthetic",
            out=str(again),
            train=96,
            query=24,
            database=128,
            image_size=32,
            num_classes=6,
            seed=0,
            rows_per_file=64,
        )
    )
    files = sorted(p.relative_to(tiny_dataset) for p in Path(tiny_dataset).rglob("*.parquet"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.parquet")) and len(files) > 3
    assert all((Path(tiny_dataset) / f).read_bytes() == (again / f).read_bytes() for f in files)

    train, query, database = (read_split(tiny_dataset, split) for split in ("train", "query", "database"))
    assert (len(train), len(query), len(database)) == (96, 24, 128)
    assert all(database[i] == row for i, row in train.items())  # same id, same image, same labels
    assert set(query).isdisjoint(database)
    info = DatasetDir.open(tiny_dataset).info
    assert len(info["classes"]) == 6 and info["splits"] == {"train": 96, "query": 24, "database": 128}
    assert (Path(tiny_dataset) / "rejects.jsonl").read_text() == ""


def test_same_seed_and_source_date_epoch_give_a_byte_identical_dataset_dir(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    dirs = [tmp_path / name for name in ("one", "two")]
    for out in dirs:
        run(
            IngestConfig(
                source="synthetic", out=str(out), train=8, query=4, database=16, image_size=32, num_classes=4, seed=3
            )
        )
    files = sorted(str(p.relative_to(dirs[0])) for p in dirs[0].rglob("*") if p.is_file())
    assert "dataset.json" in files and len(files) > 4
    assert files == sorted(str(p.relative_to(dirs[1])) for p in dirs[1].rglob("*") if p.is_file())
    assert all((dirs[0] / f).read_bytes() == (dirs[1] / f).read_bytes() for f in files)
    assert DatasetDir.open(str(dirs[0])).info["created"] == "2023-11-14T22:13:20+00:00"

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(HashrayError, match="SOURCE_DATE_EPOCH='yesterday'"):
        run(
            IngestConfig(
                source="synthetic",
                out=str(tmp_path / "three"),
                train=8,
                query=4,
                database=16,
                image_size=32,
                num_classes=4,
            )
        )


def test_reingest_replaces_a_dataset_but_never_a_foreign_dir(ray_session, image_root, tmp_path):
    lists = write_lists(image_root)
    out = tmp_path / "ds"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(HashrayError, match="not part of a hashray dataset"):
        run(IngestConfig(source="txtlist", out=str(out), query_list=lists["query"]))
    (out / "notes.txt").unlink()
    (out / "database").mkdir()
    (out / "database" / "part-stale.parquet").write_bytes(b"old")
    summary = run(IngestConfig(source="txtlist", out=str(out), query_list=lists["query"]))
    assert not (out / "database").exists() and summary["splits"]["query"] == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["txtlist", "--train", "{tmp}/nope.txt"], "nope.txt: file not found"),
        (["coco", "--annotations", "{tmp}/bad.json", "--query", "1"], "not valid JSON"),
        (["folder", "--csv", "{tmp}/bad.json", "--query", "1"], "header must name the columns path,labels"),
        (["synthetic", "--image-size", "8"], "--image-size must be between 16 and 1024"),
    ],
)
def test_cli_reports_unusable_sources_in_one_line_with_exit_code_2(ray_session, tmp_path, capsys, argv, message):
    (tmp_path / "bad.json").write_text("{not json")
    argv = ["ingest", *[a.format(tmp=tmp_path) for a in argv], "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_source_whose_every_row_is_bad_writes_an_empty_dataset(ray_session, image_root, tmp_path):
    lists = image_root / "all_bad.txt"
    lists.write_text("../a.jpg 1 0\nimg/b.jpg 0 0\n")
    summary = run(IngestConfig(source="txtlist", out=str(tmp_path / "ds"), database_list=str(lists)))
    assert (summary["read"], summary["written"], summary["rejected_by_reason"]) == (
        2,
        0,
        {"no_label": 1, "path_outside_root": 1},
    )
    assert DatasetDir.open(str(tmp_path / "ds")).info["splits"] == {"train": 0, "query": 0, "database": 0}
