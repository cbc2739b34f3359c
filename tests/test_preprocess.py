"""Decoding guards, the Preprocessor worker on plain dicts, and the Ray Data split pipeline."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from contracts.dataset import DatasetDir
from models.errors import HashrayError
from models.network import IMAGENET_MEAN, IMAGENET_STD
from models.transforms import BadImage, decode_image, normalise
from pipelines import preprocess
from pipelines.preprocess import PreprocessConfig, Preprocessor, preprocess_split, read_piece, split_pieces
from pipelines.synthetic import synthetic_example


def encoded(size: tuple[int, int], colour=(200, 30, 90), fmt: str = "PNG", mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def jpeg(index: int = 0) -> bytes:
    return synthetic_example(index, split="query", seed=0, image_size=48, num_classes=5)[0]


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty_file"),
        (b"id,labels\nnot an image\n", "not_an_image"),
        (jpeg()[: len(jpeg()) // 2], "truncated_image"),
        (encoded((300, 200)), "too_many_pixels"),  # 60000 pixels > the limit below
    ],
)
def test_decode_rejects_bad_bytes_with_a_reason(data, reason):
    with pytest.raises(BadImage) as caught:
        decode_image(data, max_pixels=50_000)
    assert caught.value.reason == reason


def test_decode_refuses_a_decompression_bomb_before_decoding():
    bomb = encoded((20_000, 20_000), colour=0, mode="1")  # 400 megapixels in a few KB
    assert len(bomb) < 200_000
    with pytest.raises(BadImage) as caught:
        decode_image(bomb)
    assert caught.value.reason == "too_many_pixels"


def test_decode_gives_rgb_for_any_mode():
    image = decode_image(encoded((7, 5), colour=128, mode="L"))
    assert (image.mode, image.size) == ("RGB", (7, 5))


def batch(images: list[bytes], labels: list[list[int]]) -> dict[str, np.ndarray]:
    return {
        "id": np.array([f"row-{i}" for i in range(len(images))]),
        "image": np.array(images, dtype=object),
        "labels": np.array([np.array(row, dtype=np.int32) for row in labels] + [None], dtype=object)[:-1],
    }


def test_eval_preprocessing_keeps_uint8_pixels_and_multi_hots():
    colour = (200, 30, 90)
    out = Preprocessor(PreprocessConfig(image_size=16), num_classes=4)(
        batch([encoded((40, 30), colour), jpeg()], [[0, 3], [2]])
    )
    assert out["image"].shape == (2, 3, 16, 16) and out["image"].dtype == np.uint8
    np.testing.assert_array_equal(
        out["image"][0], np.broadcast_to(np.array(colour, dtype=np.uint8)[:, None, None], (3, 16, 16))
    )
    normalised = normalise(torch.from_numpy(out["image"]), IMAGENET_MEAN, IMAGENET_STD)
    expected = (np.array(colour) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(normalised[0].mean(dim=(1, 2)).numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(out["labels"], [[1, 0, 0, 1], [0, 0, 1, 0]])
    assert list(out["id"]) == ["row-0", "row-1"] and list(out["error"]) == ["", ""]


def test_a_bad_row_gets_a_black_image_and_its_error_without_failing_the_batch():
    out = Preprocessor(PreprocessConfig(image_size=16), num_classes=3)(batch([jpeg(), b"\x00garbage"], [[1], [2]]))
    assert out["error"][0] == "" and "not_an_image" in out["error"][1]
    assert not out["image"][1].any() and out["image"][0].any()
    np.testing.assert_array_equal(out["labels"][1], [0, 0, 1])


def test_train_augmentation_is_seeded_and_leaves_the_global_rng_alone():
    rows = batch([jpeg(i) for i in range(6)], [[0]] * 6)
    config = PreprocessConfig(image_size=24, train=True)
    state = torch.get_rng_state()
    first = Preprocessor(config, num_classes=2, seed=7)(rows)["image"]
    again = Preprocessor(config, num_classes=2, seed=7)(rows)["image"]
    other = Preprocessor(config, num_classes=2, seed=8)(rows)["image"]
    assert torch.equal(state, torch.get_rng_state())
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    evaluated = Preprocessor(PreprocessConfig(image_size=24), num_classes=2)(rows)["image"]
    assert not np.array_equal(first, evaluated)


def test_labels_beyond_num_classes_are_a_user_error():
    with pytest.raises(HashrayError, match="num_classes"):
        Preprocessor(PreprocessConfig(image_size=16), num_classes=2)(batch([jpeg()], [[0, 5]]))


def test_preprocess_split_feeds_iter_torch_batches(tiny_dataset):
    opened = DatasetDir.open(tiny_dataset)
    info = opened.info
    dataset = preprocess_split(opened, "query", PreprocessConfig(image_size=32), batch_size=8)
    images, labels = [], []
    for tensors in dataset.select_columns(["image", "labels"]).iter_torch_batches(batch_size=10):
        images.append(tensors["image"])
        labels.append(tensors["labels"])
    images, labels = torch.cat(images), torch.cat(labels)
    assert images.shape == (info["splits"]["query"], 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (info["splits"]["query"], len(info["classes"])) and labels.dtype == torch.float32
    assert (labels.sum(dim=1) >= 1).all() and images.float().std() > 20


def test_pieces_cover_every_row_once_in_order_and_evenly(tmp_path):
    """Files of 4 row groups (3 + 3 + 3 + 1 rows) cut into more and fewer pieces than there are files or row groups."""
    files, ids = [], []
    for part in range(3):
        part_ids = [f"r{part}-{i}" for i in range(10)]
        table = pa.table(
            {"id": part_ids, "image": [jpeg(i) for i in range(10)], "labels": [[i % 3] for i in range(10)]}
        )
        files.append(str(tmp_path / f"part-{part}.parquet"))
        pq.write_table(table, files[-1], row_group_size=3)
        ids += part_ids
    for pieces in (1, 2, 3, 4, 5, 12, 20):
        per_piece = [
            [row_id for _, rows in read_piece(piece, batch_size=2) for row_id in rows["id"]]
            for piece in split_pieces(files, pieces)
        ]
        assert [row_id for piece in per_piece for row_id in piece] == ids, pieces
        if pieces <= 12:  # no more pieces than row groups: the rows differ by one row group at most
            sizes = [len(piece) for piece in per_piece]
            assert max(sizes) - min(sizes) <= 3, (pieces, sizes)


def test_preprocess_split_keeps_or_drops_rows_that_do_not_decode(tiny_dataset, tmp_path, monkeypatch):
    """A split of 3 files (7 row groups) with one bad row, read in 2 pieces that span files, then in 8 pieces."""
    import shutil

    data = tmp_path / "ds"
    shutil.copytree(tiny_dataset, data)
    files = sorted((data / "query").glob("*.parquet"))
    table = pa.concat_tables(pq.read_table(f) for f in files)
    for f in files:
        f.unlink()
    images = table.column("image").to_pylist()
    images[5] = b"GIF89a but truncated"
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    for part, start in enumerate(range(0, table.num_rows, 10)):
        pq.write_table(table.slice(start, 10), data / "query" / f"part-{part:03d}.parquet", row_group_size=4)
    opened = DatasetDir.open(str(data))  # after the rewrite: the files are listed at open

    kept = preprocess_split(opened, "query", PreprocessConfig(image_size=32), batch_size=3, max_workers=2)
    kept.context.execution_options.preserve_order = True
    rows = kept.take_all()
    assert [row["id"] for row in rows] == table.column("id").to_pylist()
    assert [bool(row["error"]) for row in rows] == [i == 5 for i in range(table.num_rows)]

    monkeypatch.setattr(preprocess, "MAX_PIECE_ROWS", 3)  # 24 rows, 2 workers -> 8 pieces, more than row groups
    dropped = preprocess_split(opened, "query", PreprocessConfig(image_size=32), batch_size=3, keep_errors=False)
    batches = list(dropped.iter_torch_batches(batch_size=8))
    assert all(set(batch) == {"image", "labels"} for batch in batches)
    assert sum(len(batch["image"]) for batch in batches) == table.num_rows - 1
