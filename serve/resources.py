"""What each replica asks of Ray, made to fit a local Ray, and what the replicas still starting wait for.

A replica whose request does not fit waits for a CPU forever, and Serve says
nothing for its first 30 s: on 2 cores the defaults of ``--shards 2``
(Encoder 1, two shards 0.5 each, ingress 0.5) never became ready. So on a
local start the requests the user left unset are scaled down together until
they fit, and a request the user set that cannot fit stops the start with
one line naming what is short, before anything is deployed. A cluster may
add nodes, so there nothing is scaled or refused.

An unset shard count is chosen here too (:func:`shard_count`), from the
number of codes and the CPUs of the Ray.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

from models.errors import HashrayError
from serve.config import ServeConfig, ServeInputs

# CPUs a replica asks when its flag is unset and the node has room.
DEFAULT_CPUS = {"encoder_cpus": 1.0, "shard_cpus": 0.5, "ingress_cpus": 0.5}
# The catalog asks none: it idles in its followers' long polls and runs a rare
# reload, and a reservation of its own would take CPU from the replicas that search.
CATALOG_CPUS = 0.0
# Codes per shard when --shards is unset. A shard scans its codes on one core,
# so past a couple of million codes one shard per core is what answers fast
# (measured with faiss's scan, when the scan was what a query waited for:
# 10^7 codes on 2 cores served 0.36x of faiss alone with 1 shard, 0.82x with 2).
CODES_PER_SHARD = 2_000_000
# Requests are cut to hundredths of a CPU (Ray's own granularity is 1e-4).
STEP = 0.01


@dataclass(frozen=True)
class Ask:
    """One deployment's request: ``replicas`` replicas of ``cpus`` CPUs and ``gpus`` GPUs each."""

    deployment: str
    replicas: int
    cpus: float
    gpus: float = 0.0


def shard_count(codes: int, cpus: float) -> int:
    """Shards for ``codes`` codes on a Ray of ``cpus`` CPUs: one per :data:`CODES_PER_SHARD`, at most one per whole CPU, at least one."""
    return max(1, min(math.ceil(codes / CODES_PER_SHARD), math.floor(cpus + 1e-9)))


def with_shards(inputs: ServeInputs, resources: Mapping[str, float]) -> ServeInputs:
    """``inputs`` with the shard count chosen by :func:`shard_count` when the user left it unset."""
    if inputs.cfg.shards is not None:
        return inputs
    shards = shard_count(inputs.codes.count, float(resources.get("CPU", 0.0)))
    return dataclasses.replace(inputs, cfg=dataclasses.replace(inputs.cfg, shards=shards))


def cpu_fields(cfg: ServeConfig) -> list[tuple[str, str, int]]:
    """(config field, deployment, replicas that must start) of every CPU request (each ingress replica counts)."""
    shards = [("shard_cpus", f"IndexShard{i}", 1) for i in range(cfg.shards)]
    return [
        ("encoder_cpus", "Encoder", cfg.encoder_min_replicas),
        *shards,
        ("ingress_cpus", "Ingress", cfg.ingress_min_replicas),
    ]


def cpus(cfg: ServeConfig, field: str) -> float:
    """The CPU request of ``field`` (``encoder_cpus``, ...): as set, else its :data:`DEFAULT_CPUS`."""
    value = getattr(cfg, field)
    return DEFAULT_CPUS[field] if value is None else value


def asks(cfg: ServeConfig) -> list[Ask]:
    """Every deployment's request."""
    return [
        Ask(deployment, replicas, cpus(cfg, field), cfg.encoder_gpus if deployment == "Encoder" else 0.0)
        for field, deployment, replicas in cpu_fields(cfg)
    ]


def fit(cfg: ServeConfig, resources: Mapping[str, float]) -> ServeConfig:
    """``cfg`` with its unset CPU requests set so that all replicas fit ``resources`` (Ray's totals).

    Defaults that fit are kept; otherwise they are scaled by one factor into
    what the requests the user set leave. Raises a one-line HashrayError when
    the requests the user set (or the GPUs) do not fit.
    """
    total_cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
    wanted_gpus = cfg.encoder_gpus * cfg.encoder_min_replicas
    if wanted_gpus > gpus:
        raise HashrayError(f"--encoder-gpus {cfg.encoder_gpus:g} needs {wanted_gpus:g} GPU(s); this Ray has {gpus:g}")
    fields = cpu_fields(cfg)
    unset = {f for f, _, _ in fields if getattr(cfg, f) is None}
    fixed = sum(getattr(cfg, f) * n for f, _, n in fields if f not in unset)
    flexible = sum(DEFAULT_CPUS[f] * n for f, _, n in fields if f in unset)
    scale = min(1.0, (total_cpus - fixed) / flexible) if flexible else 1.0
    values = {f: round(math.floor(DEFAULT_CPUS[f] * scale / STEP + 1e-6) * STEP, 2) for f in unset}
    if fixed > total_cpus + 1e-9 or any(v < STEP for v in values.values()):
        raise HashrayError(f"{shortfall(asks(cfg), total_cpus)}; lower --encoder-cpus, --shard-cpus or --ingress-cpus")
    return dataclasses.replace(cfg, **values)


def shortfall(wanted: list[Ask], cpus: float) -> str:
    """One line: what the replicas ask in all, how it is made up, and how much this Ray has."""
    total = sum(a.cpus * a.replicas for a in wanted)
    parts = ", ".join(f"{a.deployment} {a.cpus:g}" + (f" x {a.replicas}" if a.replicas != 1 else "") for a in wanted)
    return f"the replicas ask {total:g} CPUs ({parts}) but this Ray has {cpus:g}, {total - cpus:g} short"


def waiting(
    starting: Mapping[str, int],
    unplaced: Mapping[str, int],
    wanted: list[Ask],
    free: Mapping[str, float],
    seconds: float,
) -> str | None:
    """The progress line while replicas start; None when none is starting.

    Args:
        starting: replicas not yet running, by deployment name.
        unplaced: of those, the replicas Ray has not found room for yet.
        wanted: every deployment's request (:func:`asks`).
        free: the resources Ray has free now.
        seconds: time since the start.
    """
    by_name = {a.deployment: a for a in wanted}
    parts = []
    for deployment, count in starting.items():
        waits = min(unplaced.get(deployment, 0), count)
        ask = by_name.get(deployment)
        if waits and ask is not None:
            needs = f"{ask.cpus:g} CPU" + (f" and {ask.gpus:g} GPU" if ask.gpus else "")
            have = f"{free.get('CPU', 0.0):g} CPU" + (f", {free.get('GPU', 0.0):g} GPU" if ask.gpus else "")
            parts.append(f"{deployment}: {replicas(waits)} waiting for {needs} ({have} free)")
        elif waits:
            parts.append(f"{deployment}: {replicas(waits)} waiting for room on a node")
        if count - waits > 0:
            parts.append(f"{deployment}: {replicas(count - waits)} starting")
    if not parts:
        return None
    return f"waiting for replicas ({seconds:.0f} s): " + "; ".join(parts)


def replicas(count: int) -> str:
    return f"{count} replica" + ("s" if count != 1 else "")
