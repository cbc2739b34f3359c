"""Listening TCP sockets of a process tree, read from /proc (Linux): what a server opened, and what it left."""

from __future__ import annotations

import ipaddress
import os
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Listener:
    host: str
    port: int
    inode: int

    @property
    def loopback(self) -> bool:
        address = ipaddress.ip_address(self.host)
        mapped = getattr(address, "ipv4_mapped", None)
        return (mapped or address).is_loopback


def _host(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))  # four little-endian words
    return str(ipaddress.IPv6Address(words))


def all_listeners() -> list[Listener]:
    """Every listening TCP socket of this network namespace."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as file:
            for line in file.readlines()[1:]:
                fields = line.split()
                if fields[3] != "0A":  # LISTEN
                    continue
                address, port = fields[1].rsplit(":", 1)
                found.append(Listener(_host(address), int(port, 16), int(fields[9])))
    return found


def descendants(pid: int) -> set[int]:
    """``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as file:
                    parent = int(file.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, todo = set(), [pid]
    while todo:
        current = todo.pop()
        if current not in tree:
            tree.add(current)
            todo.extend(children.get(current, []))
    return tree


def socket_inodes(pids: set[int]) -> set[int]:
    inodes = set()
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def listeners_of(pid: int) -> list[Listener]:
    """The listening sockets held by ``pid`` and its descendants."""
    inodes = socket_inodes(descendants(pid))
    return [listener for listener in all_listeners() if listener.inode in inodes]


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` that still run (zombies do not count)."""
    running = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as file:
                if file.read().rsplit(")", 1)[1].split()[0] != "Z":
                    running.add(pid)
        except OSError:
            pass
    return running


def wait_released(ports: set[int], pids: set[int], timeout_s: float = 30.0) -> tuple[set[int], set[int]]:
    """Wait until no socket listens on ``ports`` and none of ``pids`` runs; return what is still left."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = {listener.port for listener in all_listeners()} & ports
        running = alive(pids)
        if not (held or running) or time.monotonic() > deadline:
            return held, running
        time.sleep(0.5)
