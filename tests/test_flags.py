"""hashray.flags: argparse flags generated from config dataclasses, and every sub-command's --help."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from hashray.cli import build_parser
from hashray.flags import add_config_flags, config_from_args, docstring_args, flag_name


@dataclass(frozen=True)
class Example:
    """A config as the stages write them.

    Args:
        data: dataset dir.
        batch_size: images per step; a long help that
            goes on over a second line.
        lr, momentum: optimiser settings.
        mode: how to run.
        gpu: run on a GPU.
        name: run name (default: the dataset's name).
        train_list: list file of the train split.
        note: free text.

    Returns:
        Not an argument: the section ends above.
    """

    data: str
    batch_size: int = 32
    lr: float = 0.003
    momentum: float = 0.9
    mode: str = field(default="fast", metadata={"choices": ("fast", "exact")})
    gpu: bool = False
    name: str | None = None
    train_list: str | None = field(default=None, metadata={"flag": "--train"})
    note: str = "100%"


def parser_for(**options) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="example")
    add_config_flags(parser, Example, **options)
    return parser


def helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    return {action.dest: action.help % {} for action in parser._actions if action.dest != "help"}


def test_flag_names_follow_the_field_names():
    assert flag_name("batch_size") == "--batch-size"
    args = parser_for().parse_args(["--data", "d", "--batch-size", "8", "--train", "t.txt"])
    assert (args.batch_size, args.train_list) == (8, "t.txt")


def test_values_get_the_type_of_the_annotation():
    args = parser_for().parse_args(["--data", "d", "--batch-size", "8", "--lr", "1e-2", "--name", "x"])
    assert (args.batch_size, args.lr, args.name) == (8, 0.01, "x")
    assert isinstance(args.batch_size, int) and isinstance(args.lr, float)
    with pytest.raises(SystemExit):
        parser_for().parse_args(["--data", "d", "--batch-size", "eight"])


def test_defaults_come_from_the_dataclass_a_base_instance_or_the_parser():
    assert parser_for().parse_args(["--data", "d"]) == argparse.Namespace(
        data="d", batch_size=32, lr=0.003, momentum=0.9, mode="fast", gpu=False, name=None, train_list=None, note="100%"
    )
    base = Example(data="d", batch_size=4)
    assert parser_for(base=base).parse_args([]).batch_size == 4
    assert parser_for(defaults={"batch_size": 2}).parse_args(["--data", "d"]).batch_size == 2


def test_help_comes_from_the_args_section_and_ends_with_the_default():
    shown = helps(parser_for())
    assert shown["data"] == "dataset dir."  # required: no default to show
    assert shown["batch_size"] == "images per step; a long help that goes on over a second line (default: 32)"
    assert shown["lr"] == "optimiser settings (default: 0.003)"
    assert shown["momentum"] == "optimiser settings (default: 0.9)"
    assert shown["gpu"] == "run on a GPU (default: --no-gpu)"
    assert shown["name"] == "run name (default: the dataset's name)."  # a help that states its default keeps it
    assert shown["train_list"] == "list file of the train split (default: none)"
    assert shown["note"] == "free text (default: 100%)"  # argparse's %-formatting does not trip on it


def test_help_overrides_and_a_missing_help_is_an_error():
    assert helps(parser_for(helps={"mode": "speed or accuracy"}))["mode"] == "speed or accuracy (default: fast)"

    @dataclass(frozen=True)
    class Undocumented:
        """No Args: section."""

        size: int = 1

    with pytest.raises(TypeError, match="Undocumented.size has no help"):
        add_config_flags(argparse.ArgumentParser(), Undocumented)


def test_docstring_args_reads_entries_continuations_and_stops_at_the_next_section():
    parsed = docstring_args(Example.__doc__)
    assert set(parsed) == {"data", "batch_size", "lr", "momentum", "mode", "gpu", "name", "train_list", "note"}
    assert docstring_args("No sections.") == {}
    assert docstring_args("x.\n\nArgs:\n    a: uses ``code``.\n") == {"a": "uses code."}


def test_choices_are_enforced_by_argparse():
    assert parser_for().parse_args(["--data", "d", "--mode", "exact"]).mode == "exact"
    with pytest.raises(SystemExit):
        parser_for().parse_args(["--data", "d", "--mode", "slow"])


def test_bool_fields_take_both_switches():
    assert parser_for().parse_args(["--data", "d", "--gpu"]).gpu is True
    assert parser_for(base=Example(data="d", gpu=True)).parse_args(["--no-gpu"]).gpu is False


def test_fields_without_default_and_marked_fields_are_required():
    with pytest.raises(SystemExit):
        parser_for().parse_args([])
    with pytest.raises(SystemExit):
        parser_for(required=["name"]).parse_args(["--data", "d"])
    assert parser_for(required=["name"]).parse_args(["--data", "d", "--name", "n"]).name == "n"


def test_rename_and_skip():
    parser = parser_for(rename={"batch_size": "--bs"}, skip=["note", "momentum"])
    args = parser.parse_args(["--data", "d", "--bs", "3"])
    assert args.batch_size == 3 and not hasattr(args, "note") and not hasattr(args, "momentum")
    with pytest.raises(SystemExit):
        parser.parse_args(["--data", "d", "--batch-size", "3"])


def test_config_from_args_builds_the_dataclass_with_overrides_and_skipped_defaults():
    args = parser_for(skip=["note"]).parse_args(["--data", "d", "--lr", "0.5"])
    args.handler = print  # not a field: ignored
    assert config_from_args(Example, args, name="n") == Example(data="d", lr=0.5, name="n")


def test_presets_lay_only_the_given_flags_over_the_preset():
    quick = Example(data="q", batch_size=2)
    parser = parser_for(presets={"--quick": quick})
    assert helps(parser)["batch_size"].endswith("(default: 32; 2 with --quick)")
    assert helps(parser)["lr"].endswith("(default: 0.003)")  # the preset changes nothing here
    args = parser.parse_args(["--data", "d", "--lr", "0.1"])
    assert config_from_args(Example, args, base=quick) == Example(data="d", batch_size=2, lr=0.1)


# ---------------------------------------------------------------- the hashray parsers


def all_parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every (sub-)parser of ``parser``, by its command words."""
    found = {path: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= all_parsers(sub, (*path, name))
    return found


def test_every_sub_command_help_shows_a_default_for_every_optional_flag():
    parsers = all_parsers(build_parser())
    assert {("ingest", s) for s in ("synthetic", "txtlist", "coco", "folder")} | {
        (c,) for c in ("train", "encode", "evaluate", "serve", "demo")
    } <= set(parsers)
    for path, parser in parsers.items():
        if not path:
            continue  # hashray's own --address/--verbose
        text = parser.format_help()  # formats every help string: a stray % fails here
        for action in parser._actions:
            if (
                action.required
                or action.help is None
                or isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
            ):
                continue
            if action.dest == "quick":
                continue  # selects a preset; it is the other flags' defaults that it changes
            assert "(default:" in action.help, (path, action.option_strings)
        assert text


@pytest.mark.parametrize(
    "source, flags",
    [
        (
            "synthetic",
            {
                "--out",
                "--seed",
                "--strict",
                "--name",
                "--train",
                "--query",
                "--database",
                "--image-size",
                "--num-classes",
                "--max-pixels",
                "--rows-per-file",
                "--num-cpus",
            },
        ),
        (
            "txtlist",
            {
                "--out",
                "--seed",
                "--strict",
                "--name",
                "--train",
                "--query",
                "--database",
                "--root",
                "--classes",
                "--max-pixels",
                "--rows-per-file",
                "--num-cpus",
            },
        ),
        (
            "coco",
            {
                "--out",
                "--seed",
                "--strict",
                "--name",
                "--train",
                "--query",
                "--root",
                "--annotations",
                "--max-pixels",
                "--rows-per-file",
                "--num-cpus",
            },
        ),
        (
            "folder",
            {
                "--out",
                "--seed",
                "--strict",
                "--name",
                "--train",
                "--query",
                "--root",
                "--classes",
                "--csv",
                "--max-pixels",
                "--rows-per-file",
                "--num-cpus",
            },
        ),
    ],
)
def test_ingest_sources_offer_their_own_flags(source, flags):
    parser = all_parsers(build_parser())[("ingest", source)]
    offered = {option for action in parser._actions for option in action.option_strings if option.startswith("--")}
    assert offered - {"--help", "--no-strict"} == flags


def test_ingest_flags_mean_what_each_source_needs():
    parser = build_parser()
    synthetic = parser.parse_args(["ingest", "synthetic", "--out", "o"])
    assert (synthetic.train, synthetic.query, synthetic.database) == (2000, 200, 4000)
    txtlist = parser.parse_args(["ingest", "txtlist", "--out", "o", "--train", "t.txt", "--classes", "c.txt"])
    assert (txtlist.train_list, txtlist.classes_file) == ("t.txt", "c.txt")
    coco = parser.parse_args(["ingest", "coco", "--out", "o", "--annotations", "a.json", "--query", "5"])
    assert (coco.train, coco.query, coco.annotations) == (0, 5, "a.json")
    with pytest.raises(SystemExit):
        parser.parse_args(["ingest", "folder", "--out", "o", "--csv", "f.csv"])  # --query is required


def test_choices_of_train_and_encode_are_enforced():
    parser = build_parser()
    assert parser.parse_args(["train", "--data", "d", "--run", "r", "--loss", "classify"]).loss == "classify"
    for argv in (
        ["train", "--data", "d", "--run", "r", "--loss", "nope"],
        ["train", "--data", "d", "--run", "r", "--arch", "vgg"],
        ["encode", "--run", "r", "--data", "d", "--split", "val", "--out", "o"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


def test_demo_flags_override_the_quick_preset():
    from hashray.commands import run_demo
    from hashray.demo import QUICK, DemoConfig, preset
    from hashray.flags import config_from_args

    args = build_parser().parse_args(["demo", "--quick", "--epochs", "3", "--no-serve", "--no-gpu"])
    assert args.handler is run_demo
    cfg = config_from_args(DemoConfig, args, base=preset(args.quick))
    assert cfg == DemoConfig(**{**vars(QUICK), "epochs": 3, "serve": False, "gpu": False})
    full = config_from_args(DemoConfig, build_parser().parse_args(["demo", "--gpu"]), base=preset(False))
    assert (full.out, full.epochs, full.gpu, full.serve) == ("build/demo", DemoConfig().epochs, True, True)
