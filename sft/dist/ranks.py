"""Rank facts, read from the environment of whichever launcher started this process: torchrun/accelerate (RANK,
LOCAL_RANK, WORLD_SIZE), Intel MPI / MPICH (PMI_RANK, PMI_SIZE, MPI_LOCALRANKID), Open MPI (OMPI_COMM_WORLD_*),
MVAPICH (MV2_COMM_WORLD_*), the same list accelerate uses; and which sharded launch (DeepSpeed ZeRO-3, FSDP) this is."""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as tdist


RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


LOCAL_RANK_VARS = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")


LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")


def _env_int(names, default: int) -> int:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            return int(v)
    return default


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    backend: str | None  # the initialised group's backend, None before init
    threads_per_rank: int
    hostname: str

    def to_dict(self) -> dict:
        return asdict(self)


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def dist_info() -> DistInfo:
    if is_initialized():
        rank, world, backend = tdist.get_rank(), tdist.get_world_size(), str(tdist.get_backend())
    else:
        rank, world, backend = _env_int(RANK_VARS, 0), _env_int(WORLD_SIZE_VARS, 1), None
    return DistInfo(
        rank=rank,
        local_rank=_env_int(LOCAL_RANK_VARS, 0),
        world_size=world,
        local_world_size=_env_int(LOCAL_SIZE_VARS, 1),
        backend=backend,
        threads_per_rank=torch.get_num_threads(),
        hostname=socket.gethostname(),
    )


def device() -> torch.device:
    """This rank's compute device: its local GPU where CUDA exists, else the CPU."""
    return torch.device("cuda", dist_info().local_rank) if torch.cuda.is_available() else torch.device("cpu")


def is_main_process() -> bool:
    return dist_info().rank == 0


def deepspeed_launch() -> bool:
    """True when ``accelerate launch`` started this process with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").strip().lower() in ("1", "true", "yes")


def fsdp_launch() -> bool:
    """True when ``accelerate launch`` started this process with an FSDP config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in ("1", "true", "yes")


def sharded_launch() -> str | None:
    """'DeepSpeed ZeRO-3' or 'FSDP' when this process was started by such a launch, else None.

    Read from what ``accelerate launch`` exports (ACCELERATE_USE_FSDP; ACCELERATE_USE_DEEPSPEED with
    ACCELERATE_DEEPSPEED_ZERO_STAGE or the stage in ACCELERATE_DEEPSPEED_CONFIG_FILE) and from transformers'
    own ZeRO-3 flag (set once a TrainingArguments with a ZeRO-3 config exists)."""
    import json as _json

    if fsdp_launch():
        return "FSDP"
    if deepspeed_launch():
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").strip()
        if not stage and os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
            try:
                ds = _json.loads(Path(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]).read_text())
                stage = str(ds.get("zero_optimization", {}).get("stage", ""))
            except (OSError, ValueError, AttributeError):
                stage = ""
        if stage == "3":
            return "DeepSpeed ZeRO-3"
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            return "DeepSpeed ZeRO-3"
    except ImportError:
        pass
    return None


def zero3_init() -> bool:
    """True while transformers loads models partitioned (a ZeRO-3 TrainingArguments exists in this process)."""
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return is_deepspeed_zero3_enabled()
