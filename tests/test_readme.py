"""README commands: every ``hashray`` command parses, and the walkthrough runs as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from hashray.cli import build_parser, main

README = Path(__file__).resolve().parent.parent / "README.md"


def shell_blocks(text: str) -> list[list[str]]:
    """The command lines of every ```sh block, in order."""
    blocks = [block.replace("\\\n", " ") for block in re.findall(r"```sh\n(.*?)```", text, flags=re.DOTALL)]
    return [
        [line.split("  #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]
        for block in blocks
    ]


def hashray_argv(line: str) -> list[str] | None:
    """The hashray arguments of a command line (also inside ``ray job submit ... --``)."""
    words = shlex.split(line)
    if "--" in words and words[0] == "ray":
        words = words[words.index("--") + 1 :]
    return words[1:] if words and words[0] == "hashray" else None


def walkthrough() -> list[list[str]]:
    section = README.read_text().split("## Walkthrough", 1)[1]
    first, second = shell_blocks(section)[:2]
    return [hashray_argv(line) for line in first + second]


def test_every_hashray_command_in_the_readme_parses():
    commands = [argv for block in shell_blocks(README.read_text()) for line in block if (argv := hashray_argv(line))]
    assert len(commands) >= 9
    parser = build_parser()
    for argv in commands:
        args = parser.parse_args(argv)  # an unknown flag or missing argument exits the test
        assert callable(args.handler), argv


@pytest.mark.heavy
def test_walkthrough_runs_as_written(ray_session, tmp_path, monkeypatch, capsys):
    from serve.config import ServeConfig, check_inputs

    *stages, serve_argv = walkthrough()
    assert [argv[0] for argv in stages] == ["ingest", "train", "encode", "encode", "evaluate"]
    monkeypatch.chdir(tmp_path)
    for argv in stages:
        assert main(argv) == 0, argv
    printed = capsys.readouterr().out
    assert "ingest: read" in printed and "mAP" in printed
    assert (tmp_path / "build" / "tour" / "eval" / "metrics.json").exists()

    # `hashray serve` blocks; check that its arguments name a servable run, codes and dataset.
    args = build_parser().parse_args(serve_argv)
    check_inputs(ServeConfig(run=args.run, codes=args.codes, data=args.data, shards=args.shards))
