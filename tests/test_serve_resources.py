"""Replica requests that fit a local Ray, the one-line refusal, and the progress line (no Ray needed)."""

from __future__ import annotations

import types

import pytest

from models.errors import HashrayError
from serve import resources
from serve.config import ServeConfig, ServeInputs


def config(**fields) -> ServeConfig:
    return ServeConfig(run="r", codes="c", data="d", **{"shards": 1, **fields})


def total(cfg: ServeConfig) -> float:
    return sum(a.cpus * a.replicas for a in resources.asks(cfg))


def test_unset_requests_scale_down_together_to_fit_two_cores():
    fitted = resources.fit(config(shards=2), {"CPU": 2.0})
    assert (fitted.encoder_cpus, fitted.shard_cpus, fitted.ingress_cpus) == (0.8, 0.4, 0.4)
    assert total(fitted) <= 2.0


def test_defaults_that_fit_are_kept():
    fitted = resources.fit(config(shards=2), {"CPU": 16.0})
    assert (fitted.encoder_cpus, fitted.shard_cpus, fitted.ingress_cpus) == (1.0, 0.5, 0.5)


def test_unset_requests_fill_what_the_set_ones_leave():
    fitted = resources.fit(config(shards=4, encoder_cpus=1.0), {"CPU": 2.0})
    assert fitted.encoder_cpus == 1.0
    assert fitted.shard_cpus == fitted.ingress_cpus == 0.2  # 0.5 scaled by (2 - 1) / 2.5
    assert total(fitted) <= 2.0


def test_a_set_request_that_cannot_fit_names_what_is_short():
    with pytest.raises(HashrayError) as caught:
        resources.fit(config(shards=2, encoder_cpus=1.0, shard_cpus=0.5, ingress_cpus=0.5), {"CPU": 2.0})
    message = str(caught.value)
    assert "\n" not in message
    assert "ask 2.5 CPUs" in message and "IndexShard0 0.5" in message and "has 2" in message
    assert "0.5 short" in message and "--shard-cpus" in message


def test_set_requests_that_leave_nothing_for_the_rest_are_refused():
    with pytest.raises(HashrayError, match="short"):
        resources.fit(config(encoder_cpus=2.0), {"CPU": 2.0})


def test_gpus_that_are_not_there_are_refused():
    with pytest.raises(HashrayError, match="--encoder-gpus 1 needs 1 GPU"):
        resources.fit(config(encoder_gpus=1.0), {"CPU": 8.0})


def test_progress_line_names_the_replica_that_waits_and_for_what():
    wanted = resources.asks(resources.fit(config(shards=2), {"CPU": 2.0}))
    starting = {"Encoder": 1, "IndexShard0": 0, "Ingress": 2}
    line = resources.waiting(starting, {"Ingress": 1}, wanted, {"CPU": 0.2}, 12.3)
    assert line == (
        "waiting for replicas (12 s): Encoder: 1 replica starting; "
        "Ingress: 1 replica waiting for 0.4 CPU (0.2 CPU free); Ingress: 1 replica starting"
    )
    assert resources.waiting({"Ingress": 0}, {}, wanted, {"CPU": 0.0}, 1) is None


def test_every_ingress_replica_counts():
    fitted = resources.fit(config(shards=2, ingress_min_replicas=2, ingress_max_replicas=4), {"CPU": 2.0})
    assert (fitted.encoder_cpus, fitted.shard_cpus, fitted.ingress_cpus) == (0.66, 0.33, 0.33)  # 0.5 x 2 of 3 CPUs
    assert total(fitted) <= 2.0
    assert [a for a in resources.asks(fitted) if a.deployment == "Ingress"][0].replicas == 2


@pytest.mark.parametrize(
    ("codes", "cpus", "shards"),
    [(1_000, 2.0, 1), (1_000_000, 2.0, 1), (2_000_001, 2.0, 2), (10_000_000, 2.0, 2), (10_000_000, 16.0, 5)],
)
def test_an_unset_shard_count_is_one_per_two_million_codes_and_at_most_one_per_cpu(codes, cpus, shards):
    assert resources.shard_count(codes, cpus) == shards


def test_a_ray_without_whole_cpus_still_gets_one_shard():
    assert resources.shard_count(10_000_000, 0.5) == 1
    assert resources.shard_count(10_000_000, 0.0) == 1


def test_with_shards_chooses_only_what_the_user_left_unset():
    codes = types.SimpleNamespace(count=10_000_000)
    unset = ServeInputs(ServeConfig(run="r", codes="c", data="d"), run=None, codes=codes, data=None)
    assert resources.with_shards(unset, {"CPU": 2.0}).cfg.shards == 2
    chosen = ServeInputs(config(shards=3), run=None, codes=codes, data=None)
    assert resources.with_shards(chosen, {"CPU": 2.0}).cfg.shards == 3
