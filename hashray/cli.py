"""The ``hashray`` command: global flags, one sub-command per stage (:mod:`hashray.commands`).

User errors (``HashrayError``, also when Ray wrapped one in its own exception)
become one line ``hashray COMMAND: error: ...`` on stderr and exit code 2, so
a typo in a path never shows a traceback; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import sys

from hashray.commands import add_commands
from models.errors import HashrayError, find_cause


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hashray",
        description="Deep-hashing retrieval for multi-label images on Ray: "
        "ingest -> train -> encode -> evaluate -> serve.",
    )
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def user_error(error: BaseException) -> HashrayError | None:
    """The HashrayError behind ``error``, also when Ray wrapped it in its own exception (a task's, a worker's)."""
    cause = find_cause(error, HashrayError)
    return cause if isinstance(cause, HashrayError) else None


def main(argv: list[str] | None = None) -> int:
    from pipelines.runtime import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("hashray: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        cause = user_error(error)
        if cause is None:
            raise
        message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        print(f"hashray {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
