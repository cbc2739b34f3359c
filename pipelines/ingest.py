"""``hashray ingest``: raw images + labels -> a dataset dir of Parquet files (DESIGN.md).

A Ray Data job that streams: the driver parses only the small list files
(:mod:`pipelines.sources`) or nothing at all (synthetic); workers read, check
or draw the images block by block and write one Parquet file per block and
split. Bad rows are never written: each one is kept with its reason in
``rejects.jsonl`` and counted, so rows read = rows written + rows rejected.
``dataset.json`` is written last: a dir without it is incomplete.

File names come from the first source row of their block, not from Ray's
write ids, so the same input and seed give byte-identical Parquet files.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import posixpath
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data
from ray.data import Datasink
from ray.data.block import BlockAccessor

from models.errors import HashrayError
from models.transforms import MAX_PIXELS, BadImage, decode_image
from pipelines import sources, synthetic
from pipelines.contracts import (
    DATASET_JSON,
    DATASET_SCHEMA,
    REJECTS_JSONL,
    ROW_GROUP_ROWS,
    SPLITS,
    absolute,
    exists,
    join,
    now_iso,
    resolve,
    write_bytes,
    write_json,
)

logger = logging.getLogger(__name__)

SOURCES = ("synthetic", "txtlist", "coco", "folder")
SYNTHETIC_SIZES = {"train": 2000, "query": 200, "database": 4000}
DEFAULT_IMAGE_SIZE = 64
DEFAULT_NUM_CLASSES = 20
SOURCE_FILE_FLAGS = {
    "train_list": "--train",
    "query_list": "--query",
    "database_list": "--database",
    "classes_file": "--classes",
    "annotations": "--annotations",
    "csv": "--csv",
    "root": "--root",
}
# What a worker adds to a candidate row; an empty reason means the row is good.
CHECKED_COLUMNS = ("seq", "id", "image", "labels", "splits", "where", "reason", "detail")


@dataclass(frozen=True)
class IngestConfig:
    """One ingest job. Fields a source does not use are ignored.

    Args:
        source: ``synthetic``, ``txtlist``, ``coco`` or ``folder``.
        out: dataset dir to write (local path or ``pyarrow.fs`` URI).
        train, query, database: synthetic: rows per split (train ids are the
            first database ids). coco/folder: how many random good rows are
            held out as queries and how many database rows also train;
            ``database`` must be unset (every row that is not a query).
        image_size, num_classes: synthetic images and classes.
        root: folder the image paths are relative to (default: the folder of
            the list/annotation/CSV file).
        train_list, query_list, database_list: txtlist list files.
        classes_file: class names, one per line (txtlist, folder).
        annotations: COCO ``instances_*.json``.
        csv: folder source CSV with columns ``path,labels``.
        strict: fail on the first bad row instead of rejecting it.
        max_pixels: images with more pixels are rejected (decompression bombs).
        rows_per_file: rows per Ray Data block, hence per Parquet file.
        num_cpus: CPUs reserved by each ingest task.
    """

    source: str
    out: str
    seed: int = 0
    strict: bool = False
    name: str | None = None
    train: int | None = None
    query: int | None = None
    database: int | None = None
    image_size: int = DEFAULT_IMAGE_SIZE
    num_classes: int = DEFAULT_NUM_CLASSES
    root: str | None = None
    train_list: str | None = None
    query_list: str | None = None
    database_list: str | None = None
    classes_file: str | None = None
    annotations: str | None = None
    csv: str | None = None
    max_pixels: int = MAX_PIXELS
    rows_per_file: int = 1000
    num_cpus: float = 1.0


@dataclass(frozen=True)
class _Plan:
    """What the driver knows before any image is touched."""

    name: str
    classes: list[str]
    dataset: ray.data.Dataset | None  # candidate rows, checked or drawn lazily
    read: int  # source rows, good or bad
    rejected: list[dict[str, Any]]  # rows the parser already rejected


def run(cfg: IngestConfig) -> dict[str, Any]:
    """Ingest ``cfg.source`` into ``cfg.out``; return the summary.

    Returns:
        ``{"out", "read", "written", "rejected", "rejected_by_reason", "splits"}``
        where ``written`` counts distinct source rows written (a row in train
        and database counts once) and ``splits`` the rows of each split.

    Raises:
        HashrayError: bad configuration, a missing/unparseable source file,
            or any bad row under ``strict``.
    """
    check_config(cfg)
    created = now_iso()  # the start of the ingest; a bad SOURCE_DATE_EPOCH fails here, before any work
    cfg = dataclasses.replace(cfg, out=absolute(cfg.out), root=None if cfg.root is None else absolute(cfg.root))
    plan = _plan(cfg)
    if cfg.strict and plan.rejected:
        raise HashrayError(_strict_message(plan.rejected))
    clear_out(cfg.out)
    logger.info("ingest %s: %d source rows (%d rejected by the parser) -> %s", cfg.source, plan.read, len(plan.rejected), cfg.out)
    sink = _DatasetSink(cfg.out)
    if plan.dataset is not None:  # None when every row was already rejected by the parser
        plan.dataset.write_datasink(sink)
    rejected = sorted(plan.rejected + sink.rejects, key=lambda r: r["row"])
    write_bytes(join(cfg.out, REJECTS_JSONL), "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejected).encode())
    summary = _summary(cfg.out, plan.read, sink, rejected)
    if cfg.strict and rejected:
        raise HashrayError(_strict_message(rejected))
    write_json(
        join(cfg.out, DATASET_JSON),
        {"name": plan.name, "classes": plan.classes, "splits": summary["splits"], "created": created, "source": cfg.source},
    )
    return summary


def _summary(out: str, read: int, sink: "_DatasetSink", rejected: list[dict[str, Any]]) -> dict[str, Any]:
    summary = {
        "out": out,
        "read": read,
        "written": sink.rows,
        "rejected": len(rejected),
        "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "splits": {split: sink.written.get(split, 0) for split in SPLITS},
    }
    if read != sink.rows + len(rejected):  # a lost row is a bug here, never the user's fault
        raise RuntimeError(f"ingest lost rows: read {read}, written {sink.rows}, rejected {len(rejected)}")
    return summary


def _strict_message(rejected: list[dict[str, Any]]) -> str:
    first = rejected[0]
    return (
        f"{first['where']}: {first['reason']}: {first['detail']} (--strict; {len(rejected)} bad row(s) found so far, "
        "run without --strict to skip them and list them in rejects.jsonl)"
    )


# ---------------------------------------------------------------- configuration


def check_config(cfg: IngestConfig) -> None:
    """Reject impossible configurations before any work, naming the flag and the allowed values."""
    if cfg.source not in SOURCES:
        raise HashrayError(f"unknown source {cfg.source!r}; choose one of {', '.join(SOURCES)}")
    if not cfg.out:
        raise HashrayError("--out is required: the dataset dir to write")
    if cfg.seed < 0:
        raise HashrayError(f"--seed must be >= 0, got {cfg.seed}")
    for flag, value in (("--max-pixels", cfg.max_pixels), ("--rows-per-file", cfg.rows_per_file)):
        if value < 1:
            raise HashrayError(f"{flag} must be a positive integer, got {value}")
    if cfg.num_cpus <= 0:
        raise HashrayError(f"--num-cpus must be > 0, got {cfg.num_cpus}")
    if cfg.source == "synthetic":
        _check_synthetic(cfg)
    elif cfg.source in ("coco", "folder"):
        _check_sampled(cfg)
    _check_files_exist(cfg)


def _check_files_exist(cfg: IngestConfig) -> None:
    """Fail before starting Ray when a source file is not there."""
    if cfg.source == "synthetic":
        return
    for field, flag in SOURCE_FILE_FLAGS.items():
        uri = getattr(cfg, field)
        if uri and not exists(uri):
            raise HashrayError(f"{flag} {uri}: file not found")


def _check_synthetic(cfg: IngestConfig) -> None:
    sizes = synthetic_sizes(cfg)
    if sizes["query"] < 1 or sizes["database"] < 1 or sizes["train"] < 0:
        raise HashrayError(f"synthetic needs --query >= 1, --database >= 1 and --train >= 0, got {sizes}")
    if not 16 <= cfg.image_size <= 1024:
        raise HashrayError(f"--image-size must be between 16 and 1024 pixels, got {cfg.image_size}")
    synthetic.check_num_classes(cfg.num_classes)


def _check_sampled(cfg: IngestConfig) -> None:
    flag = "--annotations" if cfg.source == "coco" else "--csv"
    if not (cfg.annotations if cfg.source == "coco" else cfg.csv):
        raise HashrayError(f"{cfg.source} needs {flag} FILE")
    if cfg.query is None:
        raise HashrayError(f"{cfg.source} needs --query N: how many random rows to hold out as queries")
    if cfg.database is not None:
        raise HashrayError(f"{cfg.source}: --database is not a count here; the database is every good row that is not a query")


def synthetic_sizes(cfg: IngestConfig) -> dict[str, int]:
    return {split: SYNTHETIC_SIZES[split] if getattr(cfg, split) is None else getattr(cfg, split) for split in SPLITS}


def clear_out(out: str) -> None:
    """Make ``out`` ready for a new dataset; refuse to delete anything that is not one.

    ``dataset.json`` goes first, so an interrupted re-ingest never looks complete.
    """
    filesystem, path = resolve(out)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return
    if info.type != pafs.FileType.Directory:
        raise HashrayError(f"--out {out} exists and is not a directory")
    entries = {posixpath.basename(e.path): e.type for e in filesystem.get_file_info(pafs.FileSelector(path))}
    foreign = sorted(set(entries) - {*SPLITS, DATASET_JSON, REJECTS_JSONL})
    if foreign:
        raise HashrayError(f"--out {out} holds files that are not part of a hashray dataset ({', '.join(foreign[:3])}); choose a new or empty directory")
    for name in sorted(entries, key=lambda n: n != DATASET_JSON):
        target = posixpath.join(path, name)
        if entries[name] == pafs.FileType.Directory:
            filesystem.delete_dir(target)
        else:
            filesystem.delete_file(target)


# ---------------------------------------------------------------- planning


def _plan(cfg: IngestConfig) -> _Plan:
    if cfg.source == "synthetic":
        return _plan_synthetic(cfg)
    source, root, default_name = _parse_source(cfg)
    good = [dataclasses.asdict(row) for row in source.rows if not row.reason]
    rejected = [_reject_record(dataclasses.asdict(row)) for row in source.rows if row.reason]
    dataset = None
    if good:
        dataset = ray.data.from_items(good, override_num_blocks=_blocks(len(good), cfg.rows_per_file)).map_batches(
            load_images,
            fn_kwargs={"root": root, "max_pixels": cfg.max_pixels},
            batch_size=None,  # one block in, one block out: the block decides the file name
            batch_format="pyarrow",
            num_cpus=cfg.num_cpus,
        )
    return _Plan(cfg.name or default_name, source.classes, dataset, len(source.rows), rejected)


def _parse_source(cfg: IngestConfig) -> tuple[sources.Source, str, str]:
    """(parsed source, image root, default dataset name)."""
    if cfg.source == "txtlist":
        lists = {s: getattr(cfg, f"{s}_list") for s in SPLITS if getattr(cfg, f"{s}_list")}
        source = sources.read_txtlist(lists, cfg.classes_file)
        main_file = next(iter(lists.values()))
    elif cfg.source == "coco":
        source = sources.read_coco(cfg.annotations, query=cfg.query, train=cfg.train or 0, seed=cfg.seed)
        main_file = cfg.annotations
    else:
        source = sources.read_folder(cfg.csv, query=cfg.query, train=cfg.train or 0, seed=cfg.seed, classes_file=cfg.classes_file)
        main_file = cfg.csv
    root = cfg.root or posixpath.dirname(main_file.rstrip("/")) or "."
    return source, root, posixpath.basename(root.rstrip("/")) or cfg.source


def _plan_synthetic(cfg: IngestConfig) -> _Plan:
    sizes = synthetic_sizes(cfg)
    total = max(sizes["train"], sizes["database"]) + sizes["query"]
    dataset = ray.data.range(total, override_num_blocks=_blocks(total, cfg.rows_per_file)).map_batches(
        draw_synthetic,
        fn_kwargs={"sizes": sizes, "seed": cfg.seed, "image_size": cfg.image_size, "num_classes": cfg.num_classes},
        batch_size=None,  # one block in, one block out: the block decides the file name
        batch_format="pyarrow",
        num_cpus=cfg.num_cpus,
    )
    return _Plan(cfg.name or "synthetic", synthetic.synthetic_classes(cfg.num_classes), dataset, total, [])


def _blocks(rows: int, rows_per_file: int) -> int:
    return max(1, math.ceil(rows / rows_per_file))


# ---------------------------------------------------------------- workers


def draw_synthetic(batch: pa.Table, *, sizes: dict[str, int], seed: int, image_size: int, num_classes: int) -> pa.Table:
    """Rows ``seq`` of the synthetic set: first the database stream (also train), then the queries."""
    stream_rows = max(sizes["train"], sizes["database"])
    rows = []
    for seq in batch.column("id").to_pylist():
        split, index = ("database", seq) if seq < stream_rows else ("query", seq - stream_rows)
        splits = ["query"] if split == "query" else [s for s in ("train", "database") if index < sizes[s]]
        image, labels = synthetic.synthetic_example(index, split=split, seed=seed, image_size=image_size, num_classes=num_classes)
        rows.append((seq, synthetic.synthetic_id(index, split), image, labels, splits, f"synthetic {split} #{index}", "", ""))
    return _checked_table(rows)


def load_images(batch: pa.Table, *, root: str, max_pixels: int) -> pa.Table:
    """Read and fully decode each row's file; bad files get a reason instead of bytes."""
    filesystem, root_path = resolve(root)
    rows = []
    for row in batch.to_pylist():
        image, reason, detail = b"", "", ""
        try:
            image = _read_image(filesystem, posixpath.join(root_path, row["path"]), max_pixels)
        except BadImage as error:
            reason, detail = error.reason, error.detail
        rows.append((row["seq"], row["id"], image, row["labels"], row["splits"], row["where"], reason, detail))
    return _checked_table(rows)


def _read_image(filesystem: pafs.FileSystem, path: str, max_pixels: int) -> bytes:
    """The file's bytes, as read (never re-encoded), once they are known to decode."""
    try:
        with filesystem.open_input_stream(path) as stream:
            data = stream.read()
    except FileNotFoundError as error:
        raise BadImage("missing_file", f"{path} does not exist") from error
    except OSError as error:  # a directory, no permission, a network error...
        raise BadImage("unreadable_file", f"{path}: {error}") from error
    decode_image(data, max_pixels=max_pixels)
    return data


def _checked_table(rows: list[tuple]) -> pa.Table:
    columns = list(zip(*rows)) if rows else [[] for _ in CHECKED_COLUMNS]
    types = (pa.int64(), pa.string(), pa.binary(), pa.list_(pa.int32()), pa.list_(pa.string()), pa.string(), pa.string(), pa.string())
    return pa.table({name: pa.array(list(values), type=t) for name, values, t in zip(CHECKED_COLUMNS, columns, types)})


def _reject_record(row: dict[str, Any]) -> dict[str, Any]:
    """One line of rejects.jsonl."""
    return {
        "row": row["seq"],
        "id": row["id"],
        "where": row["where"],
        "splits": list(row["splits"]),
        "reason": row["reason"],
        "detail": row["detail"],
    }


# ---------------------------------------------------------------- writing


class _DatasetSink(Datasink):
    """Writes the good rows of each block to ``out/<split>/part-<first row>.parquet``.

    Each write task returns its rejects and counts, which the driver collects
    in ``on_write_complete``: rejected rows never go through the object store
    with their bytes, and nothing is counted twice.
    """

    def __init__(self, out: str) -> None:
        self.out = out
        self.rows = 0
        self.written: Counter = Counter()
        self.rejects: list[dict[str, Any]] = []

    def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, Any]:
        result = {"rows": 0, "written": Counter(), "rejects": []}
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow().sort_by("seq")
            bad = np.array([bool(r) for r in table.column("reason").to_pylist()], dtype=bool)
            result["rejects"] += [_reject_record(r) for r in table.filter(pa.array(bad)).to_pylist()]
            good = table.filter(pa.array(~bad))
            result["rows"] += good.num_rows
            for split in SPLITS:
                result["written"][split] += self._write_split(good, split)
        return result

    def _write_split(self, good: pa.Table, split: str) -> int:
        rows = good.filter(pa.array([split in s for s in good.column("splits").to_pylist()], type=pa.bool_()))
        if rows.num_rows == 0:
            return 0
        filesystem, path = resolve(join(self.out, split, f"part-{rows.column('seq')[0].as_py():010d}.parquet"))
        filesystem.create_dir(posixpath.dirname(path), recursive=True)
        pq.write_table(
            rows.select(DATASET_SCHEMA.names).cast(DATASET_SCHEMA), path, filesystem=filesystem, row_group_size=ROW_GROUP_ROWS
        )
        return rows.num_rows

    def on_write_complete(self, write_result: Any) -> None:
        for result in write_result.write_returns:
            self.rows += result["rows"]
            self.written.update(result["written"])
            self.rejects += result["rejects"]


# ---------------------------------------------------------------- CLI


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """``hashray ingest {synthetic,txtlist,coco,folder} ...``."""
    parser = subparsers.add_parser(
        "ingest",
        help="raw images + labels -> dataset dir (Parquet)",
        description="Write a dataset dir (train/, query/, database/ Parquet + dataset.json) from a source. "
        "Bad rows are skipped and listed with their reason in DIR/rejects.jsonl.",
    )
    kinds = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    common = _common_parser()
    _synthetic_parser(kinds, common)
    _txtlist_parser(kinds, common)
    for source, flag, what in (("coco", "--annotations", "COCO instances_*.json"), ("folder", "--csv", "CSV with columns path,labels (labels joined by |)")):
        sub = kinds.add_parser(source, parents=[common], help=f"image folder + {what}")
        sub.add_argument(flag, dest=flag.lstrip("-"), required=True, help=what)
        sub.add_argument("--root", help="folder the image paths are relative to (default: the folder of the file)")
        sub.add_argument("--query", type=int, required=True, help="random good rows held out as queries; the rest are the database")
        sub.add_argument("--train", type=int, default=0, help="random database rows also used for training (default 0)")
        if source == "folder":
            sub.add_argument("--classes", dest="classes_file", help="class names, one per line (default: the names found, sorted)")
    parser.set_defaults(handler=_handle)


def _common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="dataset dir to write: a path or a pyarrow filesystem URI (s3://...)")
    common.add_argument("--seed", type=int, default=0, help="seed of the synthetic draw / the query-train sampling (default 0)")
    common.add_argument("--strict", action="store_true", help="exit non-zero at the first bad row instead of rejecting it")
    common.add_argument("--name", help="dataset name in dataset.json (default: source or root folder name)")
    common.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help=f"reject images with more pixels (default {MAX_PIXELS})")
    common.add_argument("--rows-per-file", type=int, default=IngestConfig.rows_per_file, help="rows per Ray Data block and Parquet file (default %(default)s)")
    common.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved by each ingest task (default 1)")
    return common


def _synthetic_parser(kinds: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    sub = kinds.add_parser(
        "synthetic",
        parents=[common],
        help="the built-in procedurally drawn multi-label data set",
        description="Draw the built-in data set: each class is a shape x colour x texture object kind; 1-5 objects "
        "per image over clutter; long-tailed class frequencies. Train row i is database row i (same id).",
    )
    sub.add_argument("--train", type=int, default=SYNTHETIC_SIZES["train"], help="train rows: the first N database rows, same ids (default %(default)s)")
    sub.add_argument("--query", type=int, default=SYNTHETIC_SIZES["query"], help="query rows, never in the database (default %(default)s)")
    sub.add_argument("--database", type=int, default=SYNTHETIC_SIZES["database"], help="database rows (default %(default)s)")
    sub.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="image side in pixels (default %(default)s)")
    sub.add_argument("--num-classes", type=int, default=DEFAULT_NUM_CLASSES, help="object classes (default %(default)s)")


def _txtlist_parser(kinds: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    sub = kinds.add_parser("txtlist", parents=[common], help="list files `relative/path.jpg 0 1 0 ... 1` per split")
    for split in SPLITS:
        sub.add_argument(f"--{split}", dest=f"{split}_list", help=f"{split} list file")
    sub.add_argument("--root", help="folder the image paths are relative to (default: the folder of the first list)")
    sub.add_argument("--classes", dest="classes_file", help="class names, one per line (default class_0, class_1, ...)")


def _handle(args: argparse.Namespace) -> int:
    from pipelines.runtime import init_ray

    known = {f.name for f in dataclasses.fields(IngestConfig)}
    cfg = IngestConfig(**{k: v for k, v in vars(args).items() if k in known})
    check_config(cfg)
    init_ray(args.address)
    summary = run(cfg)
    print(format_summary(summary))
    return 0


def format_summary(summary: dict[str, Any]) -> str:
    splits = ", ".join(f"{split} {n}" for split, n in summary["splits"].items())
    lines = [
        f"ingest: read {summary['read']} rows, wrote {summary['written']} ({splits}), "
        f"rejected {summary['rejected']} -> {summary['out']}"
    ]
    lines += [f"  rejected {reason}: {n}" for reason, n in summary["rejected_by_reason"].items()]
    return "\n".join(lines)
