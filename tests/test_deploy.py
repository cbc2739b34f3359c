"""The cluster files: cluster.yaml against Ray's own schema, KubeRay manifests by kind."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from hashray.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_cluster_yaml_matches_the_schema_shipped_with_ray():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = load_yaml(ROOT / "cluster.yaml")
    jsonschema.validate(config, schema)


def test_cluster_yaml_has_a_cpu_head_that_runs_no_work_and_autoscaling_gpu_workers():
    config = load_yaml(ROOT / "cluster.yaml")
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and "GPU" not in head["resources"]
    workers = [node for name, node in nodes.items() if name != config["head_node_type"]]
    assert any(node["resources"].get("GPU", 0) >= 1 and node["min_workers"] < node["max_workers"] for node in workers)
    assert any("pip install" in command for command in config["setup_commands"])


def test_cluster_yaml_is_rejected_by_the_schema_when_broken():
    """The schema check above can fail: a misspelt top-level key is refused."""
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = load_yaml(ROOT / "cluster.yaml")
    config["max_worker"] = config.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)


@pytest.mark.parametrize(
    "name, kind", [("rayjob-train.yaml", "RayJob"), ("rayjob-encode.yaml", "RayJob"), ("rayservice.yaml", "RayService")]
)
def test_k8s_manifests_parse_with_the_expected_kind(name, kind):
    manifest = load_yaml(K8S / name)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == kind
    cluster = manifest["spec"]["rayClusterSpec" if kind == "RayJob" else "rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cluster["workerGroupSpecs"]


@pytest.mark.parametrize("name", ["rayjob-train.yaml", "rayjob-encode.yaml"])
def test_rayjob_entrypoints_are_valid_hashray_commands(name):
    entrypoint = shlex.split(load_yaml(K8S / name)["spec"]["entrypoint"])
    assert entrypoint[0] == "hashray"
    args = build_parser().parse_args(entrypoint[1:])  # exits (SystemExit) on an unknown flag
    assert args.gpu


def test_rayservice_serve_config_builds_a_hashray_app_config():
    """Both Serve configs pass Ray's own schema, name our app builder and only ServeConfig fields."""
    import dataclasses

    from ray.serve.schema import ServeDeploySchema

    from serve.config import ServeConfig

    serve_config = yaml.safe_load(load_yaml(K8S / "rayservice.yaml")["spec"]["serveConfigV2"])
    local = load_yaml(ROOT / "serve" / "config.yaml")
    fields = {field.name for field in dataclasses.fields(ServeConfig)}
    for config in (serve_config, local):
        ServeDeploySchema.model_validate(config)
        (application,) = config["applications"]
        assert application["import_path"] == "serve.app:app_builder"
        assert set(application["args"]) <= fields
        assert {"run", "codes", "data"} <= set(application["args"])
