"""Two emulated hosts on one machine: network namespaces joined by a veth pair.

Two processes on localhost talk through loopback, and so do the devices of
one process: gloo carries every collective over TCP, also between devices
of the same process. Throttling loopback would slow both levels alike. Here
each process gets its own network namespace (`ip netns`), so traffic inside
a process stays on that namespace's loopback (not throttled) and traffic
between the processes crosses the veth pair, whose rate a token-bucket qdisc
(`tc ... tbf`) can cap in each direction: a data-centre-like two-level
network, with a slow link between hosts.

Each namespace's `/etc/hosts` (`/etc/netns/NAME/hosts`, which `ip netns
exec` mounts) maps this machine's hostname to the namespace's own address,
which gloo binds. Needs root and iproute2; everything is removed when the
block exits (callers turn SIGTERM into an exit, as train_throughput.py does).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from typing import Iterator

NAMES = ("jdmt-h0", "jdmt-h1")
ADDRESSES = ("10.77.0.1", "10.77.0.2")
VETH = ("jdmt-v0", "jdmt-v1")


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def available() -> str | None:
    """None if the namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc)"
    return None


def teardown() -> None:
    """Remove the namespaces (their veth ends go with them) and hosts files."""
    for name in NAMES:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)


@contextlib.contextmanager
def two_hosts(mbit: int | None) -> Iterator[tuple[list[list[str]], str]]:
    """Make the two namespaces, the link capped at `mbit` Mbit/s per direction
    (None: not capped). Yields (the command prefix of each host's process,
    host 0's address for the coordinator)."""
    why = available()
    if why:
        raise SystemExit(f"two emulated hosts: {why}")
    teardown()  # leftovers of an interrupted run
    try:
        for name in NAMES:
            _run("ip", "netns", "add", name)
        _run("ip", "link", "add", VETH[0], "type", "veth", "peer", "name", VETH[1])
        host = socket.gethostname()
        for name, dev, addr in zip(NAMES, VETH, ADDRESSES):
            _run("ip", "link", "set", dev, "netns", name)
            _run("ip", "-n", name, "addr", "add", f"{addr}/24", "dev", dev)
            _run("ip", "-n", name, "link", "set", "lo", "up")
            _run("ip", "-n", name, "link", "set", dev, "up")
            if mbit:
                # the bucket holds ~10 ms of traffic (and at least a 64 KiB packet);
                # the queue up to 500 ms, so TCP is slowed, not dropped
                burst = max(256 * 1024, mbit * 1_000_000 // 8 // 100)
                _run("tc", "-n", name, "qdisc", "add", "dev", dev, "root", "tbf",
                     "rate", f"{mbit}mbit", "burst", str(burst), "latency", "500ms")
            os.makedirs(f"/etc/netns/{name}", exist_ok=True)
            with open(f"/etc/netns/{name}/hosts", "w") as f:
                f.write(f"127.0.0.1 localhost\n{addr} {host}\n")
        yield [["ip", "netns", "exec", name] for name in NAMES], ADDRESSES[0]
    finally:
        teardown()


__all__ = ["available", "teardown", "two_hosts"]
