"""The process group: backend choice, initialisation, and the few collectives sft itself runs.

Call :func:`init_process_group_if_needed` before building ``Accelerator`` / the Trainer: accelerate skips its own
initialisation when a group exists, which is how ``ccl`` is used at all (accelerate >= 1.13 only knows gloo/mpi on
CPU), and how the timeout becomes configurable. On CPU it also sets ``ACCELERATE_USE_CPU=true``: accelerate 1.15
otherwise treats a torchrun-started CPU rank as a single process (distributed type NO) even with a group present.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch
import torch.distributed as tdist

from sft.distributed import ccl
from sft.distributed.ranks import deepspeed_launch, dist_info, fsdp_launch, is_initialized
from sft.patches.accelerate import enable_fsdp_on_cpu
from sft.runs import format_int_list


DEFAULT_TIMEOUT_S = 1800
CPU_BACKENDS = ("gloo", "ccl", "mpi", "ds-ccl")
EXPERIMENTAL_BACKENDS = ("ds-ccl",)  # only when requested explicitly, never chosen


def choose_backend(device: str = "cpu", requested: str | None = None) -> str:
    """'nccl' on CUDA; on CPU 'ccl' if oneccl_bindings_for_pytorch imports, else 'mpi' if torch has it, else 'gloo'.

    ``requested`` (default: $SFT_BACKEND, set by ``sft launch``) may force gloo/ccl/mpi/ds-ccl; 'auto' or None
    chooses (never 'ds-ccl': the experimental DeepSpeed+oneCCL path is only used when requested by name).
    """
    requested = requested if requested is not None else os.environ.get("SFT_BACKEND")
    if str(device).startswith("cuda"):
        return "nccl"
    if requested and requested != "auto":
        if requested == "ccl" and not ccl.ccl_importable():
            raise RuntimeError("backend 'ccl' requested but oneccl_bindings_for_pytorch does not import")
        if requested == "mpi" and not tdist.is_mpi_available():
            raise RuntimeError("backend 'mpi' requested but this torch was built without MPI")
        if requested == "ds-ccl" and not ccl.deepspeed_importable():
            raise RuntimeError("backend 'ds-ccl' requested but deepspeed is not importable: pip install 'deepspeed>=0.16'")
        if requested not in CPU_BACKENDS:
            raise RuntimeError(f"unknown CPU backend {requested!r} ({', '.join(CPU_BACKENDS)})")
        return requested
    if ccl.ccl_importable():
        return "ccl"
    if tdist.is_available() and tdist.is_mpi_available():
        return "mpi"
    return "gloo"


def init_process_group_if_needed(timeout_s: int = DEFAULT_TIMEOUT_S, device: str = "cpu") -> bool:
    """Initialise the default process group when launched with world size > 1. True if this call initialised it."""
    if not tdist.is_available() or tdist.is_initialized():
        return False
    info = dist_info()
    if info.world_size <= 1:
        return False
    cpu = not str(device).startswith("cuda")
    backend = choose_backend(device)
    ds_ccl = cpu and backend == "ds-ccl"
    if ds_ccl or (cpu and deepspeed_launch()):
        # DeepSpeed on CPU: ACCELERATE_USE_CPU (and TrainingArguments.use_cpu) would make accelerate drop the
        # DeepSpeed config and train plain DDP, silently. DeepSpeed's own CPU accelerator is selected instead.
        if os.environ.pop("ACCELERATE_USE_CPU", None) is not None:
            import sys

            why = "backend ds-ccl" if ds_ccl else "DeepSpeed launch on CPU"
            print(f"sft: {why}: removed ACCELERATE_USE_CPU from the environment (it would turn the DeepSpeed run "
                  "into plain DDP)", file=sys.stderr, flush=True)
        if not ds_ccl:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # ds-ccl checks and sets it itself
    elif cpu:
        os.environ["ACCELERATE_USE_CPU"] = "true"
        if fsdp_launch():
            enable_fsdp_on_cpu()
    # env:// needs RANK/WORLD_SIZE/MASTER_*; MPI launchers only set their own names (accelerate does the same copy).
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world_size))
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(info.local_world_size))
    os.environ.setdefault("MASTER_PORT", "29500")
    if "MASTER_ADDR" not in os.environ:
        if info.local_world_size != info.world_size and backend != "mpi":
            raise RuntimeError("multi-node run without MASTER_ADDR: export rank 0's address as MASTER_ADDR")
        os.environ["MASTER_ADDR"] = "127.0.0.1"
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs = {"backend": "gloo" if ds_ccl else backend, "timeout": timeout}
    if backend != "mpi":
        kwargs.update(rank=info.rank, world_size=info.world_size)
    if not cpu:
        torch.cuda.set_device(info.local_rank)
        kwargs["device_id"] = torch.device("cuda", info.local_rank)
    tdist.init_process_group(**kwargs)
    if ds_ccl:
        ccl.init_deepspeed_ccl(info, timeout)
    elif cpu and deepspeed_launch():
        # accelerate finds no backend on a CPU-only DeepSpeed launch and would count every rank as process 0 of 1
        # (DeepSpeed then fails its batch-size assertion); naming the backend once makes its state see the group.
        from accelerate import PartialState

        PartialState(backend=backend, timeout=timeout)
    if ds_ccl or (cpu and deepspeed_launch()):
        release_deepspeed_shm()
    return True


#: DeepSpeed's name for its CPU all-reduce buffers in /dev/shm (deepspeed/ops/csrc/cpu/comm/shm.cpp)
DEEPSPEED_SHM_PREFIX = "deepspeed_allreduce_buffer"


def deepspeed_shm_path(rank: int) -> Path:
    """This rank's DeepSpeed shared-memory all-reduce buffer, named as DeepSpeed names it:
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"{DEEPSPEED_SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def release_deepspeed_shm() -> Path | None:
    """Unlink this rank's DeepSpeed shared-memory all-reduce buffer (its name only: the mappings stay valid).

    DeepSpeed's CPU comm op (deepspeed_shm_comm; deepspeed.init_distributed loads it on its CPU accelerator and
    maps the buffers when LOCAL_SIZE equals the world size, as DeepSpeed's launcher and sft's ds-ccl backend set
    it) creates a 66 MB buffer per rank in /dev/shm, maps every peer's, and never unlinks them (deepspeed 0.19.8:
    its shared_close is never called). Every such run, finished or killed, left 66 MB of RAM per rank behind:
    264 buffers, 18 GB of this 24 GB machine's RAM, after one day of tests and benchmarks. DeepSpeed's init
    returns only once this rank has mapped every peer's buffer and nothing opens them by name later, so once
    every rank is past the init (the barrier here), each unlinks its own name and the memory goes with the last
    process. A collective: call it on every rank, after DeepSpeed's init. Returns the path it unlinked, if any."""
    if not is_initialized():
        return None
    barrier()
    path = deepspeed_shm_path(tdist.get_rank())
    try:
        path.unlink()
    except FileNotFoundError:
        return None
    return path


def barrier() -> None:
    if is_initialized() and tdist.get_world_size() > 1:
        tdist.barrier()


def _collective_device() -> torch.device:
    if is_initialized() and str(tdist.get_backend()) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_max_flag(flag: bool) -> bool:
    """True on every rank if any rank passed True: ranks agree to stop (or skip, or save) together."""
    if not is_initialized() or tdist.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_min_int(value: int) -> int:
    """The smallest ``value`` over all ranks (e.g. steps per epoch, so every rank takes the same number of steps)."""
    if not is_initialized() or tdist.get_world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=_collective_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    return int(t.item())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``t`` over all ranks (a new CPU tensor; ``t`` itself on one rank)."""
    if not is_initialized() or tdist.get_world_size() == 1:
        return t
    out = t.to(_collective_device()).clone()
    tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
    return out.cpu()


def all_gather_concat(part):
    """Every rank's 1-D numpy array ``part``, concatenated in rank order, on every rank (sizes may differ)."""
    import numpy as np

    if not is_initialized() or tdist.get_world_size() == 1:
        return part
    parts: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(parts, part)
    return np.concatenate(parts)


def run_metadata() -> dict:
    """Facts to store with run outputs: backend, world size, threads per rank, pinning."""
    info = dist_info()
    try:
        affinity = format_int_list(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    backend = info.backend or ("none" if info.world_size == 1 else os.environ.get("SFT_BACKEND"))
    if ccl._ds_ccl_active:
        backend = "ds-ccl"  # torch group: gloo; DeepSpeed's CCLBackend runs all_reduce/broadcast/barrier on oneCCL
    meta = {
        "backend": backend,
        "world_size": info.world_size,
        "local_world_size": info.local_world_size,
        "rank": info.rank,
        "hostname": info.hostname,
        "threads_per_rank": info.threads_per_rank,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_affinity": affinity,
        "pinned_by_launch_pin": os.environ.get("SFT_PINNED_CPUS") is not None,
    }
    if ccl._ds_ccl_active:
        meta["process_group_backend"] = info.backend
        meta["deepspeed_comm"] = "CCLBackend"
    for k in ("CCL_WORKER_COUNT", "CCL_WORKER_AFFINITY", "CCL_ATL_TRANSPORT", "KMP_AFFINITY", "DS_ACCELERATOR", "CCL_ROOT"):
        if k in os.environ:
            meta[k.lower()] = os.environ[k]
    return meta
