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

Launch forms (``sft plan`` prints the one it picks):

* 1 rank in total: ``accelerate launch --cpu --num_processes 1`` (cpu_single.yaml).
* N ranks, one ``accelerate launch`` per node: ``--multi_gpu --num_processes W --num_machines N --machine_rank R``
  plus ``ACCELERATE_USE_CPU=true`` in the ranks' env (set by the wrapper). Verified on this 1-socket machine: the
  ranks see MULTI_CPU/gloo with the right world size. TRAP (accelerate 1.15): ``--cpu --num_processes N`` and a
  MULTI_CPU config without an mpirun hostfile start ONE process; ``--multi_gpu`` WITHOUT ACCELERATE_USE_CPU starts
  N processes that each think they are alone (world size 1, silently training N copies).
* mpirun with a hostfile (one command for all nodes): accelerate's MULTI_CPU ``--cpu --mpirun_hostfile F``, which
  prepends ``mpirun --hostfile F --npernode R -n W --bind-to socket`` (Open MPI) or ``mpirun -f F -ppn R -n W``
  (Intel MPI / MVAPICH); the wrapper re-pins each rank.

Threads: OMP_NUM_THREADS is what bounds PyTorch's intra-op pool. KMP_AFFINITY/KMP_BLOCKTIME (the values accelerate
uses) only affect Intel's OpenMP runtime (libiomp5, e.g. preloaded with IPEX); the PyTorch wheels use GNU libgomp,
which ignores them. The process affinity set by launch.pin is what keeps threads on the rank's cores either way.

oneCCL decisions (backend ``ccl``): CCL_ATL_TRANSPORT=ofi for every launcher (oneCCL's default; bootstraps over its
own TCP KVS so it works under torchrun-style launchers; ``mpi`` transport needs Intel MPI's mpirun and a oneCCL built
against it, so it is only worth choosing by hand on such clusters). CCL_ATL_SHM=1 enables the shared-memory provider
for ranks on the same node. CCL_PROCESS_LAUNCHER=none with CCL_LOCAL_RANK/CCL_LOCAL_SIZE per rank (without them
oneCCL looks for Hydra/PMI variables and fails under accelerate/torchrun: accelerate#2340). CCL_KVS_IFACE names the
network interface for oneCCL's key-value store: on hosts with several NICs (docker0, ib0, a management NIC...) oneCCL
may pick one the other nodes cannot reach and hang at init; the plan uses ``--iface`` or the interface that routes
to MASTER_ADDR. The same interface goes to GLOO_SOCKET_IFNAME for gloo (gloo has the same wrong-NIC failure).

Backend ``ds-ccl`` (EXPERIMENTAL, explicit only: ``auto`` never picks it): DeepSpeed ZeRO-2 with its gradient
all-reduce on oneCCL through DeepSpeed's own op ``deepspeed_ccl_comm``, for torch >= 2.9 where
oneccl_bindings_for_pytorch does not exist. Measured 5-11x SLOWER than gloo on a shared 2-core machine
(benchmarks/results/cpu_collectives.md, section 2); only worth re-measuring on dedicated Xeon nodes. The plan:

* checks the prerequisites first (:func:`check_ds_ccl_prereqs`: deepspeed importable, CCL_ROOT with lib/libccl.so*
  and include/oneapi/ccl.hpp, g++ and ninja) and fails with a PlanError that names what is missing;
* one node only, accelerate form only (the one verified): ``accelerate launch --config_file
  configs/accelerate/cpu_deepspeed_ccl.yaml --num_processes N ...`` WITHOUT ``--cpu`` (accelerate rejects it with
  DeepSpeed) and WITHOUT ``--multi_gpu``;
* every rank gets DS_ACCELERATOR=cpu, CCL_ROOT, CPATH=$CCL_ROOT/include:..., LD_LIBRARY_PATH=$CCL_ROOT/lib:...
  (DeepSpeed's op builder adds no include path and no rpath), LOCAL_SIZE (DeepSpeed's shm op), SFT_BACKEND=ds-ccl,
  and the oneCCL variables of backend ``ccl`` (one core per rank reserved for the oneCCL worker);
* it does NOT set ACCELERATE_USE_CPU: with it the DEEPSPEED config is silently ignored and the run is plain DDP
  over gloo (MULTI_CPU). ``sft launch`` removes an inherited one. The ranks' sft.dist then creates a gloo
  group and forces DeepSpeed's CCLBackend on it (the workaround from the report).

Because launch.pin's ``--env`` values are only defaults (a variable the launcher's env already has is kept),
CPATH / LD_LIBRARY_PATH are also in ``LaunchPlan.launcher_env``: ``sft launch`` sets them in the environment of the
``accelerate launch`` it runs; by hand, export them first (``sft plan`` prints the lines).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shlex
import shutil
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sft.config.load import CONFIG_DIR as SFT_CONFIG_DIR

from .pin import pin_settings
from .topology import Topology, format_cpu_list

BACKENDS = ("auto", "gloo", "ccl", "mpi", "ds-ccl")
EXPERIMENTAL_BACKENDS = ("ds-ccl",)  # never chosen by "auto"
CCL_BACKENDS = ("ccl", "ds-ccl")  # backends whose ranks run a oneCCL worker thread (reserved core, CCL_* env)
PER_CHOICES = ("socket", "numa")
LAUNCHERS = ("auto", "accelerate", "mpirun")
DEFAULT_PORT = 29500
DEFAULT_TRAIN_ARGV = ("sft", "train")
REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = SFT_CONFIG_DIR / "accelerate"  # shipped inside the sft package
DS_CCL_CONFIG = "cpu_deepspeed_ccl.yaml"
CPU_COLLECTIVES_REPORT = "benchmarks/results/cpu_collectives.md"
ONECCL_PINS = (
    "oneccl==2021.17.2 oneccl-devel==2021.17.2 impi-rt==2021.17.2 "
    "intel-sycl-rt==2025.3.3 intel-cmplr-lib-rt==2025.3.3 intel-cmplr-lib-ur==2025.3.3"
)


class PlanError(ValueError):
    """A plan cannot be made (bad hostfile, no usable cores, inconsistent arguments) or breaks an invariant."""


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
class Command:
    node_rank: int | None  # None: one command starts every node (mpirun)
    host: str
    argv: list[str]

    def shell(self, multiline: bool = False) -> str:
        if not multiline:
            return shlex.join(self.argv)
        # one option (with its value) per line: break before every "--opt" and before "-m"
        parts: list[list[str]] = [[]]
        program = False  # after "--" the training command stays on one line
        for a in self.argv:
            if parts[-1] and not program and (a.startswith("--") or a == "-m"):
                parts.append([])
            program = program or a == "--"
            parts[-1].append(a)
        return " \\\n    ".join(shlex.join(p) for p in parts)


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


# ---- helpers -----------------------------------------------------------------------------------------------
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


def resolve_backend(backend: str) -> str:
    """``auto`` -> what this Python would use on CPU (ccl if its binding imports, else mpi if torch has it, else gloo).

    ``auto`` never resolves to an experimental backend (``ds-ccl``): those are explicit choices only.
    """
    if backend not in BACKENDS:
        raise PlanError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    try:
        from sft.dist import choose_backend

        chosen = choose_backend("cpu")
        if chosen in EXPERIMENTAL_BACKENDS:  # $SFT_BACKEND=ds-ccl must not turn "auto" into ds-ccl
            chosen = choose_backend("cpu", "auto")
    except Exception:  # torch missing on a login node: plan for the portable default
        return "gloo"
    return chosen if chosen in BACKENDS and chosen not in EXPERIMENTAL_BACKENDS else "gloo"


# ---- ds-ccl prerequisites ----------------------------------------------------------------------------------
@dataclass
class DsCclPrereqs:
    """Result of :func:`check_ds_ccl_prereqs`: the oneCCL prefix found and one line per missing piece."""

    ccl_root: str | None
    missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None  # no import: deepspeed's import is slow and chatty
    except (ImportError, ValueError):
        return False


def check_ds_ccl_prereqs(
    ccl_root: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    module_available: Callable[[str], bool] = _module_available,
    which: Callable[[str], str | None] = shutil.which,
    glob_fn: Callable[[str], list[str]] = glob.glob,
    is_dir: Callable[[str], bool] = os.path.isdir,
    interpreter: str | None = None,
) -> DsCclPrereqs:
    """What backend ``ds-ccl`` needs on the node it is planned on; every probe is injectable (tests, other nodes).

    ``ccl_root`` defaults to ``$CCL_ROOT``. Each entry of ``missing`` names the missing piece and how to get it.
    """
    environ = os.environ if environ is None else environ
    interpreter = interpreter or sys.executable
    root = ccl_root or environ.get("CCL_ROOT") or None
    missing: list[str] = []
    if not module_available("deepspeed"):
        missing.append(
            f"deepspeed is not importable by {interpreter}: pip install 'deepspeed>=0.16' (or the [deepspeed] extra: "
            "pip install -e '.[deepspeed]')"
        )
    install = f"pip install --no-deps --prefix <prefix> {ONECCL_PINS}"
    if not root:
        missing.append(
            "CCL_ROOT is not set: install oneCCL 2021.17.2 into a prefix outside the venv "
            f"({install}) and export CCL_ROOT=<prefix> (or pass --ccl-root); oneccl 2022.2.0 from PyPI segfaults "
            "(see " + CPU_COLLECTIVES_REPORT + ")"
        )
    elif not is_dir(root):
        missing.append(f"CCL_ROOT={root} is not a directory: install oneCCL 2021.17.2 there ({install})")
    else:
        if not glob_fn(os.path.join(root, "lib", "libccl.so*")):
            missing.append(
                f"CCL_ROOT={root} has no lib/libccl.so*: install the oneCCL runtime there "
                f"(pip install --no-deps --prefix {root} oneccl==2021.17.2 impi-rt==2021.17.2 intel-sycl-rt==2025.3.3 "
                "intel-cmplr-lib-rt==2025.3.3 intel-cmplr-lib-ur==2025.3.3)"
            )
        if not glob_fn(os.path.join(root, "include", "oneapi", "ccl.hpp")):
            missing.append(
                f"CCL_ROOT={root} has no include/oneapi/ccl.hpp: install the headers "
                f"(pip install --no-deps --prefix {root} oneccl-devel==2021.17.2)"
            )
    if not which("g++"):
        missing.append(
            "g++ is not on PATH: DeepSpeed JIT-compiles its deepspeed_ccl_comm op at the first run "
            "(apt-get install g++, or your distribution's C++ compiler package)"
        )
    if not which("ninja"):
        venv_ninja = Path(interpreter).parent / "ninja"
        if venv_ninja.exists():
            missing.append(
                f"ninja is in {venv_ninja.parent} but not on PATH (torch's JIT build runs `ninja`): activate the venv "
                f"or export PATH={venv_ninja.parent}:$PATH"
            )
        else:
            missing.append("ninja is not installed: pip install ninja (a deepspeed dependency; torch's JIT build needs it)")
    return DsCclPrereqs(ccl_root=root, missing=missing)


def _prepend_path(first: str, existing: str | None) -> str:
    parts = [p for p in (existing or "").split(os.pathsep) if p and p != first]
    return os.pathsep.join([first, *parts])


def config_path(name: str) -> str:
    """The shipped accelerate config ``name``: ``configs/accelerate/<name>`` when the cwd is a checkout (its
    ``configs`` links to sft/configs), else the absolute path inside the installed package."""
    rel = Path("configs") / "accelerate" / name
    if (Path.cwd() / rel).is_file():
        return str(rel)
    return str(CONFIG_DIR / name)


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
    (default :func:`check_ds_ccl_prereqs`) and ``environ`` (default os.environ: the CPATH / LD_LIBRARY_PATH that the
    oneCCL paths are prepended to) make the plan independent of this machine in tests."""
    if per not in PER_CHOICES:
        raise PlanError(f"--per must be one of {', '.join(PER_CHOICES)}, got {per!r}")
    if launcher not in LAUNCHERS:
        raise PlanError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    backend = resolve_backend(backend)
    train_argv = list(train_argv) if train_argv else list(DEFAULT_TRAIN_ARGV)
    notes: list[str] = []
    warnings: list[str] = []
    environ = os.environ if environ is None else environ
    ds_ccl = backend == "ds-ccl"
    if ds_ccl:
        if hostfile or launcher == "mpirun" or (nodes or 1) > 1:
            raise PlanError(
                "backend ds-ccl (experimental) is planned for one node with `accelerate launch` only (the form "
                f"verified in {CPU_COLLECTIVES_REPORT}); drop --nodes/--hostfile/--launcher mpirun, or use gloo"
            )
        pre = (prereq_check or check_ds_ccl_prereqs)(ccl_root)
        if pre.missing or not pre.ccl_root:
            missing = pre.missing or ["CCL_ROOT is not set"]
            raise PlanError(
                "backend ds-ccl (experimental) needs what is missing here:\n  - " + "\n  - ".join(missing)
                + f"\n  (details: {CPU_COLLECTIVES_REPORT}; gloo, the default, needs none of this)"
            )
        ccl_root = pre.ccl_root

    # -- hosts / nodes
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
        nodes = len(hosts)
    else:
        nodes = 1 if nodes is None else nodes
        if nodes < 1:
            raise PlanError(f"--nodes must be >= 1, got {nodes}")
        hosts = [topo.hostname] if nodes == 1 else [f"node{i}" for i in range(nodes)]
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
            master_addr = topo.hostname
            notes.append(
                f"MASTER_ADDR defaults to this host ({topo.hostname}); run the plan on node 0 or pass --master-addr"
            )

    # -- per-node rank layout
    if per == "numa" and len(topo.numa_nodes) == 1 and len(topo.sockets) > 1:
        warnings.append("--per numa: the machine reports a single NUMA node; this is one rank for all sockets")
    groups = _rank_groups(topo, per)
    if not groups:
        raise PlanError(f"no allowed physical core on {topo.hostname} (allowed CPUs: {format_cpu_list(topo.allowed)!r})")
    ranks_per_node = len(groups)
    world_size = nodes * ranks_per_node

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
                host=hosts[0],
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

    # -- env for every rank
    if iface is None and nodes > 1 and detect_network:
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
        per_node_iface = launcher == "mpirun" and iface is not None
    else:
        per_node_iface = False
    env: dict[str, str] = {
        "ACCELERATE_USE_CPU": "true",
        "SFT_BACKEND": backend,
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "KMP_AFFINITY": "granularity=fine,compact,1,0",
        "KMP_BLOCKTIME": "1",
    }
    launcher_env: dict[str, str] = {}
    unset_env: list[str] = []
    if ds_ccl:
        # ACCELERATE_USE_CPU would turn the DEEPSPEED launch into MULTI_CPU DDP over gloo, silently
        del env["ACCELERATE_USE_CPU"]
        unset_env.append("ACCELERATE_USE_CPU")
        assert ccl_root is not None
        launcher_env = {
            "CPATH": _prepend_path(os.path.join(ccl_root, "include"), environ.get("CPATH")),
            "LD_LIBRARY_PATH": _prepend_path(os.path.join(ccl_root, "lib"), environ.get("LD_LIBRARY_PATH")),
        }
        env.update(
            {
                "DS_ACCELERATOR": "cpu",
                "CCL_ROOT": ccl_root,
                **launcher_env,
                "LOCAL_SIZE": str(ranks_per_node),
            }
        )
    if backend in CCL_BACKENDS:
        worker_cpus = [c for rp in local for c in rp.ccl_worker_cpus]
        env.update(
            {
                "CCL_WORKER_COUNT": str(ccl_workers),
                "CCL_ATL_TRANSPORT": "ofi",
                "CCL_ATL_SHM": "1",
                "CCL_PROCESS_LAUNCHER": "none",
            }
        )
        if worker_cpus and len(worker_cpus) == ccl_workers * ranks_per_node:
            env["CCL_WORKER_AFFINITY"] = ",".join(str(c) for c in worker_cpus)
        if iface:
            env.update({"SFT_IFACE": "route"} if per_node_iface else {"CCL_KVS_IFACE": iface})
        elif nodes > 1:
            warnings.append(
                "no network interface known for oneCCL's KVS: on hosts with several NICs oneCCL can pick an "
                "unreachable one and hang at init; pass --iface NAME (sets CCL_KVS_IFACE)"
            )
    elif backend == "gloo" and iface and nodes > 1:
        env.update({"SFT_IFACE": "route"} if per_node_iface else {"GLOO_SOCKET_IFNAME": iface})

    # -- ranks of the whole job
    ranks: list[RankPlan] = []
    for node_rank in range(nodes):
        for rp in local:
            ranks.append(
                RankPlan(**{**asdict(rp), "rank": node_rank * ranks_per_node + rp.local_rank, "node_rank": node_rank, "host": hosts[node_rank]})
            )

    # -- commands
    pin_argv = ["-m", "launch.pin"]
    for rp in local:
        pin_argv += ["--cpus", format_cpu_list(rp.cpus)]
    if backend in CCL_BACKENDS:
        pin_argv += ["--ccl"]
    for k, v in env.items():
        pin_argv += ["--env", f"{k}={v}"]
    pin_argv += ["--", *train_argv]
    omp = str(min(rp.omp_num_threads for rp in local))
    commands: list[Command] = []
    if ds_ccl:
        config = config_path(DS_CCL_CONFIG)
        # no --cpu (accelerate rejects it with DeepSpeed; the Trainer's use_cpu=True puts the run on CPU) and no
        # --multi_gpu: the DEEPSPEED config selects accelerate's DeepSpeed launcher (torchrun on one node)
        argv = [
            "accelerate", "launch", "--config_file", config,
            "--num_processes", str(world_size), "--num_machines", "1",
            "--main_process_port", str(master_port),
            "--num_cpu_threads_per_process", omp,
            *pin_argv,
        ]  # fmt: skip
        commands.append(Command(node_rank=0, host=hosts[0], argv=argv))
        notes.append(
            "EXPERIMENTAL backend ds-ccl: DeepSpeed ZeRO-2 (configs/deepspeed/cpu_zero2_ccl.json) with the gradient "
            "all-reduce on oneCCL through DeepSpeed's deepspeed_ccl_comm op, forced onto a gloo group by "
            "sft.dist (torch >= 2.9 has no 'ccl' process group). It was 5-11x SLOWER than gloo on a small "
            f"shared machine (2 cores; measured table: {CPU_COLLECTIVES_REPORT}, section 2): re-measure on your "
            "nodes before using it, gloo stays the default"
        )
        notes.append(
            "ACCELERATE_USE_CPU is deliberately not set (with it accelerate ignores the DeepSpeed config and runs "
            "plain DDP over gloo); `unset ACCELERATE_USE_CPU` in your shell if you run the command by hand"
        )
        notes.append(
            "the first run JIT-compiles DeepSpeed's deepspeed_ccl_comm and deepspeed_shm_comm ops (minutes each; "
            "cached under $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions)"
        )
        if world_size == 1:
            warnings.append("world size 1: there is nothing to all-reduce, oneCCL is not used (plan gloo instead)")
    elif launcher == "mpirun":
        config = config_path("cpu_multi_node.yaml")
        argv = [
            "accelerate", "launch", "--config_file", config, "--cpu",
            "--mpirun_hostfile", str(hostfile),
            "--num_machines", str(nodes), "--num_processes", str(world_size),
            "--main_process_ip", master_addr, "--main_process_port", str(master_port),
            "--num_cpu_threads_per_process", omp,
            *pin_argv,
        ]  # fmt: skip
        commands.append(Command(node_rank=None, host=hosts[0], argv=argv))
        for h, s in zip(hosts, slots):
            if s is not None and s < ranks_per_node:
                warnings.append(f"hostfile gives {h} slots={s} < {ranks_per_node} ranks per node: mpirun will refuse")
        notes.append("run the one mpirun command on the first host; mpirun starts every rank (needs passwordless ssh)")
        notes.append("Open MPI refuses to run as root unless OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 are exported")
    elif world_size == 1:
        config = config_path("cpu_single.yaml")
        argv = [
            "accelerate", "launch", "--config_file", config, "--cpu",
            "--num_processes", "1", "--num_machines", "1",
            "--num_cpu_threads_per_process", omp,
            *pin_argv,
        ]  # fmt: skip
        commands.append(Command(node_rank=0, host=hosts[0], argv=argv))
    else:
        config = config_path("cpu_multi_socket.yaml" if nodes == 1 else "cpu_multi_node.yaml")
        for node_rank in range(nodes):
            argv = ["accelerate", "launch", "--config_file", config, "--multi_gpu", "--num_processes", str(world_size), "--num_machines", str(nodes)]
            if nodes > 1:
                argv += ["--machine_rank", str(node_rank), "--main_process_ip", master_addr]
            argv += ["--main_process_port", str(master_port), "--num_cpu_threads_per_process", omp, *pin_argv]
            commands.append(Command(node_rank=node_rank, host=hosts[node_rank], argv=argv))
        notes.append(
            "--multi_gpu only selects accelerate's torchrun launcher: the ranks run on CPU because launch.pin sets "
            "ACCELERATE_USE_CPU=true (without it each rank would train alone with world size 1)"
        )
        if nodes > 1:
            notes.append("start command N on node N (same MASTER_ADDR/port everywhere); SLURM: launch/slurm/cpu_multi_node.sbatch")
    plan = LaunchPlan(
        topology=topo.summary(),
        hosts=hosts,
        nodes=nodes,
        per=per,
        backend=backend,
        launcher=launcher,
        ranks_per_node=ranks_per_node,
        world_size=world_size,
        master_addr=master_addr,
        master_port=master_port,
        iface=iface,
        config_file=config,
        hostfile=hostfile,
        env=env,
        local_ranks=local,
        ranks=ranks,
        commands=commands,
        train_argv=train_argv,
        notes=notes,
        warnings=warnings,
        launcher_env=launcher_env,
        unset_env=unset_env,
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
