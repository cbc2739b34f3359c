"""The synthetic data set generator: deterministic, multi-label, long-tailed, decodable."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from models.errors import HashrayError
from pipelines import synthetic
from pipelines.synthetic import synthetic_classes, synthetic_example

DRAW = {"seed": 3, "image_size": 32, "num_classes": 8}


def test_same_arguments_give_same_bytes_and_train_is_database():
    first = synthetic_example(5, split="database", **DRAW)
    assert synthetic_example(5, split="database", **DRAW) == first
    assert synthetic_example(5, split="train", **DRAW) == first
    assert synthetic_example(5, split="query", **DRAW) != first
    assert synthetic_example(6, split="database", **DRAW) != first
    assert synthetic_example(5, split="database", **{**DRAW, "seed": 4}) != first


def test_image_is_an_rgb_jpeg_of_the_requested_size_with_valid_labels():
    for index in range(20):
        data, labels = synthetic_example(index, split="query", **DRAW)
        image = Image.open(io.BytesIO(data))
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (32, 32))
        assert labels == sorted(set(labels)) and 1 <= len(labels) <= 5
        assert all(0 <= c < DRAW["num_classes"] for c in labels)


def test_images_are_multi_label_and_long_tailed():
    label_sets = [synthetic_example(i, split="database", seed=0, image_size=16, num_classes=10)[1] for i in range(600)]
    counts = Counter(c for labels in label_sets for c in labels)
    sizes = Counter(len(labels) for labels in label_sets)
    assert set(counts) == set(range(10))  # every class occurs
    assert counts[0] > 4 * counts[9]  # the head class is far more frequent than the tail
    assert sizes[1] < len(label_sets) / 2 and max(sizes) >= 4  # most images hold several classes


def test_classes_are_distinct_combinations_that_share_attributes():
    names = synthetic_classes(synthetic.MAX_CLASSES)
    assert len(set(names)) == synthetic.MAX_CLASSES
    first = [name.split("-") for name in synthetic_classes(20)]
    colours, shapes, textures = (set(parts) for parts in zip(*first))
    # Every cue is shared by several classes: none identifies a class on its own.
    assert (len(colours), len(shapes), len(textures)) == (8, 8, 4)
    assert synthetic_classes(20) == names[:20]


def test_an_object_hidden_by_later_ones_loses_its_label():
    owner = np.full((10, 10), -1)
    owner[:, :5] = 1  # object 1 covers the left half ...
    owner[0, 0] = 0  # ... and leaves one pixel of object 0 (area 50) visible
    assert synthetic._visible_labels(owner, np.array([4, 2]), [50, 50]) == [2]
    owner[:4, :] = 0  # now 40 of object 0's 50 pixels show
    assert synthetic._visible_labels(owner, np.array([4, 2]), [50, 50]) == [2, 4]


@pytest.mark.parametrize(
    "kwargs", [{"split": "validation"}, {"num_classes": 1}, {"num_classes": synthetic.MAX_CLASSES + 1}]
)
def test_bad_arguments_raise_a_user_error(kwargs):
    with pytest.raises(HashrayError):
        synthetic_example(0, **{"split": "query", **DRAW, **kwargs})
