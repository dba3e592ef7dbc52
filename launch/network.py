"""The network side of a launch plan: hosts from an MPI hostfile, and the interface that routes to the master.

CCL_KVS_IFACE (oneCCL's key-value store) and GLOO_SOCKET_IFNAME name the network interface the ranks use: on hosts
with several NICs (docker0, ib0, a management NIC...) oneCCL and gloo may pick one the other nodes cannot reach and
hang at init; the plan uses ``--iface`` or the interface that routes to MASTER_ADDR (:func:`detect_iface`).
"""

from __future__ import annotations

import socket
from pathlib import Path

from .errors import PlanError

DEFAULT_PORT = 29500


def parse_hostfile(text: str) -> list[tuple[str, int | None]]:
    """Hosts and slots from an MPI hostfile: ``host``, ``host slots=N`` (Open MPI) or ``host:N`` (Intel MPI)."""
    hosts: list[tuple[str, int | None]] = []
    seen: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        name, slots = fields[0], None
        if ":" in name:
            name, _, s = name.partition(":")
            if s:
                try:
                    slots = int(s)
                except ValueError:
                    raise PlanError(f"hostfile line {lineno}: bad slot count in {raw!r}") from None
        for f in fields[1:]:
            k, _, v = f.partition("=")
            if k == "slots":
                try:
                    slots = int(v)
                except ValueError:
                    raise PlanError(f"hostfile line {lineno}: bad slots in {raw!r}") from None
        if not name:
            raise PlanError(f"hostfile line {lineno}: no host name in {raw!r}")
        if name in seen:
            continue
        seen.add(name)
        hosts.append((name, slots))
    if not hosts:
        raise PlanError("hostfile lists no hosts")
    return hosts


def read_hosts(hostfile: str | None, nodes: int | None, hostname: str) -> tuple[list[str], list[int | None], int]:
    """``(hosts, slots, nodes)``: from the hostfile (slots as it gives them), else ``nodes`` hosts named ``nodeI``
    (or this ``hostname`` for one node; ``slots`` is then empty)."""
    slots: list[int | None] = []
    if hostfile:
        try:
            entries = parse_hostfile(Path(hostfile).read_text())
        except OSError as exc:
            raise PlanError(f"cannot read hostfile {hostfile}: {exc}") from None
        hosts = [h for h, _ in entries]
        slots = [s for _, s in entries]
        if nodes is not None and nodes != len(hosts):
            raise PlanError(f"--nodes {nodes} but hostfile {hostfile} lists {len(hosts)} hosts")
        return hosts, slots, len(hosts)
    nodes = 1 if nodes is None else nodes
    if nodes < 1:
        raise PlanError(f"--nodes must be >= 1, got {nodes}")
    return ([hostname] if nodes == 1 else [f"node{i}" for i in range(nodes)]), slots, nodes


def _iface_ipv4(name: str) -> str | None:
    try:
        import fcntl
        import struct

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            res = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
        return socket.inet_ntoa(res[20:24])
    except (OSError, ImportError):
        return None


def detect_iface(master_addr: str, port: int = DEFAULT_PORT) -> str | None:
    """The local interface whose address routes to ``master_addr`` (no packet is sent), or None."""
    try:
        ip = socket.gethostbyname(master_addr)
        if ip.startswith("127."):
            return "lo"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((ip, port))
            local_ip = s.getsockname()[0]
        for _, name in socket.if_nameindex():
            if _iface_ipv4(name) == local_ip:
                return name
    except OSError:
        return None
    return None


def route_iface(iface: str | None, nodes: int, detect_network: bool, master_addr: str, master_port: int,
                launcher: str, warnings: list[str]) -> tuple[str | None, bool]:
    """``(iface, per_node_iface)``: the interface the ranks reach the master over (None: loopback or unknown), and
    whether each node must find its own (one mpirun command for every node)."""
    if not (iface is None and nodes > 1 and detect_network):
        return iface, False
    iface = detect_iface(master_addr, master_port)
    try:
        socket.gethostbyname(master_addr)
        resolves = True
    except OSError:  # a host name only the cluster resolves (planning from elsewhere): nothing to check here
        resolves = False
        warnings.append(f"master address {master_addr} does not resolve here: the interface is not checked; "
                        "pass --iface NAME if the nodes have several")
    if iface is None and resolves:
        # without a route to the master, the ranks would pick an interface themselves and hang at init
        have = ", ".join(name for _, name in socket.if_nameindex()) or "none"
        raise PlanError(
            f"no network interface of this host routes to the master address {master_addr}; name the one "
            f"that reaches node 0 with --iface NAME (sets GLOO_SOCKET_IFNAME / CCL_KVS_IFACE). This host's "
            f"interfaces: {have}"
        )
    if iface == "lo":
        iface = None
    # One mpirun command starts every node's ranks with the same environment, but interface names differ
    # between hosts (eth0 here, ens1f0 there): each rank's launch.pin finds its own route to the master.
    return iface, launcher == "mpirun" and iface is not None


def main(argv: list[str] | None = None) -> int:
    """``python -m launch.network MASTER_ADDR``: print the interface of this host that routes to the master (what
    ``sft launch`` picks; ``lo`` when the master is this host's loopback). Used by launch/slurm/gpu_multi_node.sbatch
    on every node. Exit status 2, naming this host's interfaces, when none routes there."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m launch.network MASTER_ADDR", file=sys.stderr)
        return 2
    warnings: list[str] = []
    try:
        name = detect_iface(args[0])
        if name is None:
            route_iface(None, 2, True, args[0], DEFAULT_PORT, "accelerate", warnings)  # raises, naming the fix
            print(f"launch.network: master address {args[0]} does not resolve here", file=sys.stderr)
            return 2
    except PlanError as exc:
        print(f"launch.network: error: {exc}", file=sys.stderr)
        return 2
    print(name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
