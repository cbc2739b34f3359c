"""``hashray serve`` as a user runs it: a real subprocess with its own local Ray, stopped by a signal."""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import listeners

from serve import network

HASHRAY = str(Path(sys.executable).parent / "hashray")
READY = "hashray is serving"


class Server:
    """A ``hashray serve`` subprocess whose output lines are collected as they come."""

    def __init__(self, argv: list[str], cwd: str | Path, env: dict[str, str] | None = None) -> None:
        # Its own local Ray, with its own HAProxy side ports (this process's Ray put its ports in os.environ).
        inherited = {"RAY_ADDRESS", *network.SIDE_PORT_ENVS}
        environment = {k: v for k, v in os.environ.items() if k not in inherited}
        environment.update(env or {})
        self.process = subprocess.Popen(
            [HASHRAY, *argv],
            cwd=cwd,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, timeout_s: float) -> bool:
        """Collect output until a line holds ``text`` (True) or the process ends or time runs out (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                continue
            if line is None:
                return False
            self.lines.append(line)
            if text in line:
                return True
        return False

    def output(self) -> str:
        self.wait_for("\0", 0.5)  # whatever has arrived
        return "".join(self.lines)

    def listeners(self) -> list[listeners.Listener]:
        return listeners.listeners_of(self.process.pid)

    def tree(self) -> set[int]:
        return listeners.descendants(self.process.pid)

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 20.0, *, to_thread: bool = False) -> float:
        """Send ``sig`` and return the seconds until the process exited; fails the test past ``timeout_s``.

        ``to_thread``: hand the signal to one of the process's other threads, as
        the kernel may do with a Ctrl-C on a busy machine (Ray starts dozens).
        """
        started = time.monotonic()
        if to_thread:
            send_to_other_thread(self.process.pid, sig)
        else:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"still running {timeout_s:.0f} s after signal {sig}:\n{self.output()[-3000:]}"
            ) from None
        return time.monotonic() - started

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def send_to_other_thread(pid: int, sig: int) -> None:
    """``sig`` to a thread of ``pid`` other than its main thread that does not block it (``tgkill``).

    Such a thread is one the kernel may choose for a signal sent to the process.
    """
    others = [tid for tid in sorted(int(t) for t in os.listdir(f"/proc/{pid}/task")) if tid != pid]
    others = [tid for tid in others if not blocked_signals(pid, tid) >> (sig - 1) & 1]
    assert others, f"process {pid} has no thread besides its main one that takes signal {sig}"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.tgkill(pid, others[-1], sig) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill({pid}, {others[-1]}, {sig}) failed")


def blocked_signals(pid: int, tid: int) -> int:
    """The mask of signals thread ``tid`` of ``pid`` blocks (bit n-1 for signal n), from /proc."""
    status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16)


def stop_and_check_released(server: Server, sig: int = signal.SIGINT, *, to_thread: bool = False) -> float:
    """Stop ``server`` with ``sig``; assert it leaves no process and no listening port behind. Returns the stop time."""
    ports, tree = {listener.port for listener in server.listeners()}, server.tree()
    seconds = server.stop(sig, to_thread=to_thread)
    assert_released(ports, tree, timeout_s=30, after=f"signal {sig}")
    print(f"server stopped {seconds:.1f} s after signal {sig}")
    return seconds


def assert_released(ports: set[int], tree: set[int], *, timeout_s: float, after: str) -> None:
    """Assert that within ``timeout_s`` no socket listens on ``ports`` and no process of ``tree`` runs."""
    held, running = listeners.wait_released(ports, tree, timeout_s=timeout_s)
    assert not held, f"ports still listened on after {after}: {sorted(held)}"
    assert not running, f"processes still running after {after}: {sorted(running)}"
