"""``hashray ingest``: raw images + labels -> a dataset dir of Parquet files (docs/DESIGN.md).

A Ray Data job that streams: the driver parses only the small list files
(:mod:`pipelines.sources`) or nothing at all (synthetic); workers
(:mod:`pipelines.ingest_rows`) read, check or draw the images block by block
and write one Parquet file per block and split. Bad rows are never written: each one is kept with its reason in
``rejects.jsonl`` and counted, so rows read = rows written + rows rejected.
``dataset.json`` is written last: a dir without it is incomplete.

File names come from the first source row of their block, not from Ray's
write ids, so the same input and seed give byte-identical Parquet files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import posixpath
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import ray.data

from contracts.dataset import DATASET_JSON, REJECTS_JSONL, SPLITS, write_dataset_info
from contracts.fs import absolute, exists, join, now_iso, resolve, write_bytes
from models.errors import HashrayError
from models.transforms import MAX_PIXELS
from pipelines import sources, synthetic
from pipelines.ingest_rows import DatasetSink, draw_synthetic, load_images, reject_record

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


@dataclass(frozen=True)
class IngestConfig:
    """One ingest job. Fields a source does not use are ignored.

    ``hashray ingest SOURCE`` offers only the fields whose ``metadata["sources"]``
    names that source (every source when absent), under ``metadata["flag"]``
    when the field's own name would not read well on the command line.

    Args:
        source: ``synthetic``, ``txtlist``, ``coco`` or ``folder``.
        out: dataset dir to write (local path or ``pyarrow.fs`` URI).
        seed: seed of the synthetic draw and of the coco/folder query/train sampling.
        strict: fail on the first bad row instead of rejecting it.
        name: dataset name in dataset.json (default: the source or root folder name).
        train, query, database: synthetic: rows per split (train ids are the
            first database ids). coco/folder: how many random good rows are
            held out as queries and how many database rows also train;
            ``database`` must be unset (every row that is not a query).
        image_size: synthetic image side in pixels.
        num_classes: synthetic object classes.
        root: folder the image paths are relative to (default: the folder of
            the list/annotation/CSV file).
        train_list: txtlist list file of the train split (default: none; at
            least one of the three lists is needed).
        query_list: txtlist list file of the query split (default: none).
        database_list: txtlist list file of the database split (default: none).
        classes_file: class names, one per line (txtlist default: class_0,
            class_1, ...; folder default: the names found, sorted).
        annotations: COCO ``instances_*.json``.
        csv: folder source CSV with columns ``path,labels`` (labels joined by ``|``).
        max_pixels: images with more pixels are rejected (decompression bombs).
        rows_per_file: rows per Ray Data block, hence per Parquet file.
        num_cpus: CPUs reserved by each ingest task.
    """

    source: str = dataclasses.field(metadata={"choices": SOURCES})
    out: str
    seed: int = 0
    strict: bool = False
    name: str | None = None
    train: int | None = dataclasses.field(default=None, metadata={"sources": ("synthetic", "coco", "folder")})
    query: int | None = dataclasses.field(default=None, metadata={"sources": ("synthetic", "coco", "folder")})
    database: int | None = dataclasses.field(default=None, metadata={"sources": ("synthetic",)})
    image_size: int = dataclasses.field(default=DEFAULT_IMAGE_SIZE, metadata={"sources": ("synthetic",)})
    num_classes: int = dataclasses.field(default=DEFAULT_NUM_CLASSES, metadata={"sources": ("synthetic",)})
    root: str | None = dataclasses.field(default=None, metadata={"sources": ("txtlist", "coco", "folder")})
    train_list: str | None = dataclasses.field(default=None, metadata={"sources": ("txtlist",), "flag": "--train"})
    query_list: str | None = dataclasses.field(default=None, metadata={"sources": ("txtlist",), "flag": "--query"})
    database_list: str | None = dataclasses.field(
        default=None, metadata={"sources": ("txtlist",), "flag": "--database"}
    )
    classes_file: str | None = dataclasses.field(
        default=None, metadata={"sources": ("txtlist", "folder"), "flag": "--classes"}
    )
    annotations: str | None = dataclasses.field(default=None, metadata={"sources": ("coco",)})
    csv: str | None = dataclasses.field(default=None, metadata={"sources": ("folder",)})
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
    logger.info(
        "ingest %s: %d source rows (%d rejected by the parser) -> %s",
        cfg.source,
        plan.read,
        len(plan.rejected),
        cfg.out,
    )
    sink = DatasetSink(cfg.out)
    if plan.dataset is not None:  # None when every row was already rejected by the parser
        plan.dataset.write_datasink(sink)
    rejected = sorted(plan.rejected + sink.rejects, key=lambda r: r["row"])
    write_bytes(join(cfg.out, REJECTS_JSONL), "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejected).encode())
    summary = _summary(cfg.out, plan.read, sink, rejected)
    if cfg.strict and rejected:
        raise HashrayError(_strict_message(rejected))
    write_dataset_info(
        cfg.out, name=plan.name, classes=plan.classes, splits=summary["splits"], created=created, source=cfg.source
    )
    return summary


def _summary(out: str, read: int, sink: DatasetSink, rejected: list[dict[str, Any]]) -> dict[str, Any]:
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
        raise HashrayError(
            f"{cfg.source}: --database is not a count here; the database is every good row that is not a query"
        )


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
        raise HashrayError(
            f"--out {out} holds files that are not part of a hashray dataset ({', '.join(foreign[:3])}); choose a new or empty directory"
        )
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
    rejected = [reject_record(dataclasses.asdict(row)) for row in source.rows if row.reason]
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
        source = sources.read_folder(
            cfg.csv, query=cfg.query, train=cfg.train or 0, seed=cfg.seed, classes_file=cfg.classes_file
        )
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


# ---------------------------------------------------------------- summary


def format_summary(summary: dict[str, Any]) -> str:
    splits = ", ".join(f"{split} {n}" for split, n in summary["splits"].items())
    lines = [
        f"ingest: read {summary['read']} rows, wrote {summary['written']} ({splits}), "
        f"rejected {summary['rejected']} -> {summary['out']}"
    ]
    lines += [f"  rejected {reason}: {n}" for reason, n in summary["rejected_by_reason"].items()]
    return "\n".join(lines)
