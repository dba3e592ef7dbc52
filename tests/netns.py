"""Test hosts made of Linux network namespaces: each "node" has its own network stack, interface and address.

``Hosts(n)`` creates ``n`` namespaces in a star: node ``i > 0`` is joined to node 0 by its own veth pair, with
addresses ``10.231.<i>.1`` (node 0's side) and ``10.231.<i>.2`` (node i's side). With two nodes that is one link, ``10.231.1.1 <-> 10.231.1.2``. Nothing is
routed out of the namespaces: they have no default route, so no packet can leave them.

Needs root and iproute2 (``ip``); :func:`skip_reason` says why not, for ``pytest.skip``. Everything created is
removed by :meth:`Hosts.close` (the namespaces, and with them their interfaces and qdiscs).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import uuid


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "network-namespace hosts need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "network-namespace hosts need iproute2 (`apt-get install iproute2`)"
    name = f"sftprobe{uuid.uuid4().hex[:6]}"
    r = _ip("netns", "add", name, check=False)
    if r.returncode != 0:
        return f"`ip netns add` fails here: {r.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


class Hosts:
    def __init__(self, n: int = 2):
        tag = uuid.uuid4().hex[:5]
        self.names = [f"sft{tag}n{i}" for i in range(n)]
        self.extra: list[str] = []  # more namespaces (dead ends)
        self.links: dict[int, tuple[str, str]] = {}  # node i -> (node 0's side, node i's side) interface names
        try:
            for ns in self.names:
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            for i in range(1, n):
                hub, leaf = f"sv{tag}{i}a", f"sv{tag}{i}b"  # <= 15 characters
                _ip("link", "add", hub, "type", "veth", "peer", "name", leaf)
                _ip("link", "set", hub, "netns", self.names[0])
                _ip("link", "set", leaf, "netns", self.names[i])
                _ip("-n", self.names[0], "addr", "add", f"10.231.{i}.1/24", "dev", hub)
                _ip("-n", self.names[i], "addr", "add", f"10.231.{i}.2/24", "dev", leaf)
                _ip("-n", self.names[0], "link", "set", hub, "up")
                _ip("-n", self.names[i], "link", "set", leaf, "up")
                self.links[i] = (hub, leaf)
        except Exception:
            self.close()
            raise
        self.tag = tag
        atexit.register(self.close)  # also when the test process ends without running fixture teardown

    # ----------------------------------------------------------------------------------------- facts
    def addr(self, node: int, peer: int = 1) -> str:
        """Node ``node``'s address on its link (node 0: its address on the link to ``peer``)."""
        return f"10.231.{peer}.1" if node == 0 else f"10.231.{node}.2"

    def iface(self, node: int, peer: int = 1) -> str:
        return self.links[peer][0] if node == 0 else self.links[node][1]

    def prefix(self, node: int) -> list[str]:
        """The command prefix that runs a program on ``node``."""
        return ["ip", "netns", "exec", self.names[node]]

    # ----------------------------------------------------------------------------------------- changes
    def add_dead_end(self, node: int) -> str:
        """A second interface on ``node``: a veth whose other end sits in a namespace with nothing in it. Returns
        its name (address ``10.232.<node>.2/24``)."""
        dead = f"sft{self.tag}d{node}"
        self.extra.append(dead)
        _ip("netns", "add", dead)
        here, there = f"sx{self.tag}{node}a", f"sx{self.tag}{node}b"
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        _ip("link", "set", here, "netns", self.names[node])
        _ip("link", "set", there, "netns", dead)
        _ip("-n", self.names[node], "addr", "add", f"10.232.{node}.2/24", "dev", here)
        _ip("-n", self.names[node], "link", "set", here, "up")
        _ip("-n", dead, "link", "set", there, "up")
        return here

    def set_link(self, node: int, up: bool) -> None:
        """Cut (or restore) node ``node``'s link to node 0, on node ``node``'s side."""
        _ip("-n", self.names[node], "link", "set", self.links[node][1], "up" if up else "down")

    def sysctl(self, key: str, value: str) -> None:
        """Set a per-namespace network sysctl on every node (e.g. ``net.ipv4.tcp_slow_start_after_idle``)."""
        for ns in self.names:
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}"], check=True,
                           capture_output=True, text=True)

    def cap(self, node: int, rate: str, burst: str = "64kb") -> None:
        """A token-bucket bandwidth cap (``tbf``, e.g. ``rate='100mbit'``) on both ends of node ``node``'s link.

        A real link has no bucket: it sends at line rate from the first byte. tbf lets ``burst`` bytes through at
        veth speed after every idle spell, and a training step idles the link for its whole compute phase, so a
        large bucket makes the link faster for training than for a back-to-back benchmark (256 KB, the old value,
        passed a quarter of a 1 MiB all-reduce free: ~21 ms a step at 100 Mbit/s). 64 KB is 5 ms of line time at
        100 Mbit/s and 0.5 ms at 1 Gbit/s; smaller (16 KB) held a 1 Gbit/s cap to ~0.7 Gbit/s (measured on the
        2-core AMD EPYC VM, 2026-12-06)."""
        for ns, dev in ((self.names[0], self.links[node][0]), (self.names[node], self.links[node][1])):
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                            rate, "burst", burst, "latency", "400ms"], check=True, capture_output=True, text=True)

    def uncap(self, node: int) -> None:
        for ns, dev in ((self.names[0], self.links[node][0]), (self.names[node], self.links[node][1])):
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)

    def close(self) -> None:
        for ns in [*getattr(self, "names", []), *getattr(self, "extra", [])]:
            _ip("netns", "del", ns, check=False)
