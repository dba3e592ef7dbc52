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


def resolve_deepspeed_config_file() -> None:
    """Make the DeepSpeed config file an accelerate config names (``deepspeed_config_file``, exported as
    ACCELERATE_DEEPSPEED_CONFIG_FILE) absolute, so that a launch works from any directory and from a wheel install.

    accelerate passes the path on as written, and DeepSpeed reads it relative to the current directory: sft's
    shipped ``configs/deepspeed/zero2.json``, launched from another directory, failed after the model had loaded
    with an 80-line JSONDecodeError (a missing file is parsed as JSON text). A relative path is looked up in the
    current directory, then in the sft package (where ``configs/`` lives in a checkout and in a wheel); one found
    in neither stops the run here, in one line, before any work."""
    name = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "").strip()
    if not name or name == "none" or name.startswith("{") or not deepspeed_launch():
        return
    p = Path(name).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, Path(__file__).resolve().parent.parent / p]
    for c in candidates:
        if c.is_file():
            os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(c.resolve())
            return
    from sft.errors import SftError

    raise SftError(f"the accelerate config's deepspeed_config_file {name} does not exist (looked in "
                   f"{' and '.join(str(c.parent) for c in candidates)}); give its absolute path in the accelerate "
                   f"YAML, or launch from the directory it is relative to")


def zero3_init() -> bool:
    """True while transformers loads models partitioned (a ZeRO-3 TrainingArguments exists in this process)."""
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return is_deepspeed_zero3_enabled()


# ------------------------------------------------------------------------------------ launches that went wrong


def _launcher_argv(pid: int) -> list[str]:
    """The command line of process ``pid`` ([] where /proc cannot tell)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def requested_processes(argv: list[str]) -> int | None:
    """The process count an ``accelerate launch`` command line asks for (``--num_processes``, else its
    ``--config_file``'s ``num_processes``); None when ``argv`` is not an accelerate launch or names none. Only the
    launcher's own options count: scanning stops at the program it runs (``sft``, ``sft.cli``, ``launch.pin``)."""
    if not any(a.endswith("accelerate") or a.startswith("accelerate.commands.launch") for a in argv[:3]):
        return None
    opts: dict[str, str] = {}
    for i, a in enumerate(argv):
        if a in ("sft.cli", "launch.pin") or Path(a).name == "sft":
            break
        for name in ("--num_processes", "--config_file"):
            if a == name and i + 1 < len(argv):
                opts[name] = argv[i + 1]
            elif a.startswith(name + "="):
                opts[name] = a.split("=", 1)[1]
    if "--num_processes" in opts:
        try:
            return int(opts["--num_processes"])
        except ValueError:
            return None
    if "--config_file" in opts:
        import yaml

        try:
            n = (yaml.safe_load(Path(opts["--config_file"]).read_text()) or {}).get("num_processes")
        except (OSError, yaml.YAMLError, AttributeError):
            return None
        return n if isinstance(n, int) else None
    return None


def check_launch(info: DistInfo) -> None:
    """Stop (one line, naming the fix) when the ``accelerate launch`` that started this process asked for N > 1
    processes and this run has one: accelerate 1.15 starts ONE process for a MULTI_CPU config without an mpirun
    hostfile, and that process would train alone, as if nothing were wrong."""
    if info.world_size > 1:
        return
    n = requested_processes(_launcher_argv(os.getppid()))
    if n is not None and n > 1:
        from sft.errors import SftError

        raise SftError(
            f"accelerate launch asked for {n} processes but started 1 (a MULTI_CPU config without an mpirun hostfile "
            f"starts one process). Launch with sft's configs/accelerate/cpu_multi_socket.yaml (it starts {n} CPU "
            f"ranks), add --multi_gpu to your command (sft keeps the ranks on CPU), or use `sft launch -- train ...`")


def oversubscription(info: DistInfo) -> str | None:
    """A warning when this node runs more ranks than it has cores for (each rank then gets less than one core,
    and their threads preempt each other), with the plan that fits; None when the ranks fit."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    ranks = info.local_world_size
    if ranks <= cores:
        return None
    return (f"{ranks} ranks on this node share {cores} core(s) ({torch.get_num_threads()} thread(s) each): the "
            f"ranks preempt each other and every collective waits for the slowest. Plan: at most {cores} rank(s) "
            f"on this node (--num_processes {cores} per node, 1 thread each), or one rank per socket with "
            f"`sft launch` (`sft plan` prints it)")
