"""The ``hashray`` sub-commands: one parser and one handler per stage.

Each parser is generated from the stage's config dataclass
(:mod:`hashray.flags`); each handler builds that config from the parsed
flags, checks what can be checked before Ray starts, starts or joins Ray and
calls the stage's ``run``. Handlers return the exit code; a ``HashrayError``
they raise becomes one line on stderr in :func:`hashray.cli.main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from hashray import demo
from hashray.flags import add_config_flags, config_from_args
from pipelines import encode, evaluate, ingest, train
from pipelines.runtime import init_ray
from serve import config as serve_config
from serve import start as serve_start

Subparsers = argparse._SubParsersAction
SAMPLED_SOURCES = ("coco", "folder")
SOURCE_HELP = {
    "synthetic": "the built-in procedurally drawn multi-label data set",
    "txtlist": "list files `relative/path.jpg 0 1 0 ... 1` per split",
    "coco": "image folder + COCO instances_*.json",
    "folder": "image folder + CSV with columns path,labels (labels joined by |)",
}
SOURCE_DESCRIPTION = {
    "synthetic": "Draw the built-in data set: each class is a shape x colour x texture object kind; 1-5 objects "
    "per image over clutter; long-tailed class frequencies. Train row i is database row i (same id).",
}
# What --train/--query/--database count, per source (one docstring entry cannot say it per source).
SYNTHETIC_SPLIT_HELP = {
    "train": "train rows: the first N database rows, same ids",
    "query": "query rows, never in the database",
    "database": "database rows",
}
SAMPLED_SPLIT_HELP = {
    "train": "random database rows also used for training",
    "query": "random good rows held out as queries; the rest are the database",
}
CLASSES_HELP = {
    "txtlist": "class names, one per line (default: class_0, class_1, ...)",
    "folder": "class names, one per line (default: the names found, sorted)",
}


def add_commands(subparsers: Subparsers) -> None:
    """Every sub-command, in the order ``hashray --help`` lists them."""
    for add in (add_ingest, add_train, add_encode, add_evaluate, add_serve, add_demo):
        add(subparsers)


# ---------------------------------------------------------------- ingest


def add_ingest(subparsers: Subparsers) -> None:
    """``hashray ingest {synthetic,txtlist,coco,folder} ...``: one sub-command per source."""
    parser = subparsers.add_parser(
        "ingest",
        help="raw images + labels -> dataset dir (Parquet)",
        description="Write a dataset dir (train/, query/, database/ Parquet + dataset.json) from a source. "
        "Bad rows are skipped and listed with their reason in DIR/rejects.jsonl.",
    )
    sources = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for source in ingest.SOURCES:
        sub = sources.add_parser(source, help=SOURCE_HELP[source], description=SOURCE_DESCRIPTION.get(source))
        add_config_flags(
            sub, ingest.IngestConfig, skip=["source", *unused_ingest_fields(source)], **ingest_flag_options(source)
        )
    parser.set_defaults(handler=run_ingest)


def unused_ingest_fields(source: str) -> list[str]:
    """IngestConfig fields whose ``metadata["sources"]`` leaves ``source`` out."""
    return [
        f.name for f in dataclasses.fields(ingest.IngestConfig) if source not in f.metadata.get("sources", (source,))
    ]


def ingest_flag_options(source: str) -> dict[str, Any]:
    """The per-source ``defaults``, ``helps`` and ``required`` of :func:`add_config_flags`."""
    helps = {"classes_file": CLASSES_HELP[source]} if source in CLASSES_HELP else {}
    if source == "synthetic":
        return {"defaults": ingest.SYNTHETIC_SIZES, "helps": SYNTHETIC_SPLIT_HELP}
    if source in SAMPLED_SOURCES:
        file_field = "annotations" if source == "coco" else "csv"
        return {"defaults": {"train": 0}, "helps": {**SAMPLED_SPLIT_HELP, **helps}, "required": [file_field, "query"]}
    return {"helps": helps}


def run_ingest(args: argparse.Namespace) -> int:
    cfg = config_from_args(ingest.IngestConfig, args)
    ingest.check_config(cfg)  # fail fast, before a Ray cluster is started
    init_ray(args.address)
    print(ingest.format_summary(ingest.run(cfg)))
    return 0


# ---------------------------------------------------------------- train, encode, evaluate


def summary(module_doc: str | None) -> str:
    """The first paragraph of a stage module's docstring, as terminal text."""
    return (module_doc or "").split("\n\n")[0].replace("``", "")


def add_train(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="fine-tune a ResNet hash network on Ray Train", description=summary(train.__doc__)
    )
    add_config_flags(parser, train.TrainConfig)
    parser.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(train.TrainConfig, args)
    checked = train.validate(cfg)  # fail fast, before a Ray cluster is started
    init_ray(args.address)
    final = train.fit(cfg, *checked)
    print(
        f"trained {cfg.run}: epoch {final.get('epoch')}, loss {final.get('loss', float('nan')):.4f}, "
        f"val mAP {final.get('val_mAP', float('nan')):.4f}"
    )
    return 0


def add_encode(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "encode",
        help="encode a dataset split into a codes dir (Ray Data actor pool)",
        description=summary(encode.__doc__),
    )
    add_config_flags(parser, encode.EncodeConfig)
    parser.set_defaults(handler=run_encode)


def run_encode(args: argparse.Namespace) -> int:
    cfg = config_from_args(encode.EncodeConfig, args)
    init_ray(args.address)
    manifest = encode.run(cfg)
    print(f"{manifest['count']} codes of {manifest['bits']} bits in {cfg.out}")
    return 0


def add_evaluate(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="mAP/NDCG/ACG/WAP@K and PR curves of query codes against database codes",
        description=summary(evaluate.__doc__),
    )
    add_config_flags(parser, evaluate.EvaluateConfig)
    parser.set_defaults(handler=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    print(evaluate.format_table(evaluate.run(config_from_args(evaluate.EvaluateConfig, args))))
    return 0


# ---------------------------------------------------------------- serve, demo


def add_serve(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="answer image queries over HTTP (Ray Serve)",
        description="Start the retrieval service: the HTTP API and the web page at http://HOST:PORT/.",
    )
    token_help = (
        f"require this X-Admin-Token header on POST /admin/reload (default: ${serve_config.ADMIN_TOKEN_ENV}; "
        "when neither is set, reloading needs no token)"
    )
    add_config_flags(parser, serve_config.ServeConfig, helps={"admin_token": token_help})
    parser.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    # The token is read from the environment here, not by ServeConfig: a deployed
    # app (serve/config.yaml) takes it from its own args only.
    cfg = config_from_args(
        serve_config.ServeConfig, args, admin_token=args.admin_token or os.environ.get(serve_config.ADMIN_TOKEN_ENV)
    )
    inputs = serve_config.check_inputs(cfg)  # each dir opened once, here; the replicas get the opened dirs
    serve_start.use_fast_http()  # Serve's HTTP settings go into the environment before Ray starts
    local = init_ray(args.address, metrics_port=cfg.metrics_port)
    serve_start.run(inputs, local=local)
    return 0


def add_demo(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the whole pipeline on the built-in synthetic data set",
        description="Ingest the synthetic data set, train, encode, evaluate (metrics table + plots), then serve the "
        "web page. Finished stages are reused on a second run.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny version (about a minute on a laptop), for smoke tests; flags given with it win",
    )
    add_config_flags(
        parser,
        demo.DemoConfig,
        presets={"--quick": demo.QUICK},
        helps={"gpu": "train and encode on one GPU (default: when torch sees one)"},
    )
    parser.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    cfg = config_from_args(demo.DemoConfig, args, base=demo.preset(args.quick))
    demo.check_config(cfg)  # fail fast, before a Ray cluster is started
    if cfg.serve:
        serve_start.use_fast_http()  # Serve's HTTP settings go into the environment before Ray starts
    local = init_ray(args.address)
    demo.run(cfg)
    if cfg.serve:
        demo.serve_demo(cfg, local=local)
    return 0
