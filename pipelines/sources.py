"""Parsers for the file sources of ``hashray ingest``: list files in, candidate rows out.

A parser reads only the small metadata files (list files, COCO JSON, CSV) on the
driver; the images themselves are read and checked later in Ray Data workers.
Every line or record becomes exactly one :class:`SourceRow`, good or bad: a row
the parser already knows is bad (label of the wrong width, a path that leaves
``--root``, a duplicate id, ...) carries its ``reason`` and is never sent to the
workers, so rows read = rows written + rows rejected holds from the start.

Reason codes found here: ``malformed_row``, ``label_width``, ``label_value``,
``no_label``, ``unknown_label``, ``path_outside_root``, ``duplicate_id``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import posixpath
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from contracts.fs import read_bytes, read_json
from models.errors import HashrayError


@dataclass(frozen=True)
class SourceRow:
    """One line/record of a source, with where it came from for error messages.

    ``path`` is relative to the source root; ``splits`` are the splits the row
    is written to (a training row that is also in the database is read once
    and written to both).
    """

    seq: int
    id: str
    path: str
    labels: tuple[int, ...]
    splits: tuple[str, ...]
    where: str
    reason: str = ""
    detail: str = ""


@dataclass(frozen=True)
class Source:
    """A parsed source: its class names and every row, in source order."""

    classes: list[str]
    rows: list[SourceRow]


def read_text(uri: str, what: str) -> str:
    """A whole text file, or a one-line error naming the flag that pointed at it."""
    try:
        return read_bytes(uri).decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise HashrayError(f"{what} {uri} is not a UTF-8 text file ({error.reason} at byte {error.start})") from error


def read_classes(uri: str) -> list[str]:
    """A classes file: one class name per line, blank lines ignored, no duplicates."""
    names = [line.strip() for line in read_text(uri, "--classes").splitlines() if line.strip()]
    if not names:
        raise HashrayError(f"--classes {uri} holds no class names (expected one name per line)")
    repeated = sorted(name for name, n in Counter(names).items() if n > 1)
    if repeated:
        raise HashrayError(f"--classes {uri}: class names must be unique, repeated: {', '.join(repeated[:5])}")
    return names


def clean_path(path: str) -> tuple[str, str]:
    """(normalised relative path, "") or ("", why) for a path that would leave the root."""
    normalised = posixpath.normpath(path.strip().replace("\\", "/"))
    if not path.strip():
        return "", "empty path"
    if posixpath.isabs(normalised) or normalised == ".." or normalised.startswith("../"):
        return "", f"{path!r} is not inside --root"
    return normalised, ""


def _reject(row: SourceRow, reason: str, detail: str) -> SourceRow:
    return dataclasses.replace(row, reason=reason, detail=detail)


def check_rows(rows: Iterable[SourceRow]) -> list[SourceRow]:
    """The checks every file source shares: path inside the root, a label, ids unique per split.

    The id of a row is its normalised relative path, so the same image listed
    in two splits keeps one id. The first row with an id wins; later ones are
    ``duplicate_id``.
    """
    seen: dict[tuple[str, str], str] = {}
    checked = []
    for row in rows:
        if not row.reason:
            row = _check_row(row, seen)
        checked.append(row)
    return checked


def _check_row(row: SourceRow, seen: dict[tuple[str, str], str]) -> SourceRow:
    path, why = clean_path(row.path)
    if why:
        return _reject(row, "path_outside_root", why)
    if not row.labels:
        return _reject(row, "no_label", "the row has no positive label")
    row = dataclasses.replace(row, id=path, path=path)
    # Rows not yet assigned to a split (coco, folder) must be unique in the whole source.
    keys = [(split, path) for split in row.splits or ("",)]
    first = next((seen[key] for key in keys if key in seen), None)
    if first is not None:
        return _reject(row, "duplicate_id", f"id {path!r} already read at {first}")
    seen.update({key: row.where for key in keys})
    return row


# ---------------------------------------------------------------- txtlist


def read_txtlist(lists: dict[str, str], classes_file: str | None = None) -> Source:
    """The list format of the deep-hashing literature: ``path 0 1 0 ... 1`` per line.

    ``lists`` maps split -> list file. Without a classes file, the label width
    is the most common width among all lines and classes are ``class_0...``.
    """
    if not lists:
        raise HashrayError("txtlist needs at least one of --train, --query, --database (list files)")
    lines = [
        (split, uri, number, line.split()) for split, uri in lists.items() for number, line in _numbered_lines(uri)
    ]
    if not lines:
        raise HashrayError(f"the list files {', '.join(lists.values())} hold no rows")
    classes = read_classes(classes_file) if classes_file else _numbered_classes(lines)
    rows = [
        _txtlist_row(seq, split, f"{uri}:{number}", tokens, len(classes))
        for seq, (split, uri, number, tokens) in enumerate(lines)
    ]
    return Source(classes=classes, rows=check_rows(rows))


def _numbered_lines(uri: str) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(read_text(uri, "list file").splitlines(), start=1):
        if line.strip():
            yield number, line


def _numbered_classes(lines: list[tuple[str, str, int, list[str]]]) -> list[str]:
    width = Counter(len(tokens) - 1 for *_, tokens in lines).most_common(1)[0][0]
    if width < 1:
        raise HashrayError("the list files hold paths but no label columns (expected `path 0 1 0 ... 1`)")
    return [f"class_{c}" for c in range(width)]


def _txtlist_row(seq: int, split: str, where: str, tokens: list[str], width: int) -> SourceRow:
    path, values = tokens[0], tokens[1:]
    row = SourceRow(seq=seq, id=path, path=path, labels=(), splits=(split,), where=where)
    if len(values) != width:
        return _reject(row, "label_width", f"{len(values)} label values, expected {width}")
    bad = [v for v in values if v not in ("0", "1")]
    if bad:
        return _reject(row, "label_value", f"label values must be 0 or 1, found {bad[0]!r}")
    return dataclasses.replace(row, labels=tuple(i for i, v in enumerate(values) if v == "1"))


# ---------------------------------------------------------------- coco


def read_coco(annotations: str, *, query: int, train: int, seed: int) -> Source:
    """COCO ``instances_*.json``: one row per image, labels = the categories present."""
    payload = read_json(annotations)
    try:
        categories = sorted(payload["categories"], key=lambda c: c["id"])
        index = {c["id"]: i for i, c in enumerate(categories)}
        classes = [str(c["name"]) for c in categories]
        images, boxes = list(payload["images"]), list(payload["annotations"])
    except (KeyError, TypeError) as error:
        raise HashrayError(
            f"--annotations {annotations} is not a COCO instances file (needs images, annotations and "
            f"categories with ids and names): missing {error}"
        ) from error
    present: dict[object, set[object]] = {}
    for box in boxes:
        if isinstance(box, dict) and _is_key(box.get("image_id")) and _is_key(box.get("category_id")):
            present.setdefault(box["image_id"], set()).add(box["category_id"])
    rows = [_coco_row(seq, image, present, index, annotations) for seq, image in enumerate(images)]
    return Source(classes=classes, rows=assign_splits(check_rows(rows), query=query, train=train, seed=seed))


def _coco_row(seq: int, image: object, present: dict, index: dict, annotations: str) -> SourceRow:
    file_name = image.get("file_name") if isinstance(image, dict) else None
    image_id = image.get("id") if isinstance(image, dict) else None
    where = f"{annotations}: images[{seq}]"
    row = SourceRow(seq=seq, id=str(file_name), path=str(file_name), labels=(), splits=(), where=where)
    if not isinstance(file_name, str) or not _is_key(image_id):
        return _reject(row, "malformed_row", "an image record needs an id and a file_name")
    categories = present.get(image_id, set())
    unknown = sorted(str(c) for c in categories if c not in index)
    if unknown:
        return _reject(row, "unknown_label", f"category id {unknown[0]} is not in categories")
    return dataclasses.replace(row, labels=tuple(sorted(index[c] for c in categories)))


def _is_key(value: object) -> bool:
    """COCO ids are integers (some exports use strings); anything else is a malformed record."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


# ---------------------------------------------------------------- folder


def read_folder(csv_uri: str, *, query: int, train: int, seed: int, classes_file: str | None = None) -> Source:
    """An image folder described by a CSV ``path,labels`` (labels are class names joined by ``|``).

    Without a classes file, the classes are the sorted names found in the CSV.
    """
    reader = csv.DictReader(io.StringIO(read_text(csv_uri, "--csv")))
    try:
        if not reader.fieldnames or not {"path", "labels"} <= set(reader.fieldnames):
            raise HashrayError(
                f"--csv {csv_uri}: the header must name the columns path,labels (found {reader.fieldnames})"
            )
        records = [(reader.line_num, record) for record in reader]
    except csv.Error as error:
        raise HashrayError(f"--csv {csv_uri}:{reader.line_num}: not a CSV file ({error})") from error
    names = [_label_names(record) for _, record in records]
    classes = read_classes(classes_file) if classes_file else sorted({n for row in names for n in row})
    index = {name: i for i, name in enumerate(classes)}
    rows = [
        _folder_row(seq, f"{csv_uri}:{line}", record, labels, index)
        for seq, ((line, record), labels) in enumerate(zip(records, names))
    ]
    return Source(classes=classes, rows=assign_splits(check_rows(rows), query=query, train=train, seed=seed))


def _label_names(record: dict) -> list[str]:
    labels = record.get("labels")
    return [n.strip() for n in labels.split("|") if n.strip()] if isinstance(labels, str) else []


def _folder_row(seq: int, where: str, record: dict, names: list[str], index: dict[str, int]) -> SourceRow:
    path = record.get("path")
    row = SourceRow(seq=seq, id=str(path), path=str(path or ""), labels=(), splits=(), where=where)
    if None in record or path is None or record.get("labels") is None:
        return _reject(row, "malformed_row", "expected exactly two fields: path,labels")
    unknown = [n for n in names if n not in index]
    if unknown:
        return _reject(row, "unknown_label", f"class {unknown[0]!r} is not in --classes")
    return dataclasses.replace(row, labels=tuple(sorted({index[n] for n in names})))


# ---------------------------------------------------------------- splits


def assign_splits(rows: list[SourceRow], *, query: int, train: int, seed: int) -> list[SourceRow]:
    """Hold out ``query`` random good rows; the rest are the database, and ``train`` of them train.

    The protocol of the deep-hashing literature (MS-COCO, NUS-WIDE): queries
    are never in the database, the training set is sampled from the database.
    Rows keep their source order; only the draw depends on ``seed``.
    """
    good = [i for i, row in enumerate(rows) if not row.reason]
    if len(good) < 2:
        raise HashrayError(f"the source has {len(good)} good rows; at least 2 are needed (a query and a database row)")
    if not 0 < query < len(good):
        raise HashrayError(
            f"--query must be between 1 and {len(good) - 1} (the source has {len(good)} good rows), got {query}"
        )
    if not 0 <= train <= len(good) - query:
        raise HashrayError(f"--train must be between 0 and {len(good) - query} (the database rows), got {train}")
    order = np.random.default_rng(seed).permutation(len(good))
    splits = {}
    for rank, position in enumerate(order):
        if rank < query:
            splits[good[position]] = ("query",)
        else:
            splits[good[position]] = ("train", "database") if rank - query < train else ("database",)
    return [dataclasses.replace(row, splits=splits[i]) if i in splits else row for i, row in enumerate(rows)]
