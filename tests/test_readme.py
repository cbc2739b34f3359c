"""README commands: every ``hashray`` command parses, and the walkthrough runs as written."""

from __future__ import annotations

import re
import shlex
import signal
from pathlib import Path

import httpx
import pytest
import serve_support as support
from serve_process import READY, Server, stop_and_check_released

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
    *stages, serve_argv = walkthrough()
    assert [argv[0] for argv in stages] == ["ingest", "train", "encode", "encode", "evaluate"]
    monkeypatch.chdir(tmp_path)
    for argv in stages:
        assert main(argv) == 0, argv
    printed = capsys.readouterr().out
    assert "ingest: read" in printed and "mAP" in printed
    assert (tmp_path / "build" / "tour" / "eval" / "metrics.json").exists()

    # `hashray serve` as written (default resources), a process of its own: ready on this
    # 2-core machine, loopback only, and Ctrl-C stops it leaving no process or port behind.
    assert "--encoder-cpus" not in serve_argv and "--port" not in serve_argv
    port = support.free_port()
    server = Server([*serve_argv, "--port", str(port)], tmp_path)
    try:
        assert server.wait_for(READY, 240), server.output()[-3000:]
        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).json()
        assert health["shards"] == 2 and health["codes"] == 600
        assert [listener for listener in server.listeners() if not listener.loopback] == []
        assert stop_and_check_released(server, signal.SIGINT) < 20
    finally:
        server.kill()
