"""The Serve application: ``build_app(cfg)`` binds the deployments, ``app_builder(args)`` is its deploy entry point.

``serve deploy serve/config.yaml`` (and ``serve run``) import
``serve.app:app_builder`` and call it with the file's ``args``; ``hashray
serve`` calls :func:`build_app` through :func:`serve.start.run`. Both check
the inputs once on the driver (:func:`serve.config.check_inputs`) and hand
the opened dirs to the replicas. Nothing happens at import time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ray
from ray import serve

from models.errors import HashrayError
from serve.catalog import Catalog
from serve.config import ServeConfig, ServeInputs, check_inputs
from serve.deployments import SEARCH_BATCHES_IN_FLIGHT, Ingress
from serve.encoder import Encoder
from serve.resources import CATALOG_CPUS, cpus, with_shards
from serve.shard import IndexShard

# Part of Serve's throughput-optimized mode, set per replica so it needs no
# cluster-wide flag: user code and the handle router share the replica's event
# loop, which saves two thread hops per call on a small machine.
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
# Calls the catalog holds at once: one long poll per ingress replica, plus reloads and reports.
CATALOG_ONGOING = 1000
# How often a stopping replica looks whether its calls are done (Serve's default
# waits 2 s before the first look): every call here takes milliseconds, so a
# stop need not wait whole seconds per replica.
SHUTDOWN = {"graceful_shutdown_wait_loop_s": 0.2}


def build_app(cfg: ServeConfig | ServeInputs) -> serve.Application:
    """The Serve application: Encoder + ``cfg.shards`` IndexShards + the Catalog behind the Ingress replicas.

    ``cfg`` may be what :func:`check_inputs` already returned, so a caller
    that checked first (``hashray serve``) does not open the dirs twice. An
    unset shard count is chosen from the codes and the CPUs of the Ray
    (:func:`serve.resources.shard_count`).
    """
    inputs = cfg if isinstance(cfg, ServeInputs) else check_inputs(cfg)
    inputs = with_shards(inputs, ray.cluster_resources() if ray.is_initialized() else {})
    cfg = inputs.cfg
    logging_config = {"enable_access_log": cfg.access_log}
    runtime_env = {"env_vars": REPLICA_ENV}
    encoder = Encoder.options(
        ray_actor_options={
            "num_cpus": cpus(cfg, "encoder_cpus"),
            "num_gpus": cfg.encoder_gpus,
            "runtime_env": runtime_env,
        },
        autoscaling_config={
            "min_replicas": cfg.encoder_min_replicas,
            "max_replicas": cfg.encoder_max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
        },
        max_ongoing_requests=max(cfg.max_batch_size, cfg.max_ongoing_requests),
        logging_config=logging_config,
        **SHUTDOWN,
    ).bind(inputs.run, cfg.max_batch_size, cfg.batch_wait_s)
    shards = [
        IndexShard.options(
            name=f"IndexShard{i}",
            ray_actor_options={"num_cpus": cpus(cfg, "shard_cpus"), "runtime_env": runtime_env},
            max_ongoing_requests=cfg.max_ongoing_requests,
            logging_config=logging_config,
            **SHUTDOWN,
        ).bind(cfg.shard_threads)
        for i in range(cfg.shards)
    ]
    catalog = Catalog.options(
        num_replicas=1,
        ray_actor_options={"num_cpus": CATALOG_CPUS, "runtime_env": runtime_env},
        max_ongoing_requests=CATALOG_ONGOING,
        logging_config=logging_config,
        **SHUTDOWN,
    ).bind(shards, inputs.codes, inputs.run.config.bits)
    return Ingress.options(
        ray_actor_options={"num_cpus": cpus(cfg, "ingress_cpus"), "runtime_env": runtime_env},
        autoscaling_config=ingress_autoscaling(cfg),
        max_ongoing_requests=max(cfg.search_batch_size * SEARCH_BATCHES_IN_FLIGHT, cfg.max_ongoing_requests),
        logging_config=logging_config,
        **SHUTDOWN,
    ).bind(encoder, shards, catalog, inputs)


def ingress_autoscaling(cfg: ServeConfig) -> dict[str, Any]:
    """Serve's autoscaling config of the ingress: replicas between the two flags, by ongoing HTTP requests."""
    return {
        "min_replicas": cfg.ingress_min_replicas,
        "max_replicas": cfg.ingress_max_replicas,
        "target_ongoing_requests": cfg.ingress_target_ongoing_requests,
    }


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point of ``serve deploy``/``serve run``: the config file's ``args`` are ServeConfig fields."""
    known = {field.name for field in dataclasses.fields(ServeConfig)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise HashrayError(f"unknown serve args {unknown}; allowed: {', '.join(sorted(known))}")
    return build_app(ServeConfig(**args))
