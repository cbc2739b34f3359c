"""What ``hashray serve`` is told (:class:`ServeConfig`) and the checks the driver makes before Ray starts.

:func:`check_inputs` opens the run, codes and dataset dirs once and returns
them as :class:`ServeInputs`; the deployments take those opened objects, so
no replica reads ``manifest.json``, ``config.json`` or ``dataset.json`` again
(a reload opens its new codes dir once, in the catalog).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from contracts.codes import CodesDir
from contracts.dataset import DatasetDir
from contracts.run import RunDir
from models.errors import HashrayError
from models.transforms import MAX_PIXELS
from serve.index import check_shards

# Where `hashray serve` takes --admin-token from when the flag is not given;
# a deployed app (serve/config.yaml) takes it from its own args only.
ADMIN_TOKEN_ENV = "HASHRAY_ADMIN_TOKEN"


@dataclass(frozen=True)
class ServeConfig:
    """``hashray serve``: what to serve, where, and the resources of each deployment.

    Args:
        run: finished training run dir (the query encoder).
        codes: codes dir of the database split (what is searched).
        data: dataset dir (stored images and class names).
        shards: index shard deployments; each holds the rows whose id hashes to it (id hash % shards)
            (unset: one per 2,000,000 codes, at most one per CPU of the Ray: the scan of a shard uses one core).
        host: HTTP host to bind.
        port: HTTP port.
        metrics_port: port of Ray's Prometheus metrics (Serve's among them) when
            ``hashray serve`` starts Ray itself (none: a free one; the URL is printed when ready).
        max_upload_mb: largest request body accepted, in MB.
        max_pixels: largest query image (width x height) decoded; more is a decompression bomb.
        encoder_gpus: GPUs per Encoder replica (1 to run the model on a GPU).
        encoder_cpus: CPUs Ray reserves per Encoder replica (fractions let the
            app share a small machine; unset: 1, scaled down with the other
            unset requests until all replicas fit a local Ray).
        shard_cpus: CPUs Ray reserves per index shard replica (unset: 0.5, scaled like --encoder-cpus).
        ingress_cpus: CPUs Ray reserves per ingress replica (unset: 0.5, scaled like --encoder-cpus).
        shard_threads: scan threads per shard replica (they split a batch of queries).
        encoder_min_replicas: fewest Encoder replicas the autoscaler keeps.
        encoder_max_replicas: most Encoder replicas the autoscaler starts.
        target_ongoing_requests: ongoing requests per Encoder replica the autoscaler aims for.
        ingress_min_replicas: fewest ingress (HTTP) replicas the autoscaler keeps; each one needs
            --ingress-cpus, and the start waits until this many run.
        ingress_max_replicas: most ingress replicas the autoscaler starts under load.
        ingress_target_ongoing_requests: ongoing HTTP requests per ingress replica the autoscaler aims for.
        max_batch_size: most concurrent queries one Encoder forward pass takes.
        batch_wait_s: longest wait, in seconds, to fill an Encoder batch.
        search_batch_size: most concurrent searches the ingress sends to the
            shards in one call per shard.
        search_batch_wait_s: longest wait, in seconds, to fill a search batch
            (0 takes the queries that arrived while the previous batch ran).
        search_timeout_s: longest wait, in seconds, for every shard's answer to a search; past it the
            query gets 503 (a shard replica is down, e.g. its node was lost, until Serve restarts it).
        max_ongoing_requests: concurrent requests per ingress or shard replica.
        image_cache_row_groups: Parquet row groups of stored images kept in memory.
        access_log: log every request in every replica (costs CPU on the request path).
        admin_token: when set, ``POST /admin/reload`` needs header ``X-Admin-Token``.
        app_name: Serve application name.
    """

    run: str
    codes: str
    data: str
    shards: int | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    metrics_port: int | None = None
    max_upload_mb: float = 10.0
    max_pixels: int = MAX_PIXELS
    encoder_gpus: float = 0.0
    encoder_cpus: float | None = None
    shard_cpus: float | None = None
    ingress_cpus: float | None = None
    shard_threads: int = 1
    encoder_min_replicas: int = 1
    encoder_max_replicas: int = 1
    target_ongoing_requests: float = 8.0
    ingress_min_replicas: int = 1
    ingress_max_replicas: int = 1
    ingress_target_ongoing_requests: float = 32.0
    max_batch_size: int = 16
    batch_wait_s: float = 0.005
    search_batch_size: int = 32
    search_batch_wait_s: float = 0.0
    search_timeout_s: float = 10.0
    max_ongoing_requests: int = 128
    image_cache_row_groups: int = 8
    access_log: bool = False
    admin_token: str | None = None
    app_name: str = "hashray"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


@dataclass(frozen=True)
class ServeInputs:
    """A checked config and the three dirs it names, each opened once; small and picklable.

    ``cfg``'s paths are the dirs' absolute URIs: replicas do not run in the caller's directory.
    """

    cfg: ServeConfig
    run: RunDir
    codes: CodesDir
    data: DatasetDir


def check_codes_fit(codes: CodesDir, run: RunDir) -> None:
    """Codes of another length than the model makes cannot be searched with its queries."""
    codes.require_bits(run.config.bits, f"{run.uri} makes")


def check_inputs(cfg: ServeConfig) -> ServeInputs:
    """Fail early, on the driver, with one clear message per missing input; open each dir once."""
    run = RunDir.open(cfg.run)
    codes = CodesDir.open(cfg.codes)
    check_codes_fit(codes, run)
    data = DatasetDir.open(cfg.data)
    data.split_files("database")  # the web page shows the database's stored images
    if cfg.shards is not None:
        check_shards(cfg.shards)
    if cfg.max_upload_mb <= 0 or cfg.max_pixels <= 0 or cfg.search_timeout_s <= 0:
        raise HashrayError("--max-upload-mb, --max-pixels and --search-timeout-s must be positive")
    if not 1 <= cfg.encoder_min_replicas <= cfg.encoder_max_replicas:
        raise HashrayError("need 1 <= --encoder-min-replicas <= --encoder-max-replicas")
    if not 1 <= cfg.ingress_min_replicas <= cfg.ingress_max_replicas:
        raise HashrayError("need 1 <= --ingress-min-replicas <= --ingress-max-replicas")
    if cfg.ingress_target_ongoing_requests <= 0:
        raise HashrayError("--ingress-target-ongoing-requests must be positive")
    cfg = dataclasses.replace(cfg, run=run.uri, codes=codes.uri, data=data.uri)
    return ServeInputs(cfg, run, codes, data)
