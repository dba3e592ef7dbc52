"""Topology (+ nodes, hostfile, backend) -> LaunchPlan: ranks, pinned cores, threads, env and the commands to run.

Rules (checked by :func:`validate_plan` on every plan):

* One rank per socket (default) or per NUMA node (``per="numa"``, e.g. sub-NUMA clustering SNC-2/SNC-4), counting
  only sockets / nodes that have at least one allowed CPU.
* A rank is pinned to ONE logical CPU per physical core of its socket/node (the lowest-numbered allowed thread):
  never both hyperthread siblings, never a CPU outside the allowed set, and ranks' CPU sets are disjoint.
* OMP_NUM_THREADS = the rank's compute cores. With ``backend="ccl"`` one core per rank is reserved for the oneCCL
  worker (CCL_WORKER_COUNT=1, CCL_WORKER_AFFINITY lists the reserved CPU of every local rank, in local-rank order,
  as oneCCL expects) and removed from the compute set, so OMP_NUM_THREADS = cores - 1.
* All nodes are assumed to have the same topology as the one planned on (homogeneous cluster). For heterogeneous
  nodes, ``python -m launch.pin --per socket`` can plan on each node at rank start instead.

How pinning is applied (decision): accelerate 1.15 has no per-rank CPU pinning. ``--enable_cpu_affinity`` only acts
under CUDA (it asks NVML/amdsmi for the GPU's NUMA node; on a CPU-only host it silently does nothing), and its
mpirun path only adds ``--bind-to socket`` (Open MPI), which keeps hyperthreads and, as Open MPI maps by core when
np <= 2, can bind both ranks of a node to socket 0.
So every rank is started through a tiny wrapper, ``python -m launch.pin``, which reads its local rank from the
launcher's env (LOCAL_RANK | MPI_LOCALRANKID | OMPI_COMM_WORLD_LOCAL_RANK | MV2_COMM_WORLD_LOCAL_RANK), calls
``os.sched_setaffinity`` with its CPU list, sets OMP_NUM_THREADS (+ CCL_LOCAL_RANK/SIZE), and then exec's the
training program. The pinning and env are passed as *command-line arguments* of the wrapper, not as environment,
because Open MPI does not forward the launcher's environment to remote nodes (accelerate's mpirun line has no -x).

Threads: OMP_NUM_THREADS is what bounds PyTorch's intra-op pool. KMP_AFFINITY/KMP_BLOCKTIME (the values accelerate
uses) only affect Intel's OpenMP runtime (libiomp5, e.g. preloaded with IPEX); the PyTorch wheels use GNU libgomp,
which ignores them. The process affinity set by launch.pin is what keeps threads on the rank's cores either way.

Rooms: :mod:`launch.network` (hostfile, the interface to the master), :mod:`launch.backends` (``auto``, oneCCL
and the ``ds-ccl`` prerequisites), :mod:`launch.commands` (the launch forms and their command lines), :mod:`launch.ranks`
(a rank's CPUs and the env that goes with them); this module holds the plan itself, the rank layout, the env every rank gets, and the checks and the printout of a plan.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

from .backends import CCL_BACKENDS, DsCclPrereqs, ccl_env, ds_ccl_env, require_ds_ccl, resolve_backend
from .commands import Command, Job, build_commands
from .errors import PlanError
from .network import DEFAULT_PORT, read_hosts, route_iface
from .ranks import pin_settings
from .topology import Topology, format_cpu_list

PER_CHOICES = ("socket", "numa")
LAUNCHERS = ("auto", "accelerate", "mpirun")
DEFAULT_TRAIN_ARGV = ("sft", "train")


@dataclass
class RankPlan:
    rank: int
    local_rank: int
    node_rank: int
    host: str
    socket: list[int]  # sockets its CPUs are on (one, unless per=numa on odd hardware)
    numa_nodes: list[int]
    cores: list[int]  # physical core ids (compute + reserved)
    cpus: list[int]  # logical CPUs the rank is pinned to (one per compute core)
    ccl_worker_cpus: list[int]  # reserved for oneCCL's worker thread (backend ccl), not in ``cpus``
    omp_num_threads: int
    env: dict[str, str] = field(default_factory=dict)  # per-rank env (set by launch.pin)


@dataclass
class LaunchPlan:
    topology: dict
    hosts: list[str]
    nodes: int
    per: str
    backend: str
    launcher: str  # accelerate | mpirun
    ranks_per_node: int
    world_size: int
    master_addr: str
    master_port: int
    iface: str | None
    config_file: str
    hostfile: str | None
    env: dict[str, str]  # env every rank gets (passed through launch.pin --env)
    local_ranks: list[RankPlan]  # pinning of one node's ranks (identical on every node)
    ranks: list[RankPlan]  # every rank of the job
    commands: list[Command]
    train_argv: list[str]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # env the shell running the commands must have (launch.pin's --env values do not override inherited ones);
    # `sft launch` applies it to the `accelerate launch` it starts, by hand: export it first
    launcher_env: dict[str, str] = field(default_factory=dict)
    unset_env: list[str] = field(default_factory=list)  # variables that must NOT be in that shell's env

    def to_dict(self) -> dict:
        d = asdict(self)
        for c, cmd in zip(d["commands"], self.commands):
            c["shell"] = cmd.shell()
        return d

    def command_for_node(self, node_rank: int) -> Command:
        for c in self.commands:
            if c.node_rank is None or c.node_rank == node_rank:
                return c
        raise PlanError(f"no command for node rank {node_rank} (plan has {self.nodes} nodes)")


# ---- planning ----------------------------------------------------------------------------------------------
def _rank_groups(topo: Topology, per: str) -> list[tuple[int, list[int]]]:
    """[(group id, [one allowed logical CPU per physical core])] for each socket / NUMA node with allowed cores."""
    allowed = set(topo.allowed)
    groups: dict[int, list[int]] = {}
    for core, cpus in topo.cores().items():
        usable = [c for c in cpus if c in allowed]
        if not usable:
            continue
        first = topo.cpu(usable[0])
        key = first.socket if per == "socket" else first.node
        groups.setdefault(key, []).append(usable[0])
    return [(k, sorted(v)) for k, v in sorted(groups.items())]


def _local_ranks(topo: Topology, per: str, backend: str, ccl_workers: int, host: str, notes: list[str],
                 warnings: list[str]) -> list[RankPlan]:
    """The ranks of one node (every node is laid out alike): cores, pinned CPUs, reserved oneCCL CPUs, threads."""
    if per == "numa" and len(topo.numa_nodes) == 1 and len(topo.sockets) > 1:
        warnings.append("--per numa: the machine reports a single NUMA node; this is one rank for all sockets")
    groups = _rank_groups(topo, per)
    if not groups:
        raise PlanError(f"no allowed physical core on {topo.hostname} (allowed CPUs: {format_cpu_list(topo.allowed)!r})")
    local: list[RankPlan] = []
    for local_rank, (_, cpus) in enumerate(groups):
        compute, reserved = list(cpus), []
        if backend in CCL_BACKENDS:
            if len(cpus) > ccl_workers:
                compute, reserved = cpus[: len(cpus) - ccl_workers], cpus[len(cpus) - ccl_workers :]
            else:
                warnings.append(
                    f"local rank {local_rank} has {len(cpus)} core(s): no core left to reserve for the oneCCL worker; "
                    "it shares the compute core"
                )
        infos = [topo.cpu(c) for c in cpus]
        local.append(
            RankPlan(
                rank=local_rank,
                local_rank=local_rank,
                node_rank=0,
                host=host,
                socket=sorted({i.socket for i in infos}),
                numa_nodes=sorted({i.node for i in infos}),
                cores=sorted({i.core for i in infos}),
                cpus=compute,
                ccl_worker_cpus=reserved,
                omp_num_threads=len(compute),
            )
        )
    for rp in local:  # exactly what launch.pin will set in that rank
        rp.env = pin_settings([r.cpus for r in local], rp.local_rank, ccl=backend in CCL_BACKENDS)[1]
    threads = sorted({rp.omp_num_threads for rp in local})
    if len(threads) > 1:
        warnings.append(
            f"ranks get unequal thread counts {threads} (allowed CPUs are unevenly spread); data-parallel steps run "
            "at the pace of the smallest rank"
        )
    if topo.threads_per_core > 1:
        notes.append(
            f"{topo.threads_per_core} hardware threads per core: each rank is pinned to one thread per physical core; "
            "the hyperthread siblings stay idle (they add no matmul throughput and slow OpenMP barriers)"
        )
    return local


def _launcher_and_master(launcher: str, hostfile: str | None, master_addr: str | None, nodes: int,
                         hosts: list[str], hostname: str, notes: list[str]) -> tuple[str, str]:
    if launcher == "auto":
        launcher = "mpirun" if hostfile else "accelerate"
    if launcher == "mpirun" and not hostfile:
        raise PlanError("--launcher mpirun needs --hostfile (accelerate passes it to mpirun)")
    if master_addr is None:
        if nodes == 1:
            master_addr = "127.0.0.1"
        elif hostfile:
            master_addr = hosts[0]
        else:
            master_addr = hostname
            notes.append(
                f"MASTER_ADDR defaults to this host ({hostname}); run the plan on node 0 or pass --master-addr"
            )
    return launcher, master_addr


@dataclass
class _RankEnv:
    env: dict[str, str]  # every rank's (launch.pin --env)
    launcher_env: dict[str, str] = field(default_factory=dict)
    unset_env: list[str] = field(default_factory=list)


def _rank_env(backend: str, master_addr: str, master_port: int, local: list[RankPlan], nodes: int,
              iface: str | None, per_node_iface: bool, ccl_workers: int, ccl_root: str | None,
              environ: Mapping[str, str], warnings: list[str]) -> _RankEnv:
    out = _RankEnv({
        "ACCELERATE_USE_CPU": "true",
        "SFT_BACKEND": backend,
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "KMP_AFFINITY": "granularity=fine,compact,1,0",
        "KMP_BLOCKTIME": "1",
    })
    if backend == "ds-ccl":
        assert ccl_root is not None
        out.launcher_env, out.unset_env = ds_ccl_env(out.env, ccl_root, environ, len(local))
    if backend in CCL_BACKENDS:
        worker_cpus = [c for rp in local for c in rp.ccl_worker_cpus]
        ccl_env(out.env, worker_cpus, ccl_workers, len(local), nodes, iface, per_node_iface, warnings)
    elif backend == "gloo" and iface and nodes > 1:
        out.env.update({"SFT_IFACE": "route"} if per_node_iface else {"GLOO_SOCKET_IFNAME": iface})
    return out


def _all_ranks(local: list[RankPlan], hosts: list[str]) -> list[RankPlan]:
    """Every rank of the job: node N's ranks are pinned like node 0's."""
    ranks_per_node = len(local)
    return [
        RankPlan(**{**asdict(rp), "rank": node_rank * ranks_per_node + rp.local_rank, "node_rank": node_rank,
                    "host": hosts[node_rank]})
        for node_rank in range(len(hosts)) for rp in local
    ]


def _pin_argv(local: list[RankPlan], backend: str, env: dict[str, str], train_argv: list[str]) -> list[str]:
    """``-m launch.pin --cpus ... --env K=V ... -- TRAIN ARGV``: what every launcher runs for each rank."""
    pin_argv = ["-m", "launch.pin"]
    for rp in local:
        pin_argv += ["--cpus", format_cpu_list(rp.cpus)]
    if backend in CCL_BACKENDS:
        pin_argv += ["--ccl"]
    for k, v in env.items():
        pin_argv += ["--env", f"{k}={v}"]
    return [*pin_argv, "--", *train_argv]


def make_plan(
    topo: Topology,
    nodes: int | None = None,
    hostfile: str | None = None,
    per: str = "socket",
    backend: str = "auto",
    launcher: str = "auto",
    master_addr: str | None = None,
    master_port: int = DEFAULT_PORT,
    iface: str | None = None,
    train_argv: list[str] | None = None,
    ccl_workers: int = 1,
    detect_network: bool = True,
    ccl_root: str | None = None,
    prereq_check: Callable[[str | None], DsCclPrereqs] | None = None,
    environ: Mapping[str, str] | None = None,
) -> LaunchPlan:
    """Plan a launch. For ``backend="ds-ccl"``: ``ccl_root`` (default $CCL_ROOT), ``prereq_check(ccl_root)``
    (default :func:`launch.backends.check_ds_ccl_prereqs`) and ``environ`` (default os.environ: the CPATH /
    LD_LIBRARY_PATH that the oneCCL paths are prepended to) make the plan independent of this machine in tests."""
    if per not in PER_CHOICES:
        raise PlanError(f"--per must be one of {', '.join(PER_CHOICES)}, got {per!r}")
    if launcher not in LAUNCHERS:
        raise PlanError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    backend = resolve_backend(backend)
    train_argv = list(train_argv) if train_argv else list(DEFAULT_TRAIN_ARGV)
    notes: list[str] = []
    warnings: list[str] = []
    environ = os.environ if environ is None else environ
    if backend == "ds-ccl":
        ccl_root = require_ds_ccl(hostfile, launcher, nodes, ccl_root, prereq_check)

    hosts, slots, nodes = read_hosts(hostfile, nodes, topo.hostname)
    launcher, master_addr = _launcher_and_master(launcher, hostfile, master_addr, nodes, hosts, topo.hostname, notes)
    local = _local_ranks(topo, per, backend, ccl_workers, hosts[0], notes, warnings)
    ranks_per_node = len(local)
    world_size = nodes * ranks_per_node
    iface, per_node_iface = route_iface(iface, nodes, detect_network, master_addr, master_port, launcher, warnings)
    env = _rank_env(backend, master_addr, master_port, local, nodes, iface, per_node_iface, ccl_workers, ccl_root,
                    environ, warnings)
    job = Job(hosts=hosts, slots=slots, nodes=nodes, ranks_per_node=ranks_per_node, world_size=world_size,
              master_addr=master_addr, master_port=master_port, hostfile=hostfile,
              pin_argv=_pin_argv(local, backend, env.env, train_argv),
              omp=str(min(rp.omp_num_threads for rp in local)))
    config, commands = build_commands(job, backend == "ds-ccl", launcher, notes, warnings)
    plan = LaunchPlan(
        topology=topo.summary(), hosts=hosts, nodes=nodes, per=per, backend=backend, launcher=launcher,
        ranks_per_node=ranks_per_node, world_size=world_size, master_addr=master_addr, master_port=master_port,
        iface=iface, config_file=config, hostfile=hostfile, env=env.env, local_ranks=local,
        ranks=_all_ranks(local, hosts), commands=commands, train_argv=train_argv, notes=notes, warnings=warnings,
        launcher_env=env.launcher_env, unset_env=env.unset_env,
    )
    validate_plan(plan, topo)
    return plan


def validate_plan(plan: LaunchPlan, topo: Topology) -> None:
    """Raise PlanError if the plan oversubscribes, pins outside the allowed set, or pins hyperthread siblings."""
    allowed = set(topo.allowed)
    used: dict[int, int] = {}
    for rp in plan.local_ranks:
        mine = rp.cpus + rp.ccl_worker_cpus
        if not rp.cpus:
            raise PlanError(f"local rank {rp.local_rank} has no compute CPU")
        outside = sorted(set(mine) - allowed)
        if outside:
            raise PlanError(f"local rank {rp.local_rank} pinned outside the allowed CPUs: {format_cpu_list(outside)}")
        cores = [topo.cpu(c).core for c in mine]
        if len(set(cores)) != len(cores):
            raise PlanError(f"local rank {rp.local_rank} pins two hyperthreads of one core")
        for c in mine:
            if c in used:
                raise PlanError(f"CPU {c} is given to local ranks {used[c]} and {rp.local_rank}")
            used[c] = rp.local_rank
        if rp.omp_num_threads > len(rp.cpus):
            raise PlanError(f"local rank {rp.local_rank}: {rp.omp_num_threads} threads on {len(rp.cpus)} cores")
    all_cores = [topo.cpu(c).core for c in used]
    if len(set(all_cores)) != len(all_cores):
        raise PlanError("two ranks share a physical core (hyperthread siblings)")
    if plan.world_size != plan.nodes * plan.ranks_per_node or len(plan.ranks) != plan.world_size:
        raise PlanError("world size != nodes x ranks per node")


# ---- presentation ------------------------------------------------------------------------------------------
def format_plan(plan: LaunchPlan, max_rows: int = 32) -> str:
    t = plan.topology
    lines: list[str] = []
    flags = ", ".join(t.get("flags") or []) or "-"
    lines.append(f"sft launch plan for {t['hostname']} ({t.get('model_name') or 'unknown CPU'}; topology from {t['source']})")
    lines.append(
        f"  machine : {t['sockets']} socket(s), {t['numa_nodes']} NUMA node(s), {t['physical_cores']} physical cores, "
        f"{t['logical_cpus']} logical CPUs ({t['threads_per_core']} thread(s)/core); allowed CPUs {t['allowed_cpus']}"
        f" ({t['allowed_physical_cores']} cores)"
    )
    lines.append(f"  isa     : {flags}")
    lines.append(
        f"  layout  : {plan.nodes} node(s) x {plan.ranks_per_node} rank(s)/node (one per {'socket' if plan.per == 'socket' else 'NUMA node'})"
        f" = world size {plan.world_size}; backend {plan.backend}; launcher {plan.launcher}"
    )
    lines.append(f"  master  : {plan.master_addr}:{plan.master_port}" + (f" via {plan.iface}" if plan.iface else ""))
    lines.append("")
    header = ["rank", "node", "host", "socket", "numa", "cores", "pinned cpus", "omp", "ccl worker"]
    rows = []
    shown = plan.ranks if len(plan.ranks) <= max_rows else plan.ranks[: plan.ranks_per_node]
    for rp in shown:
        rows.append(
            [
                str(rp.rank),
                str(rp.node_rank),
                rp.host,
                ",".join(map(str, rp.socket)),
                ",".join(map(str, rp.numa_nodes)),
                str(len(rp.cores)),
                format_cpu_list(rp.cpus),
                str(rp.omp_num_threads),
                format_cpu_list(rp.ccl_worker_cpus) or "-",
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    for r in rows:
        lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    if len(shown) < len(plan.ranks):
        lines.append(f"  ... ({len(plan.ranks) - len(shown)} more ranks: every node is pinned like node 0)")
    lines.append("")
    lines.append("env (every rank; passed by launch.pin):")
    for k, v in plan.env.items():
        lines.append(f"  {k}={v}")
    per_rank = sorted({k for rp in plan.local_ranks for k in rp.env})
    lines.append(f"per-rank env (launch.pin): {', '.join(per_rank)}")
    if plan.launcher_env or plan.unset_env:
        lines.append("")
        lines.append("launcher env (`sft launch` sets it; by hand, run this first):")
        lines += [f"  export {k}={shlex.quote(v)}" for k, v in plan.launcher_env.items()]
        lines += [f"  unset {k}" for k in plan.unset_env]
    lines.append("")
    lines.append("commands (run from the repository root):")
    for cmd in plan.commands[:8]:
        where = "all nodes (mpirun)" if cmd.node_rank is None else f"node {cmd.node_rank} ({cmd.host})"
        lines.append(f"  # {where}")
        lines.append("  " + cmd.shell(multiline=True).replace("\n", "\n  "))
    if len(plan.commands) > 8:
        lines.append(f"  # ... {len(plan.commands) - 8} more nodes: same command with --machine_rank 8..{plan.nodes - 1}")
    if plan.notes:
        lines.append("")
        lines.append("notes:")
        lines += [f"  - {n}" for n in plan.notes]
    if plan.warnings:
        lines.append("")
        lines.append("warnings:")
        lines += [f"  ! {w}" for w in plan.warnings]
    return "\n".join(lines)
