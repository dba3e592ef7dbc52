"""Per-rank wrapper: pin this rank to its CPUs, set its thread count and env, then exec the training program.

    python -m launch.pin --cpus 0-55 --cpus 56-111 [--ccl] [--env KEY=VALUE ...] -- sft train ...
    python -m launch.pin --per socket [--backend gloo] -- sft train ...    # plan on this node at start-up

Every launcher (accelerate/torchrun, mpirun, srun) starts ``python -m launch.pin ...`` once per rank. The wrapper
reads its local rank from LOCAL_RANK | MPI_LOCALRANKID | OMPI_COMM_WORLD_LOCAL_RANK | MV2_COMM_WORLD_LOCAL_RANK |
SLURM_LOCALID, takes the ``--cpus`` list with that index, calls ``os.sched_setaffinity`` (inherited by every thread
the training program creates, since it happens before exec), and sets OMP_NUM_THREADS to the number of CPUs (one per
physical core). ``--env`` values are defaults: a variable the launcher already set (MASTER_ADDR/PORT from torchrun,
for instance) is kept. Configuration travels as arguments because Open MPI does not forward environment variables to
remote nodes. ``--cpus`` refers to logical CPU ids of the node the rank runs on; all nodes are assumed alike
(``--per`` plans on the node itself instead).

This module does not import torch: the exec'd program starts with the env already in place, so the OpenMP runtime
reads the right OMP_NUM_THREADS.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from .errors import PinError
from .ranks import pin_settings
from .topology import cgroup_cpuset, format_cpu_list, parse_cpu_list

LOCAL_RANK_VARS = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")


def local_rank_from_env(env=None) -> int:
    env = os.environ if env is None else env
    for var in LOCAL_RANK_VARS:
        v = env.get(var)
        if v not in (None, ""):
            return int(v)
    return 0


def resolve_target(argv: list[str]) -> list[str]:
    """argv of the program to exec: ``x.py ...`` / ``-m mod ...`` / ``python ...`` run under this interpreter."""
    if not argv:
        raise PinError("nothing to run: give the training command after `--`, e.g. `-- sft train`")
    head = argv[0]
    if head == "-m" or head.endswith(".py"):
        return [sys.executable, *argv]
    if head in ("python", "python3"):
        return [sys.executable, *argv[1:]]
    exe = shutil.which(head)
    if exe is None:
        cand = Path(sys.executable).parent / head  # console scripts of this venv even when it is not on PATH
        if cand.exists():
            exe = str(cand)
    if exe is None:
        raise PinError(f"{head!r} not found on PATH or next to {sys.executable}")
    return [exe, *argv[1:]]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        own, target = argv[:i], argv[i + 1 :]
    else:
        own, target = argv, []
    ap = argparse.ArgumentParser(prog="python -m launch.pin", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpus", action="append", default=[], help="CPU list of local rank i (repeat once per local rank)")
    ap.add_argument("--per", choices=["socket", "numa"], help="instead of --cpus: plan on this node at start-up")
    ap.add_argument("--backend", default=None, help="with --per: auto|gloo|ccl|mpi (default: $SFT_BACKEND or auto)")
    ap.add_argument("--ccl", action="store_true", help="set CCL_LOCAL_RANK / CCL_LOCAL_SIZE for oneCCL")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="default env for the rank")
    ap.add_argument("--dry-run", action="store_true", help="print what would be done, do not pin or exec")
    args = ap.parse_args(own)

    extra_env: dict[str, str] = {}
    for kv in args.env:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            ap.error(f"--env expects KEY=VALUE, got {kv!r}")
        extra_env[k] = v

    ccl = args.ccl
    if args.cpus:
        cpu_sets = [parse_cpu_list(c) for c in args.cpus]
    elif args.per:
        from .plan import make_plan
        from .topology import detect_topology

        backend = args.backend or extra_env.get("SFT_BACKEND") or os.environ.get("SFT_BACKEND") or "auto"
        plan = make_plan(detect_topology(), per=args.per, backend=backend, detect_network=False)
        backend = plan.backend  # "auto" resolved on this node (imports torch once, before the exec)
        cpu_sets = [rp.cpus for rp in plan.local_ranks]
        for k, v in plan.env.items():
            if k not in ("MASTER_ADDR", "MASTER_PORT"):
                extra_env.setdefault(k, v)
        ccl = ccl or backend == "ccl"
    else:
        ap.error("give --cpus (one per local rank) or --per socket|numa")

    if (extra_env.get("SFT_IFACE") or os.environ.get("SFT_IFACE")) == "route":
        # the mpirun form: this node's interface that routes to the master (names differ between hosts)
        from .network import detect_iface

        master = extra_env.get("MASTER_ADDR") or os.environ.get("MASTER_ADDR", "")
        name = detect_iface(master) if master else None
        if name is None:
            print(f"launch.pin: error: no network interface of this host routes to the master address {master!r}; "
                  "pass --iface NAME to sft launch", file=sys.stderr)
            return 2
        if name != "lo":
            extra_env.setdefault("GLOO_SOCKET_IFNAME", name)
            extra_env.setdefault("CCL_KVS_IFACE", name)

    local_rank = local_rank_from_env()
    try:
        cpus, rank_env = pin_settings(cpu_sets, local_rank, ccl=ccl)
        cmd = resolve_target(target)
    except PinError as exc:
        print(f"launch.pin: error: {exc}", file=sys.stderr)
        return 2
    allowed = cgroup_cpuset()
    if allowed is not None and not set(cpus) <= set(allowed):
        outside = format_cpu_list(set(cpus) - set(allowed))
        print(f"launch.pin: error: CPUs {outside} are outside this cgroup's cpuset {format_cpu_list(allowed)}", file=sys.stderr)
        return 2
    summary = f"launch.pin: local rank {local_rank}/{len(cpu_sets)}: cpus {format_cpu_list(cpus)}, OMP_NUM_THREADS={len(cpus)}"
    if args.dry_run:
        print(summary)
        print("env:", " ".join(f"{k}={v}" for k, v in {**extra_env, **rank_env}.items()))
        print("exec:", " ".join(cmd))
        return 0
    for k, v in extra_env.items():
        os.environ.setdefault(k, v)
    os.environ.update(rank_env)
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        print(f"launch.pin: error: cannot pin to {format_cpu_list(cpus)}: {exc}", file=sys.stderr)
        return 2
    print(summary, file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
