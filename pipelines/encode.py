"""Bulk encoding: a dataset split -> a codes dir, as one streaming Ray Data job.

read Parquet -> decode + eval transform (``pipelines.preprocess`` actors)
-> :class:`CodeEncoder` (a stateful actor pool: the model is loaded once per
actor, one GPU each with ``--gpu``) -> sign bits packed -> ``write_parquet``.
Memory stays bounded by Ray Data's streaming executor whatever the split size.

Completion is atomic: Parquet files first, ``manifest.json`` last. An output
dir without a manifest is incomplete and is deleted and redone; one whose
manifest names the same model (path and checksum), dataset and split is
complete and is reused as is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from contracts.codes import MANIFEST_JSON, CodesDir, codes_schema, codes_table, label_lists, write_manifest
from contracts.dataset import REJECTS_JSONL, SPLITS, DatasetDir
from contracts.fs import absolute, exists, join, parquet_files, remove_dir, resolve, storage_errors, write_bytes
from contracts.parquet import open_parquet
from contracts.run import RunDir
from models.codes import pack_codes
from models.errors import HashrayError
from models.network import HashNetConfig
from models.transforms import model_input

logger = logging.getLogger(__name__)

# Actors drop rejects here while the job runs; merged into rejects.jsonl at the end.
REJECTS_PARTS = "_rejects"
# Preprocessing pieces per encoder actor (see _codes_dataset).
PIECES_PER_ACTOR = 4


@dataclass(frozen=True)
class EncodeConfig:
    """Inputs of ``hashray encode``.

    Args:
        run: finished training run dir (``model.pt`` + ``config.json``).
        data: dataset dir.
        split: ``database``, ``query`` or ``train``.
        out: codes dir to write.
        batch_size: images per inference batch (and per decode batch); large
            batches amortise Ray Data's per-batch cost (see bench/encode.py).
        pool_size: encoder actors.
        gpu: one GPU per actor, inference on CUDA.
        cpus_per_actor: CPUs Ray reserves per encoder actor. Encoder actors
            and the read + decode tasks must fit together, or the job waits
            forever: the defaults (0.5 + 0.5) fit 1 CPU.
        threads_per_actor: torch threads per encoder actor; 0 = ceil(cpus_per_actor).
            May exceed the reservation when decoding is light (see bench/encode.py).
        decode_cpus: CPUs reserved per read + decode task.
        decode_workers: most read + decode tasks running at once.
        overwrite: recompute even when ``out`` already holds these codes.
    """

    run: str
    data: str
    split: str = field(metadata={"choices": SPLITS})
    out: str
    batch_size: int = 256
    pool_size: int = 1
    gpu: bool = False
    cpus_per_actor: float = 0.5
    threads_per_actor: int = 0
    decode_cpus: float = 0.5
    decode_workers: int = 1
    overwrite: bool = False


# ---------------------------------------------------------------- the actor


class CodeEncoder:
    """Ray Data worker: preprocessed batch -> code rows; rows that failed to decode go to the rejects.

    Loads the model once per actor. Callable on a plain dict of arrays
    ``{id, image (n,3,S,S) uint8, labels (n,C) multi-hot, error}`` so it is
    testable without Ray.
    """

    def __init__(self, run: RunDir, *, rejects_uri: str, device: str = "cpu", threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.model = run.load_model(map_location=device)
        self.config = run.config  # the run's own normalisation, as training fed the network
        self.device = device
        self.rejects_uri = rejects_uri

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ok = np.asarray(batch["error"]) == ""
        if not ok.all():
            self._reject(batch["id"][~ok], batch["error"][~ok])
        if not ok.any():
            return codes_schema(self.config.bits).empty_table()
        images = torch.from_numpy(np.ascontiguousarray(batch["image"][ok])).to(self.device)  # uint8: 4x less to copy
        bits = self.model.encode(model_input(images, self.config)).cpu().numpy()
        return codes_table(batch["id"][ok], pack_codes(bits), label_lists(batch["labels"][ok]))

    def _reject(self, ids: np.ndarray, reasons: np.ndarray) -> None:
        """One small file per batch with rejects (rare): works on any filesystem, no appends."""
        lines = "".join(json.dumps({"id": str(i), "reason": str(r)}) + "\n" for i, r in zip(ids, reasons))
        write_bytes(join(self.rejects_uri, f"{uuid.uuid4().hex}.jsonl"), lines.encode())


# ---------------------------------------------------------------- driver


def _provenance(run: RunDir, dataset: DatasetDir, split: str) -> dict[str, Any]:
    """What makes two codes dirs interchangeable: same model bytes, same dataset, same split."""
    return {
        "model": run.uri,
        "model_sha256": run.model_sha256(),
        "dataset": dataset.uri,
        "dataset_created": dataset.created,
        "split": split,
    }


def check_compatible(model_config: HashNetConfig, dataset: DatasetDir) -> None:
    """The dataset must use the model's classes, in the same order (label i means class i).

    Image sizes cannot mismatch: every image is resized to the model's
    ``image_size`` by the same eval transform that serving uses.
    """
    classes = list(dataset.classes)
    if classes != list(model_config.classes):
        diff = sorted(set(classes) ^ set(model_config.classes))[:5]
        detail = f"differing: {diff}" if diff else "same names in a different order"
        raise HashrayError(
            f"{dataset.uri}: its {len(classes)} classes differ from the model's {len(model_config.classes)} ({detail}); "
            "encode a dataset with the classes the model was trained on"
        )
    if not isinstance(model_config.image_size, int) or model_config.image_size < 1:
        raise HashrayError(f"model config image_size must be a positive integer, got {model_config.image_size!r}")


def parquet_rows(files: list[str]) -> int:
    """Rows in Parquet files, from their footers (no data read)."""
    total = 0
    for file in files:
        with open_parquet(file) as parquet:
            total += parquet.metadata.num_rows
    return total


def _reusable(out_uri: str, provenance: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a complete output made from the same inputs, else None."""
    if not exists(join(out_uri, MANIFEST_JSON)):
        return None
    manifest = CodesDir.open(out_uri).manifest
    if all(manifest.get(key) == value for key, value in provenance.items()):
        return manifest
    logger.warning("encode: %s holds codes of another model/dataset/split; replacing them", out_uri)
    return None


def _collect_rejects(out_uri: str) -> int:
    """Merge the actors' reject parts into OUT/rejects.jsonl (deduplicated, by id); return the count."""
    parts_uri = join(out_uri, REJECTS_PARTS)
    filesystem, path = resolve(parts_uri)
    selector = pafs.FileSelector(path, allow_not_found=True)
    rows: dict[str, str] = {}
    for info in filesystem.get_file_info(selector):
        with filesystem.open_input_stream(info.path) as stream:
            for line in stream.read().decode().splitlines():
                rows[json.loads(line)["id"]] = line  # a retried task rewrites the same rejects
    remove_dir(parts_uri)
    if rows:
        write_bytes(join(out_uri, REJECTS_JSONL), "".join(rows[i] + "\n" for i in sorted(rows)).encode())
    return len(rows)


def check_config(cfg: EncodeConfig) -> None:
    """Refuse sizes Ray would only reject deep inside the job (or wait on forever)."""
    for name in ("batch_size", "pool_size", "decode_workers"):
        if getattr(cfg, name) < 1:
            raise HashrayError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.cpus_per_actor < 0 or cfg.decode_cpus < 0 or cfg.threads_per_actor < 0:
        raise HashrayError("--cpus-per-actor, --decode-cpus and --threads-per-actor must not be negative")


def run(cfg: EncodeConfig) -> dict[str, Any]:
    """Encode one split; returns the codes dir's manifest.

    The run, the dataset and an existing output are each opened once here
    and handed down (the run and dataset objects travel to the Ray workers as they are).
    A store that fails on the way is one line, and ``manifest.json`` is then never written.
    """
    check_config(cfg)
    with storage_errors("encode", cfg.out):
        return _encode(cfg)


def _encode(cfg: EncodeConfig) -> dict[str, Any]:
    run_dir, dataset = RunDir.open(cfg.run), DatasetDir.open(cfg.data)
    cfg = dataclasses.replace(cfg, run=run_dir.uri, data=dataset.uri, out=absolute(cfg.out))
    check_compatible(run_dir.config, dataset)
    input_files = dataset.split_files(cfg.split)
    provenance = _provenance(run_dir, dataset, cfg.split)
    reusable = None if cfg.overwrite else _reusable(cfg.out, provenance)
    if reusable is not None:
        logger.info(
            "encode: %s already holds these %d codes; reusing them (--overwrite recomputes)", cfg.out, reusable["count"]
        )
        return reusable
    remove_dir(cfg.out)  # an incomplete or stale output is never mixed with new files
    rows_read = parquet_rows(input_files)
    logger.info(
        "encode: %d %s rows of %s with %s (%d bits)", rows_read, cfg.split, cfg.data, cfg.run, run_dir.config.bits
    )
    started = time.perf_counter()
    _codes_dataset(cfg, run_dir, dataset).write_parquet(cfg.out)
    rejected = _collect_rejects(cfg.out)
    written = parquet_rows(parquet_files(cfg.out))
    if written + rejected != rows_read:
        raise RuntimeError(f"encode lost rows: read {rows_read}, wrote {written}, rejected {rejected}")
    elapsed = time.perf_counter() - started
    logger.info(
        "encode: %d codes, %d rejected, %.1f s (%.1f images/s)",
        written,
        rejected,
        elapsed,
        rows_read / max(elapsed, 1e-9),
    )
    return write_manifest(cfg.out, bits=run_dir.config.bits, count=written, **provenance)


def _codes_dataset(cfg: EncodeConfig, run_dir: RunDir, dataset: DatasetDir) -> Any:
    """The lazy Ray Dataset of code rows (nothing runs until it is written)."""
    import ray
    import ray.data

    from pipelines.preprocess import PreprocessConfig, preprocess_split

    if cfg.gpu and ray.cluster_resources().get("GPU", 0) < cfg.pool_size:
        # Not an error: an autoscaling cluster adds GPU nodes once the actors ask for them.
        logger.warning(
            "encode: %d GPU actors requested, the cluster has %s GPUs now",
            cfg.pool_size,
            ray.cluster_resources().get("GPU", 0),
        )
    preprocess = PreprocessConfig(image_size=run_dir.config.image_size, train=False)
    images = preprocess_split(
        dataset,
        cfg.split,
        preprocess,
        batch_size=cfg.batch_size,
        num_cpus=cfg.decode_cpus,
        max_workers=cfg.decode_workers,
        share_cpus=True,  # with the encoder actors
        # Ray Data fuses decoding into the encoder actors, which then share the
        # pieces, and keeps their order (a later piece's output waits for the
        # earlier ones): a few pieces per actor keep every actor busy.
        min_pieces=PIECES_PER_ACTOR * max(cfg.pool_size, cfg.decode_workers),
    )
    # Same input order -> same files in the same order: reruns are byte-identical.
    images.context.execution_options.preserve_order = True
    return images.map_batches(
        CodeEncoder,
        fn_constructor_kwargs={
            "run": run_dir,
            "rejects_uri": join(cfg.out, REJECTS_PARTS),
            "device": "cuda" if cfg.gpu else "cpu",
            "threads": cfg.threads_per_actor or math.ceil(cfg.cpus_per_actor),
        },
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.pool_size),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=1 if cfg.gpu else 0,
    )
