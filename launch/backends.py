"""Collective backends of a launch plan: resolving ``auto``, and what backends ``ccl`` and ``ds-ccl`` need.

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
  over gloo (MULTI_CPU). ``sft launch`` removes an inherited one. The ranks' sft.distributed then creates a gloo
  group and forces DeepSpeed's CCLBackend on it (the workaround from the report).

Because launch.pin's ``--env`` values are only defaults (a variable the launcher's env already has is kept),
CPATH / LD_LIBRARY_PATH are also in ``LaunchPlan.launcher_env``: ``sft launch`` sets them in the environment of the
``accelerate launch`` it runs; by hand, export them first (``sft plan`` prints the lines).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PlanError

BACKENDS = ("auto", "gloo", "ccl", "mpi", "ds-ccl")
EXPERIMENTAL_BACKENDS = ("ds-ccl",)  # never chosen by "auto"
CCL_BACKENDS = ("ccl", "ds-ccl")  # backends whose ranks run a oneCCL worker thread (reserved core, CCL_* env)
CPU_COLLECTIVES_REPORT = "benchmarks/results/cpu_collectives.md"
ONECCL_PINS = (
    "oneccl==2021.17.2 oneccl-devel==2021.17.2 impi-rt==2021.17.2 "
    "intel-sycl-rt==2025.3.3 intel-cmplr-lib-rt==2025.3.3 intel-cmplr-lib-ur==2025.3.3"
)


def resolve_backend(backend: str) -> str:
    """``auto`` -> what this Python would use on CPU (ccl if its binding imports, else mpi if torch has it, else gloo).

    ``auto`` never resolves to an experimental backend (``ds-ccl``): those are explicit choices only.
    """
    if backend not in BACKENDS:
        raise PlanError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    try:
        from sft.distributed import choose_backend

        chosen = choose_backend("cpu")
        if chosen in EXPERIMENTAL_BACKENDS:  # $SFT_BACKEND=ds-ccl must not turn "auto" into ds-ccl
            chosen = choose_backend("cpu", "auto")
    except Exception:  # torch missing on a login node: plan for the portable default
        return "gloo"
    return chosen if chosen in BACKENDS and chosen not in EXPERIMENTAL_BACKENDS else "gloo"


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


def require_ds_ccl(hostfile: str | None, launcher: str, nodes: int | None, ccl_root: str | None,
                   prereq_check: Callable[[str | None], DsCclPrereqs] | None) -> str:
    """The oneCCL prefix for backend ``ds-ccl``, or a PlanError: one node, accelerate only, prerequisites met."""
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
    return pre.ccl_root


def _prepend_path(first: str, existing: str | None) -> str:
    parts = [p for p in (existing or "").split(os.pathsep) if p and p != first]
    return os.pathsep.join([first, *parts])


def ds_ccl_env(env: dict[str, str], ccl_root: str, environ: Mapping[str, str],
               ranks_per_node: int) -> tuple[dict[str, str], list[str]]:
    """Backend ``ds-ccl``'s rank env (added to ``env``); ``(launcher_env, unset_env)`` for the launching shell."""
    # ACCELERATE_USE_CPU would turn the DEEPSPEED launch into MULTI_CPU DDP over gloo, silently
    del env["ACCELERATE_USE_CPU"]
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
    return launcher_env, ["ACCELERATE_USE_CPU"]


def ccl_env(env: dict[str, str], worker_cpus: list[int], ccl_workers: int, ranks_per_node: int, nodes: int,
            iface: str | None, per_node_iface: bool, warnings: list[str]) -> None:
    """The oneCCL variables of backends ``ccl`` and ``ds-ccl``, added to ``env``; ``worker_cpus``: the CPUs reserved
    for the oneCCL workers of the node's ranks, in local-rank order."""
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
