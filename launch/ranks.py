"""A rank's share of its node: the CPUs it is pinned to and the environment that goes with them.

Used by the plan (:mod:`launch.plan`, each rank's env) and by the per-rank wrapper (:mod:`launch.pin`), which pins
itself to them before it execs the training program. No torch here: the wrapper imports this before the exec.
"""

from __future__ import annotations

from .errors import PinError
from .topology import format_cpu_list


def pin_settings(cpu_sets: list[list[int]], local_rank: int, ccl: bool = False) -> tuple[list[int], dict[str, str]]:
    """(cpus, per-rank env) for ``local_rank``; refuses a rank the plan has no CPUs for (oversubscription)."""
    if local_rank >= len(cpu_sets) or local_rank < 0:
        raise PinError(
            f"local rank {local_rank} but the plan pins only {len(cpu_sets)} rank(s) per node: more ranks were started "
            "per node than planned (they would oversubscribe the cores); check --num_processes / --npernode"
        )
    cpus = sorted(cpu_sets[local_rank])
    env = {"OMP_NUM_THREADS": str(len(cpus)), "SFT_PINNED_CPUS": format_cpu_list(cpus), "SFT_LOCAL_SIZE": str(len(cpu_sets))}
    if ccl:
        env.update({"CCL_LOCAL_RANK": str(local_rank), "CCL_LOCAL_SIZE": str(len(cpu_sets))})
    return cpus, env
