"""CPU topology: sockets, NUMA nodes, physical cores vs hyperthreads, and the CPUs this process may use.

Two sources, both parsed by pure functions over text so tests can feed recorded machines:

* ``lscpu -p=CPU,CORE,SOCKET,NODE`` (preferred): one line per online logical CPU. lscpu's CORE column is a
  system-wide unique core index, so two logical CPUs with the same CORE are hyperthread siblings.
* ``/sys/devices/system/cpu`` (fallback when lscpu is missing, e.g. slim containers): ``cpuN/topology/
  physical_package_id`` for the socket, ``core_cpus_list`` (or the older ``thread_siblings_list``) for the physical
  core (``core_id`` alone is only unique within a package/die, so we key cores by their sibling set), and
  ``/sys/devices/system/node/nodeK/cpulist`` for NUMA nodes.

The allowed set is ``os.sched_getaffinity(0)`` (which the kernel already intersects with the cgroup cpuset),
further intersected with the cgroup's effective cpuset when it can be read (v2 ``cpuset.cpus.effective``, v1
``cpuset.effective_cpus``). A plan must never pin outside it: oneCCL, for example, fails to start its worker
(``pthread_create returns 22``) when ``CCL_WORKER_AFFINITY`` names a CPU outside the cgroup.

Run ``python -m launch.topology`` to print what this machine looks like.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sft.runs import format_int_list

# ISA flags (from /proc/cpuinfo) that matter for bf16 training speed on CPU.
INTERESTING_FLAGS = (
    "amx_bf16",
    "amx_tile",
    "amx_int8",
    "amx_fp16",
    "avx512_bf16",
    "avx512_fp16",
    "avx512_vnni",
    "avx512f",
    "avx_vnni",
    "avx2",
)


class TopologyError(ValueError):
    """Topology text could not be parsed, or describes no usable CPU."""


@dataclass(frozen=True)
class LogicalCPU:
    """One logical CPU (hardware thread). ``core`` is unique across the whole machine."""

    cpu: int
    core: int
    socket: int
    node: int  # NUMA node; 0 when the machine reports none


@dataclass
class Topology:
    hostname: str
    cpus: list[LogicalCPU]
    allowed: list[int]  # logical CPUs this process may run on (affinity ∩ cgroup cpuset)
    flags: list[str] = field(default_factory=list)  # subset of INTERESTING_FLAGS present
    model_name: str = ""
    source: str = "lscpu"  # lscpu | sysfs | fixture

    def __post_init__(self) -> None:
        if not self.cpus:
            raise TopologyError("topology has no logical CPUs")
        known = {c.cpu for c in self.cpus}
        self.allowed = sorted(set(self.allowed) & known)

    # ---- derived views -------------------------------------------------------------------------------------
    @property
    def sockets(self) -> list[int]:
        return sorted({c.socket for c in self.cpus})

    @property
    def numa_nodes(self) -> list[int]:
        return sorted({c.node for c in self.cpus})

    def cores(self) -> dict[int, list[int]]:
        """Physical core id -> its logical CPUs (hyperthread siblings), sorted."""
        out: dict[int, list[int]] = {}
        for c in self.cpus:
            out.setdefault(c.core, []).append(c.cpu)
        return {k: sorted(v) for k, v in sorted(out.items())}

    @property
    def threads_per_core(self) -> int:
        return max(len(v) for v in self.cores().values())

    def cpu(self, cpu: int) -> LogicalCPU:
        for c in self.cpus:
            if c.cpu == cpu:
                return c
        raise KeyError(cpu)

    def siblings(self, cpu: int) -> list[int]:
        """All logical CPUs on the same physical core as ``cpu`` (including itself)."""
        return self.cores()[self.cpu(cpu).core]

    def allowed_cores(self) -> list[int]:
        """Physical cores with at least one allowed logical CPU."""
        allowed = set(self.allowed)
        return [core for core, cpus in self.cores().items() if allowed.intersection(cpus)]

    def summary(self) -> dict:
        return {
            "hostname": self.hostname,
            "model_name": self.model_name,
            "source": self.source,
            "sockets": len(self.sockets),
            "numa_nodes": len(self.numa_nodes),
            "physical_cores": len(self.cores()),
            "logical_cpus": len(self.cpus),
            "threads_per_core": self.threads_per_core,
            "allowed_cpus": format_cpu_list(self.allowed),
            "allowed_physical_cores": len(self.allowed_cores()),
            "flags": list(self.flags),
        }

    def to_dict(self) -> dict:
        d = asdict(self)
        d["summary"] = self.summary()
        return d


# ---- cpu lists ---------------------------------------------------------------------------------------------
def parse_cpu_list(text: str) -> list[int]:
    """Parse a Linux cpu list ("0-3,8,10-11", also "0-7:2" strides) into sorted ints."""
    out: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        stride = 1
        if ":" in part:
            part, s = part.split(":", 1)
            stride = int(s)
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.update(range(int(lo), int(hi) + 1, stride))
        else:
            out.add(int(part))
    return sorted(out)


def format_cpu_list(cpus) -> str:
    """Inverse of :func:`parse_cpu_list`: [0,1,2,3,8] -> "0-3,8"."""
    return format_int_list(cpus)


# ---- parsers (pure) ----------------------------------------------------------------------------------------
def parse_lscpu(text: str) -> list[LogicalCPU]:
    """Parse ``lscpu -p=CPU,CORE,SOCKET,NODE`` output.

    Column order is taken from the ``# CPU,Core,Socket,Node`` header when present (lscpu prints one), otherwise
    assumed to be CPU,CORE,SOCKET,NODE. An empty NODE (no NUMA support reported) becomes node 0.
    """
    columns = ["cpu", "core", "socket", "node"]
    cpus: list[LogicalCPU] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            body = line.lstrip("#").strip()
            names = [p.strip().lower() for p in body.split(",")]
            if "cpu" in names and "core" in names and "socket" in names:
                columns = names
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < len(columns):
            fields += [""] * (len(columns) - len(fields))
        row = dict(zip(columns, fields))
        try:
            cpu = int(row["cpu"])
            core = int(row["core"]) if row.get("core", "") != "" else cpu
            sock = int(row["socket"]) if row.get("socket", "") != "" else 0
            node = int(row["node"]) if row.get("node", "") != "" else 0
        except (KeyError, ValueError) as exc:
            raise TopologyError(f"lscpu line {lineno}: cannot parse {raw!r} ({exc})") from None
        cpus.append(LogicalCPU(cpu=cpu, core=core, socket=sock, node=node))
    if not cpus:
        raise TopologyError("lscpu output has no CPU lines (expected `lscpu -p=CPU,CORE,SOCKET,NODE`)")
    return sorted(cpus, key=lambda c: c.cpu)


def parse_cpuinfo(text: str) -> tuple[list[str], str]:
    """(interesting ISA flags, model name) from /proc/cpuinfo text (first processor's entry)."""
    flags: set[str] = set()
    model = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "model name" and not model:
            model = value.strip()
        if flags and model:
            break
    return [f for f in INTERESTING_FLAGS if f in flags], model


def read_sysfs(cpu_root: str | Path = "/sys/devices/system/cpu", node_root: str | Path = "/sys/devices/system/node") -> list[LogicalCPU]:
    """Read the topology from sysfs (fallback when lscpu is unavailable). Roots are parameters for tests."""
    cpu_root, node_root = Path(cpu_root), Path(node_root)
    online_file = cpu_root / "online"
    if online_file.exists():
        online = parse_cpu_list(online_file.read_text())
    else:
        online = sorted(int(p.name[3:]) for p in cpu_root.glob("cpu[0-9]*"))
    node_of: dict[int, int] = {}
    for nd in sorted(node_root.glob("node[0-9]*")) if node_root.exists() else []:
        cl = nd / "cpulist"
        if cl.exists():
            for c in parse_cpu_list(cl.read_text()):
                node_of[c] = int(nd.name[4:])
    core_index: dict[tuple[int, tuple[int, ...]], int] = {}
    cpus: list[LogicalCPU] = []
    for c in online:
        topo = cpu_root / f"cpu{c}" / "topology"
        if not topo.exists():
            raise TopologyError(f"{topo} missing")
        sock = int((topo / "physical_package_id").read_text().strip())
        sib_file = topo / "core_cpus_list"
        if not sib_file.exists():
            sib_file = topo / "thread_siblings_list"
        siblings = tuple(parse_cpu_list(sib_file.read_text())) if sib_file.exists() else (c,)
        key = (sock, siblings)
        core = core_index.setdefault(key, len(core_index))
        cpus.append(LogicalCPU(cpu=c, core=core, socket=sock, node=node_of.get(c, 0)))
    if not cpus:
        raise TopologyError(f"no online CPUs under {cpu_root}")
    return cpus


def cgroup_cpuset(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> list[int] | None:
    """The effective cpuset of this process's cgroup (v2 or v1), or None when it cannot be read."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    candidates: list[Path] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        rel = path.lstrip("/")
        if hid == "0" and controllers == "":  # cgroup v2 unified
            candidates += [Path(root) / rel / "cpuset.cpus.effective", Path(root) / "cpuset.cpus.effective"]
        elif "cpuset" in controllers.split(","):  # cgroup v1
            candidates += [Path(root) / "cpuset" / rel / "cpuset.effective_cpus", Path(root) / "cpuset" / "cpuset.effective_cpus"]
    for cand in candidates:
        try:
            text = cand.read_text().strip()
        except OSError:
            continue
        if text:
            return parse_cpu_list(text)
    return None


def allowed_cpus() -> list[int]:
    """CPUs this process may use: sched_getaffinity ∩ cgroup effective cpuset (when readable)."""
    allowed = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cg = cgroup_cpuset()
    if cg:
        narrowed = allowed & set(cg)
        if narrowed:
            allowed = narrowed
    return sorted(allowed)


# ---- constructors ------------------------------------------------------------------------------------------
def topology_from_lscpu(text: str, allowed=None, hostname: str = "fixture", flags=(), model_name: str = "", source: str = "fixture") -> Topology:
    """Build a :class:`Topology` from lscpu text. ``allowed`` defaults to every listed CPU; a str is a cpu list."""
    cpus = parse_lscpu(text)
    if allowed is None:
        allowed = [c.cpu for c in cpus]
    elif isinstance(allowed, str):
        allowed = parse_cpu_list(allowed)
    return Topology(hostname=hostname, cpus=cpus, allowed=list(allowed), flags=list(flags), model_name=model_name, source=source)


def run_lscpu() -> str | None:
    exe = shutil.which("lscpu")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "-p=CPU,CORE,SOCKET,NODE"], capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def detect_topology(prefer: str = "lscpu") -> Topology:
    """This machine's topology: lscpu when available (``prefer='lscpu'``), else sysfs."""
    cpus = None
    source = "sysfs"
    if prefer == "lscpu":
        text = run_lscpu()
        if text:
            try:
                cpus = parse_lscpu(text)
                source = "lscpu"
            except TopologyError:
                cpus = None
    if cpus is None:
        cpus = read_sysfs()
        source = "sysfs"
    try:
        flags, model = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        flags, model = [], ""
    return Topology(hostname=socket.gethostname(), cpus=cpus, allowed=allowed_cpus(), flags=flags, model_name=model, source=source)


def load_topology(path: str | Path, allowed=None, hostname: str | None = None) -> Topology:
    """Topology from a saved ``lscpu -p=CPU,CORE,SOCKET,NODE`` file (to plan for another machine)."""
    p = Path(path)
    return topology_from_lscpu(p.read_text(), allowed=allowed, hostname=hostname or p.stem, source=f"file:{p.name}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.topology", description="Print this machine's CPU topology.")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--sysfs", action="store_true", help="read /sys instead of lscpu")
    ap.add_argument("--count", choices=["socket", "sockets", "numa"], help="print only the number of sockets / NUMA nodes with allowed cores")
    args = ap.parse_args(argv)
    topo = detect_topology(prefer="sysfs" if args.sysfs else "lscpu")
    if args.count:
        allowed = set(topo.allowed)
        key = (lambda c: c.node) if args.count == "numa" else (lambda c: c.socket)
        print(len({key(c) for c in topo.cpus if c.cpu in allowed}))
        return 0
    print(json.dumps(topo.summary(), indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
