"""The built-in synthetic multi-label data set: procedurally drawn RGB images.

Each class is an object kind = shape x colour x texture (``"red-star-striped"``).
Classes share shapes, colours and textures with other classes, so a model has to
combine cues rather than look up a single one. An image holds 1-5 objects at a
random position, scale and rotation over a cluttered background; later objects
may hide earlier ones, and an object keeps its label only while enough of it
stays visible. Class frequencies are long-tailed: the last class is drawn 10x
less often than the first, as in real multi-label data sets.

Everything here is a pure function of ``(seed, split, index)`` -- no Ray, no
global state -- so ingest can draw rows in parallel and the same seed always
gives the same bytes. The ``train`` split draws from the ``database`` stream:
train row ``i`` is database row ``i`` (same id, same image), the usual protocol
of the deep-hashing literature where the training set is sampled from the
retrieval database and the queries are held out.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

from models.errors import HashrayError

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "ring")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 210, 40),
    "magenta": (205, 50, 205),
    "cyan": (40, 205, 215),
    "orange": (245, 135, 30),
    "white": (240, 240, 240),
}
TEXTURES = ("solid", "striped", "dotted", "checkered")
MAX_CLASSES = len(SHAPES) * len(COLOURS) * len(TEXTURES)
# Query rows are held out; train rows are drawn from the database stream.
STREAMS = {"database": 0, "train": 0, "query": 1}
STREAM_PREFIX = {"database": "database", "train": "database", "query": "query"}
OBJECT_COUNT_P = (0.25, 0.30, 0.22, 0.14, 0.09)  # 1..5 objects per image
RAREST_FREQUENCY = 0.1  # the last class is drawn 10x less often than the first
MIN_VISIBLE = 0.35  # fraction of an object that must stay visible to keep its label
SUPERSAMPLE = 2  # draw at 2x and downsample: smooth edges at small image sizes
JPEG_QUALITY = 90


def _class_attributes(class_index: int) -> tuple[str, str, str]:
    """Class ``c = s + 8k + 64m`` -> (shape s, colour (3s+k) mod 8, texture (s+k+m) mod 4).

    A bijection onto all combinations in which neighbouring classes differ in
    every attribute and the first few classes already use every shape, colour
    and texture: no single cue identifies a class.
    """
    shape_index, rest = class_index % len(SHAPES), class_index // len(SHAPES)
    k, m = rest % len(COLOURS), rest // len(COLOURS)
    colour = list(COLOURS)[(3 * shape_index + k) % len(COLOURS)]
    return SHAPES[shape_index], colour, TEXTURES[(shape_index + k + m) % len(TEXTURES)]


def check_num_classes(num_classes: int) -> int:
    if not 2 <= num_classes <= MAX_CLASSES:
        raise HashrayError(f"--num-classes must be between 2 and {MAX_CLASSES}, got {num_classes}")
    return num_classes


def synthetic_classes(num_classes: int) -> list[str]:
    """Class names ``colour-shape-texture``, the same for every seed."""
    check_num_classes(num_classes)
    return ["{1}-{0}-{2}".format(*_class_attributes(c)) for c in range(num_classes)]


def class_frequencies(num_classes: int) -> np.ndarray:
    """Relative frequency of each class: geometric decay from 1 down to 1/10."""
    return RAREST_FREQUENCY ** (np.arange(num_classes) / max(num_classes - 1, 1))


def synthetic_id(index: int, split: str) -> str:
    """The id of row ``index`` of a split (train ids are database ids)."""
    return f"{STREAM_PREFIX[split]}-{index:08d}"


def synthetic_example(
    index: int, *, split: str, seed: int, image_size: int, num_classes: int
) -> tuple[bytes, list[int]]:
    """Draw one image (JPEG bytes) and its sorted class indices.

    A pure function of its arguments: ``split="train"`` and ``split="database"``
    give the same example for the same index.
    """
    if split not in STREAMS:
        raise HashrayError(f"unknown split {split!r}; choose one of {', '.join(STREAMS)}")
    check_num_classes(num_classes)
    rng = np.random.default_rng([seed, STREAMS[split], index])
    size = image_size * SUPERSAMPLE
    pixels = _background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int16)
    frequencies = class_frequencies(num_classes)
    count = rng.choice(len(OBJECT_COUNT_P), p=OBJECT_COUNT_P) + 1
    classes = rng.choice(num_classes, size=count, p=frequencies / frequencies.sum())
    areas = [_draw_object(pixels, owner, rng, int(c), slot) for slot, c in enumerate(classes)]
    canvas = Image.fromarray(pixels, "RGB")
    # A few strokes over the objects: partial occlusion that does not remove labels.
    _draw_clutter(ImageDraw.Draw(canvas), rng, size, count=int(rng.integers(1, 4)))
    labels = _visible_labels(owner, classes, areas)
    buffer = io.BytesIO()
    canvas.resize((image_size, image_size), Image.Resampling.BOX).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue(), labels


def _visible_labels(owner: np.ndarray, classes: np.ndarray, areas: list[int]) -> list[int]:
    """Classes of the objects that stay visible enough after occlusion."""
    visible = np.bincount(owner[owner >= 0].ravel(), minlength=len(classes))
    fractions = visible / np.maximum(areas, 1)
    kept = {int(classes[i]) for i in range(len(classes)) if fractions[i] >= MIN_VISIBLE}
    # The last object is drawn on top, so this only triggers for a tiny object at the border.
    return sorted(kept or {int(classes[int(np.argmax(fractions))])})


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted gradient with noise and thin random strokes: clutter, not objects."""
    start, end = rng.integers(30, 150, size=(2, 3)).astype(np.float32)
    direction = rng.uniform(0, 2 * math.pi)
    ys, xs = np.ogrid[0:size, 0:size]
    t = ((math.cos(direction) * xs + math.sin(direction) * ys) / (2 * size) + 0.5).astype(np.float32)
    pixels = rng.standard_normal((size, size, 3), dtype=np.float32)
    pixels *= 10
    pixels += start + t[..., None] * (end - start)
    image = Image.fromarray(np.clip(pixels, 0, 255, out=pixels).astype(np.uint8), "RGB")
    _draw_clutter(ImageDraw.Draw(image), rng, size, count=int(rng.integers(6, 14)))
    return np.array(image)


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, *, count: int) -> None:
    for _ in range(count):
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, size, size=4))
        if rng.random() < 0.6:
            draw.line((x0, y0, x1, y1), fill=colour, width=SUPERSAMPLE)
        else:
            box = (x0, y0, x0 + size / 8, y0 + size / 8)
            draw.arc(
                box, start=float(rng.uniform(0, 360)), end=float(rng.uniform(0, 360)), fill=colour, width=SUPERSAMPLE
            )


def _draw_object(pixels: np.ndarray, owner: np.ndarray, rng: np.random.Generator, class_index: int, slot: int) -> int:
    """Paint one textured object into ``pixels`` (in place); return its area in pixels."""
    shape, colour, texture = _class_attributes(class_index)
    size = pixels.shape[0]
    radius = rng.uniform(0.11, 0.21) * size
    centre = rng.uniform(0.1 * size, 0.9 * size, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    base = np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 21, size=3), 0, 255)
    mask_image = _shape_mask(shape, size, centre, radius, angle)
    bbox = mask_image.getbbox()
    if bbox is None:
        return 0
    left, top, right, bottom = bbox
    mask = np.asarray(mask_image.crop(bbox)) > 127
    fill = _texture(texture, (left, top, right, bottom), centre, radius, angle, base)
    pixels[top:bottom, left:right][mask] = fill[mask]
    owner[top:bottom, left:right][mask] = slot
    return int(mask.sum())


def _shape_mask(shape: str, size: int, centre: np.ndarray, radius: float, angle: float) -> Image.Image:
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    cx, cy = (float(v) for v in centre)
    if shape in ("circle", "ring"):
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
        if shape == "ring":
            inner = radius * 0.5
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    else:
        unit = _UNIT_POLYGONS[shape]
        cos, sin = math.cos(angle), math.sin(angle)
        draw.polygon(
            [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in unit], fill=255
        )
    return image


def _regular(sides: int, start: float = 0.0) -> list[tuple[float, float]]:
    return [
        (math.cos(start + 2 * math.pi * k / sides), math.sin(start + 2 * math.pi * k / sides)) for k in range(sides)
    ]


def _star() -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        r = 1.0 if k % 2 == 0 else 0.45
        points.append((r * math.cos(math.pi * k / 5), r * math.sin(math.pi * k / 5)))
    return points


_CROSS = [
    (-0.3, -1),
    (0.3, -1),
    (0.3, -0.3),
    (1, -0.3),
    (1, 0.3),
    (0.3, 0.3),
    (0.3, 1),
    (-0.3, 1),
    (-0.3, 0.3),
    (-1, 0.3),
    (-1, -0.3),
    (-0.3, -0.3),
]
_UNIT_POLYGONS = {
    "square": _regular(4, math.pi / 4),
    "triangle": _regular(3, -math.pi / 2),
    "star": _star(),
    "cross": _CROSS,
    "diamond": [(0, -1), (0.6, 0), (0, 1), (-0.6, 0)],
    "hexagon": _regular(6),
}


def _texture(
    texture: str, box: tuple[int, int, int, int], centre: np.ndarray, radius: float, angle: float, base: np.ndarray
) -> np.ndarray:
    """The fill of ``box`` (left, top, right, bottom): ``base`` with a pattern that turns with the object."""
    left, top, right, bottom = box
    ys, xs = np.mgrid[top:bottom, left:right].astype(np.float32)
    dx, dy = xs - centre[0], ys - centre[1]
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    period = max(radius / 2.5, 3.0)
    if texture == "striped":
        pattern = np.floor(u / period) % 2 == 1
    elif texture == "checkered":
        pattern = (np.floor(u / period) + np.floor(v / period)) % 2 == 1
    elif texture == "dotted":
        pattern = ((u % period) - period / 2) ** 2 + ((v % period) - period / 2) ** 2 < (period / 3.2) ** 2
    else:
        pattern = np.zeros(u.shape, dtype=bool)
    fill = np.empty((*u.shape, 3), dtype=np.uint8)
    fill[:] = base.astype(np.uint8)
    fill[pattern] = (base * 0.3).astype(np.uint8)
    return fill
