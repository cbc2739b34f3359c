"""Starts HAProxy for Ray Serve on this machine: side pages on loopback, and death with its parent.

Ray runs this in place of the HAProxy binary (see :mod:`serve.network`)
with HAProxy's own arguments. It rewrites the config named by ``-f`` with the
stats and Prometheus frontends bound to loopback (Ray's template binds them
on every interface; the HTTP frontend keeps the host the user chose), asks
the kernel to kill HAProxy when the process that started it dies (Ray's
manager actor, which dies with its Ray), and then becomes HAProxy. Only the
standard library: it runs at every HAProxy start and reload.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import sys

LOOPBACK = "127.0.0.1"
REAL_BINARY_ENV = "HASHRAY_HAPROXY_BINARY"
# The sections of Ray's template that serve HAProxy's own pages.
SIDE_SECTIONS = {"frontend prometheus", "listen stats"}
BIND = re.compile(r"^(\s+bind\s+)(?:\*|0\.0\.0\.0|\[?::\]?)?:(\d+)")
PR_SET_PDEATHSIG = 1


def loopback_config(text: str) -> str:
    """``text`` (an HAProxy config) with every bind of :data:`SIDE_SECTIONS` on loopback."""
    lines, section = [], ""
    for line in text.splitlines(keepends=True):
        if line.strip() and not line[0].isspace():
            section = " ".join(line.split())
        if section in SIDE_SECTIONS:
            line = BIND.sub(rf"\g<1>{LOOPBACK}:\g<2>", line)
        lines.append(line)
    return "".join(lines)


def bind_side_pages_to_loopback(args: list[str]) -> None:
    """Rewrite the config after ``-f`` in place (Ray finds its HAProxy processes by that path in their command line).

    Ray writes the file afresh before every start, so every start rewrites it.
    """
    if "-f" not in args[:-1]:
        return
    path = args[args.index("-f") + 1]
    with open(path, encoding="utf-8") as file:
        text = loopback_config(file.read())
    partial = f"{path}.{os.getpid()}"
    with open(partial, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(partial, path)


def die_with_parent() -> None:
    """SIGKILL this process (and what it execs) when its parent dies; Linux only, elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died before the call
            os._exit(1)


def main() -> None:
    binary = os.environ[REAL_BINARY_ENV]
    bind_side_pages_to_loopback(sys.argv[1:])
    die_with_parent()
    os.execv(binary, [binary, *sys.argv[1:]])


if __name__ == "__main__":
    main()
