"""``hashray train``: Ray Train runs on the tiny dataset, resumption, and every bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from faults import FAULT_MARKER, exit_once

from contracts.dataset import DatasetDir
from contracts.fs import join, write_json
from contracts.run import HISTORY_JSON, RunDir
from hashray.cli import main
from models.errors import HashrayError
from models.metrics import mean_average_precision, multi_hot_words
from models.network import ResNetHash
from pipelines.epochs import EpochPlan, LocalEpoch, row_groups
from pipelines.train import TrainConfig, check_numbers, net_config, run, validate
from pipelines.train_loop import build_optimizer, cpu_threads, epoch_data, torch_batches

# Small and fast: 32 px, 16 rows per step, a few validation images.
# 2 CPUs: the workers and the preprocessing actor leave a whole CPU for Parquet reads.
TINY = dict(arch="resnet18", bits=16, batch_size=16, image_size=32, val_queries=8, val_database=32, data_cpus=0.5)


def _checkpoints(run_dir: str) -> list[str]:
    return sorted(p.name for p in Path(run_dir).glob("checkpoint_*") if p.is_dir())


@pytest.mark.heavy
def test_one_worker_run_writes_the_model_and_a_rerun_resumes(ray_session, tiny_dataset, tmp_path) -> None:
    run_dir = str(tmp_path / "run")
    cfg = TrainConfig(data=tiny_dataset, run=run_dir, epochs=1, cpus_per_worker=0.5, **TINY)
    handler = signal.getsignal(signal.SIGINT)
    final = run(cfg)
    assert signal.getsignal(signal.SIGINT) is handler  # Ray Train's own Ctrl-C handler does not outlive the run
    assert final["epoch"] == 1 and 0.0 <= final["val_mAP"] <= 1.0
    assert final["pair_pool"] == TINY["batch_size"]  # one worker: the pool is the batch itself
    opened = RunDir.open(run_dir)
    model, config = opened.load_model(), opened.config
    assert config == net_config(cfg, json.loads(Path(tiny_dataset, "dataset.json").read_text())["classes"])
    assert model.hash_layer.out_features == 16
    history = json.loads(Path(run_dir, HISTORY_JSON).read_text())["epochs"]
    assert [h["epoch"] for h in history] == [1] and history[0]["val_mAP"] == final["val_mAP"]

    before = _checkpoints(run_dir)
    weights_before = torch.load(Path(run_dir, "model.pt"), weights_only=True)
    again = run(dataclasses.replace(cfg, val_queries=0))  # same run dir: resumes a finished run
    assert again["epoch"] == 1 and again["val_mAP"] == final["val_mAP"]
    assert _checkpoints(run_dir) == before  # nothing was trained again
    weights_after = torch.load(Path(run_dir, "model.pt"), weights_only=True)
    assert all(torch.equal(weights_before[k], weights_after[k]) for k in weights_before)


@pytest.mark.heavy
def test_two_workers_pair_across_workers_and_survive_a_killed_worker(ray_session, tiny_dataset, tmp_path) -> None:
    run_dir = str(tmp_path / "run2")
    fault = exit_once(run_dir, epoch=1)  # the last worker dies once at the start of epoch 2
    cfg = TrainConfig(data=tiny_dataset, run=run_dir, epochs=2, workers=2, cpus_per_worker=0.25, max_failures=1, **TINY)
    # The one-worker test covers validation; epoch 1 runs with the backbone frozen.
    cfg = dataclasses.replace(cfg, val_queries=0, freeze_epochs=1)
    final = run(cfg, on_epoch_start=fault)
    assert Path(run_dir, FAULT_MARKER).exists()  # the fault fired
    # Resumed from the epoch-1 checkpoint (not restarted from scratch) and ended at epoch 2.
    assert final["epoch"] == 2 and final["resumed_from"] == 1
    history = json.loads(Path(run_dir, HISTORY_JSON).read_text())["epochs"]
    assert [h["epoch"] for h in history] == [1, 2]
    # Each step paired the local batch with the other worker's batch: twice the rows.
    assert all(h["pair_pool"] == 2 * TINY["batch_size"] for h in history)
    # Frozen epoch: backbone (weights and BatchNorm statistics) untouched, hash layer trained; then both train.
    torch.manual_seed(cfg.seed)
    initial = ResNetHash(cfg.arch, cfg.bits).state_dict()
    epoch1, epoch2 = (
        torch.load(Path(run_dir, c, "checkpoint.pt"), weights_only=True)["model"] for c in _checkpoints(run_dir)
    )
    backbone = [k for k in initial if k.startswith("backbone.")]
    assert all(torch.equal(epoch1[k], initial[k]) for k in backbone)
    assert not torch.equal(epoch1["hash_layer.weight"], initial["hash_layer.weight"])
    assert not torch.equal(epoch2["backbone.conv1.weight"], initial["backbone.conv1.weight"])


@pytest.mark.heavy
def test_a_seed_fixes_the_model_and_validation_reads_only_the_train_split(ray_session, tiny_dataset, tmp_path) -> None:
    # A copy of the dataset without its query and database files: validation must not need them.
    data = tmp_path / "train-only"
    shutil.copytree(tiny_dataset, data)
    for split in ("query", "database"):
        shutil.rmtree(data / split)
    cfg = TrainConfig(data=str(data), run=str(tmp_path / "a"), epochs=2, cpus_per_worker=0.5, **TINY)
    first = run(cfg)
    second = run(dataclasses.replace(cfg, run=str(tmp_path / "b")))
    assert 0.0 <= first["val_mAP"] <= 1.0 and first["val_mAP"] == second["val_mAP"]
    assert first["loss"] == second["loss"]  # the same batches in the same order, the same crops
    weights = [torch.load(Path(tmp_path, name, "model.pt"), weights_only=True) for name in ("a", "b")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_validation_map_is_one_for_perfect_codes_and_lower_for_shuffled_ones() -> None:
    labels = np.eye(4, dtype=np.float32)[[0, 0, 1, 1, 2, 2, 3, 3]]
    codes = np.packbits(np.repeat(labels > 0, 2, axis=1), axis=1)  # 8 bits: two per class
    words = multi_hot_words(labels)
    assert mean_average_precision(codes[::2], words[::2], codes, words) == pytest.approx(1.0)
    shuffled = codes[[0, 2, 4, 6, 1, 3, 5, 7]]
    assert mean_average_precision(codes[::2], words[::2], shuffled, words) < 1.0


def test_training_batches_are_the_rows_as_tensors_in_order_with_the_last_partial_one_dropped(ray_session) -> None:
    import ray

    rows = [
        {"image": np.full((3, 4, 4), i, dtype=np.uint8), "labels": np.eye(3, dtype=np.float32)[i % 3]}
        for i in range(10)
    ]
    dataset = ray.data.from_items(rows, override_num_blocks=3)
    batches = list(torch_batches(dataset, 4, torch.device("cpu"), drop_last=True))
    assert [len(b["image"]) for b in batches] == [4, 4]
    assert all(b["image"].dtype == torch.uint8 and b["labels"].dtype == torch.float32 for b in batches)
    images = torch.cat([b["image"] for b in batches])
    assert images[:, 0, 0, 0].tolist() == list(range(8))
    assert torch.equal(
        torch.cat([b["labels"] for b in batches]), torch.from_numpy(np.eye(3, dtype=np.float32)[np.arange(8) % 3])
    )
    assert [len(b["image"]) for b in torch_batches(dataset, 4, torch.device("cpu"))] == [4, 4, 2]


def test_a_cpu_worker_takes_the_cores_of_its_node_unless_told() -> None:
    cores = len(os.sched_getaffinity(0))
    assert cpu_threads(0, local_workers=1) == cores
    assert cpu_threads(0, local_workers=cores * 2) == 1  # never below one thread
    assert cpu_threads(3, local_workers=1) == 3


def test_the_backbone_rate_follows_the_start_unless_given(tiny_dataset) -> None:
    scratch = TrainConfig(data=tiny_dataset, run="run")
    assert scratch.backbone_ratio == 1.0
    assert dataclasses.replace(scratch, weights="backbone.pt").backbone_ratio == 0.1
    assert dataclasses.replace(scratch, weights="imagenet", backbone_lr_ratio=0.5).backbone_ratio == 0.5
    module = ResNetHash("resnet18", 16)
    optimizer = build_optimizer(module, dataclasses.replace(scratch, weights="backbone.pt", lr=1e-2))
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([1e-3, 1e-2])


def test_batches_are_prepared_in_the_worker_on_cpu_and_by_ray_data_beside_a_gpu(tiny_dataset) -> None:
    cpu = TrainConfig(data=tiny_dataset, run="run")
    assert cpu.data_tasks == 0
    assert dataclasses.replace(cpu, gpu=True).data_tasks == 2
    assert dataclasses.replace(cpu, data_workers=3).data_tasks == 3
    assert dataclasses.replace(cpu, gpu=True, data_workers=0).data_tasks == 0
    plan = EpochPlan(tuple(row_groups(DatasetDir.open(tiny_dataset))), seed=0)
    assert isinstance(epoch_data(plan, cpu, 4, epoch=0, rank=0, workers=1), LocalEpoch)
    with pytest.raises(HashrayError, match="--data-workers must be >= 0"):
        check_numbers(dataclasses.replace(cpu, data_workers=-1))


# ---------------------------------------------------------------- bad input


@pytest.fixture()
def good(tiny_dataset, tmp_path) -> TrainConfig:
    return TrainConfig(data=tiny_dataset, run=str(tmp_path / "run"), **TINY)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"arch": "resnet19"}, "unknown arch 'resnet19'; choose one of resnet18"),
        ({"bits": 12}, "multiple of 8"),
        ({"bits": 0}, "multiple of 8"),
        ({"loss": "triplet"}, "unknown loss 'triplet'; choose one of cosine, dpsh, idhn, hashnet"),
        ({"epochs": 0}, "--epochs must be > 0"),
        ({"threads": -1}, "--threads must be >= 0"),
        ({"backbone_lr_ratio": -0.1}, "--backbone-lr-ratio must be >= 0"),
        ({"image_size": 8}, "--image-size must be at least 32"),
        ({"weights": "/nonexistent/resnet18.pt"}, "does not exist"),
    ],
)
def test_bad_arguments_are_rejected_before_training(good: TrainConfig, change: dict, message: str) -> None:
    with pytest.raises(HashrayError, match=message):
        validate(dataclasses.replace(good, **change))


def test_missing_or_empty_train_split_is_rejected(good: TrainConfig, tmp_path) -> None:
    with pytest.raises(HashrayError, match="dataset.json is missing"):
        validate(dataclasses.replace(good, data=str(tmp_path / "nowhere")))
    empty = tmp_path / "empty"
    empty.mkdir()
    info = json.loads(Path(good.data, "dataset.json").read_text())
    info["splits"]["train"] = 0
    (empty / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(HashrayError, match="split 'train' is empty or missing"):
        validate(dataclasses.replace(good, data=str(empty)))


def test_resuming_with_other_classes_or_network_is_rejected(good: TrainConfig, tmp_path) -> None:
    classes = json.loads(Path(good.data, "dataset.json").read_text())["classes"]
    write_json(join(good.run, "config.json"), net_config(good, classes[::-1]).to_dict())
    with pytest.raises(HashrayError, match="classes .* but run .* was trained on"):
        validate(good)
    write_json(join(good.run, "config.json"), net_config(dataclasses.replace(good, bits=64), classes).to_dict())
    with pytest.raises(HashrayError, match="bits 64 -> 16"):
        validate(good)


def test_weights_that_do_not_match_the_arch_are_rejected(good: TrainConfig, tmp_path) -> None:
    path = tmp_path / "resnet34.pt"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(HashrayError, match="is not a resnet18 state_dict"):
        validate(dataclasses.replace(good, weights=str(path)))


def test_cli_prints_one_line_and_exits_2(good: TrainConfig, tmp_path, capsys) -> None:
    code = main(["train", "--data", good.data, "--run", good.run, "--bits", "12"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hashray train: error:") and "multiple of 8" in err and "\n" not in err
    shutil.rmtree(good.run, ignore_errors=True)
