"""``sft plan`` and ``sft launch``: argument parsing and the two commands (wired into sft.cli by the lead).

    sft plan [--nodes N] [--hostfile F] [--per socket|numa] [--backend auto|gloo|ccl|mpi|ds-ccl] [--json]
    sft launch [same options] [--machine-rank R] [--dry-run] -- train --config configs/train/demo.yaml

Also runnable on its own: ``python -m launch.cli plan ...`` / ``python -m launch.cli launch ... -- TRAIN ARGS``.
``TRAIN ARGS`` are the arguments of ``sft`` (``train ...``), or a python program (``x.py ...``, ``-m mod ...``).

``--backend ds-ccl`` is experimental (DeepSpeed ZeRO-2 with oneCCL all-reduce; slower than gloo on small machines,
see benchmarks/results/cpu_collectives.md) and needs ``--ccl-root`` or $CCL_ROOT; ``auto`` never picks it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

from .backends import BACKENDS
from .commands import REPO_ROOT
from .errors import PlanError
from .network import DEFAULT_PORT
from .plan import LAUNCHERS, PER_CHOICES, LaunchPlan, format_plan, make_plan
from .topology import TopologyError, detect_topology, load_topology

NODE_RANK_VARS = ("SFT_MACHINE_RANK", "SLURM_NODEID", "NODE_RANK", "OMPI_COMM_WORLD_NODE_RANK")


def add_plan_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("launch plan")
    g.add_argument("--nodes", type=int, default=None, help="number of nodes (default 1, or the hostfile's host count)")
    g.add_argument("--hostfile", default=None, help="MPI hostfile (`host slots=N` or `host:N` lines); implies the mpirun form")
    g.add_argument("--per", choices=PER_CHOICES, default="socket", help="one rank per socket (default) or per NUMA node")
    g.add_argument("--backend", choices=BACKENDS, default="auto", help="CPU collective backend (auto: ccl if its binding imports, else mpi if torch has it, else gloo; never ds-ccl). ds-ccl: EXPERIMENTAL DeepSpeed ZeRO-2 + oneCCL all-reduce, one node, slower than gloo on small machines (benchmarks/results/cpu_collectives.md)")
    g.add_argument("--ccl-root", default=None, metavar="PREFIX", help="with --backend ds-ccl: the oneCCL 2021.17.2 prefix (default $CCL_ROOT)")
    g.add_argument("--launcher", choices=LAUNCHERS, default="auto", help="accelerate (one `accelerate launch` per node) or mpirun (needs --hostfile); auto picks mpirun when a hostfile is given")
    g.add_argument("--master-addr", default=None, help="address of node 0 (default: 127.0.0.1 for one node, the first hostfile host, or this host)")
    g.add_argument("--master-port", type=int, default=DEFAULT_PORT)
    g.add_argument("--iface", default=None, help="network interface for rendezvous (CCL_KVS_IFACE / GLOO_SOCKET_IFNAME); default: the one routing to the master")
    g.add_argument("--topology", default=None, metavar="LSCPU_FILE", help="plan for the machine recorded with `lscpu -p=CPU,CORE,SOCKET,NODE > FILE` instead of this one")
    g.add_argument("--allowed-cpus", default=None, metavar="LIST", help="with --topology: the CPUs a job may use there (cgroup cpuset), e.g. 0-27,112-139")
    g.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def add_launch_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_plan_arguments(parser)
    g = parser.add_argument_group("launch")
    g.add_argument("--machine-rank", type=int, default=None, help="this node's rank (default: $SLURM_NODEID / $NODE_RANK, the hostfile position of this host, or 0)")
    g.add_argument("--dry-run", action="store_true", help="print the plan and the command, do not run it")
    parser.add_argument("train_argv", nargs=argparse.REMAINDER, metavar="-- TRAIN ARGS",
                        help="the command every rank runs: sft arguments (`-- train cfg.yaml`) or `-- x.py ...`")
    return parser


def _topology(args):
    if getattr(args, "topology", None):
        return load_topology(args.topology, allowed=getattr(args, "allowed_cpus", None))
    if getattr(args, "allowed_cpus", None):
        raise PlanError("--allowed-cpus only applies with --topology (this machine's allowed set is read from the kernel)")
    return detect_topology()


def build_plan(args, train_argv: list[str] | None = None, on_this_host: bool = False) -> LaunchPlan:
    """The plan for ``args``. ``on_this_host``: the plan runs here (``sft launch``), so the network to look at is
    this host's even when ``--topology`` describes the CPUs from a file; ``sft plan --topology`` plans for another
    machine and leaves the interface to ``--iface``."""
    return make_plan(
        _topology(args),
        nodes=args.nodes,
        hostfile=args.hostfile,
        per=args.per,
        backend=args.backend,
        launcher=args.launcher,
        master_addr=args.master_addr,
        master_port=args.master_port,
        iface=args.iface,
        train_argv=train_argv,
        detect_network=on_this_host or not getattr(args, "topology", None),
        ccl_root=getattr(args, "ccl_root", None),
    )


def plan_command(args) -> int:
    try:
        plan = build_plan(args)
    except (PlanError, TopologyError, OSError) as exc:
        print(f"sft plan: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0


def _machine_rank(args, plan: LaunchPlan) -> int:
    if getattr(args, "machine_rank", None) is not None:
        return args.machine_rank
    for var in NODE_RANK_VARS:
        if os.environ.get(var, "") != "":
            return int(os.environ[var])
    names = {socket.gethostname(), socket.getfqdn(), socket.gethostname().split(".")[0]}
    for i, h in enumerate(plan.hosts):
        if h in names:
            return i
    return 0


def _executable_argv(argv: list[str]) -> list[str]:
    """Run accelerate with this interpreter (works when the venv's bin is not on PATH)."""
    if argv[:2] == ["accelerate", "launch"]:
        return [sys.executable, "-m", "accelerate.commands.launch", *argv[2:]]
    return argv


def launch_env(plan: LaunchPlan, environ=None) -> dict[str, str]:
    """The environment for the launcher process: ``environ`` (default os.environ) + the plan's launcher_env, minus its
    unset_env (e.g. ds-ccl: LD_LIBRARY_PATH/CPATH with the oneCCL paths, and no ACCELERATE_USE_CPU)."""
    env = dict(os.environ if environ is None else environ)
    env.update(plan.launcher_env)
    for k in plan.unset_env:
        if env.pop(k, None) is not None:
            print(f"sft launch: note: removed {k} from the launch environment (backend {plan.backend})", file=sys.stderr)
    return env


def launch_command(args, train_argv: list[str] | None = None) -> int:
    """Plan for this machine and run this node's command (or the one mpirun command). Returns its exit status.

    ``train_argv`` defaults to ``args.train_argv`` (the REMAINDER positional of :func:`add_launch_arguments`).
    """
    if train_argv is None:
        train_argv = list(getattr(args, "train_argv", None) or [])
    if train_argv[:1] == ["--"]:
        train_argv = train_argv[1:]
    if not train_argv:
        print("sft launch: error: give the training command after `--`, e.g. `sft launch -- train cfg.yaml`", file=sys.stderr)
        return 2
    train_argv = list(train_argv)
    if train_argv[0] not in ("sft", "python", "python3", "-m") and not train_argv[0].endswith(".py"):
        train_argv = ["sft", *train_argv]  # `sft launch -- train cfg.yaml` runs `sft train cfg.yaml` on every rank
    try:
        plan = build_plan(args, train_argv, on_this_host=True)
        node = _machine_rank(args, plan)
        if not 0 <= node < plan.nodes:
            raise PlanError(f"machine rank {node} is outside 0..{plan.nodes - 1}")
        cmd = plan.command_for_node(node)
    except (PlanError, TopologyError, OSError) as exc:
        print(f"sft launch: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2), file=sys.stderr)
    else:
        print(format_plan(plan), file=sys.stderr)
    print(f"\nsft launch: node {node}: {cmd.shell()}", file=sys.stderr, flush=True)
    if getattr(args, "dry_run", False):
        return 0
    env = launch_env(plan)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    try:
        return subprocess.run(_executable_argv(cmd.argv), env=env).returncode
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m launch.cli")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_plan_arguments(sub.add_parser("plan", help="print the launch plan for this machine"))
    add_launch_arguments(sub.add_parser("launch", help="launch training ranks: `launch [opts] -- train cfg.yaml`"))
    args = ap.parse_args(argv)
    if args.cmd == "plan":
        return plan_command(args)
    return launch_command(args)


def register(sub) -> None:
    """``sft plan`` and ``sft launch`` (the ``sft.commands`` entry point ``launch``, see pyproject.toml)."""
    p = sub.add_parser("plan", help="print the launch plan for this machine's sockets / NUMA nodes / nodes")
    add_plan_arguments(p)
    p.set_defaults(func=plan_command)
    p = sub.add_parser("launch", help="run a train command with the launch plan (accelerate launch / mpirun)")
    add_launch_arguments(p)
    p.set_defaults(func=launch_command)


if __name__ == "__main__":
    sys.exit(main())

