"""The commands of a launch plan: which ``accelerate launch`` line(s) start the ranks, each through launch.pin.

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
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from sft.config.load import CONFIG_DIR as SFT_CONFIG_DIR

from .backends import CPU_COLLECTIVES_REPORT

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = SFT_CONFIG_DIR / "accelerate"  # shipped inside the sft package
DS_CCL_CONFIG = "cpu_deepspeed_ccl.yaml"


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


def config_path(name: str) -> str:
    """The shipped accelerate config ``name``: ``configs/accelerate/<name>`` when the cwd is a checkout (its
    ``configs`` links to sft/configs), else the absolute path inside the installed package."""
    rel = Path("configs") / "accelerate" / name
    if (Path.cwd() / rel).is_file():
        return str(rel)
    return str(CONFIG_DIR / name)


@dataclass
class Job:
    """What the commands start: the hosts (and the hostfile's slots), the ranks, the master, and ``pin_argv`` (the
    launch.pin wrapper and the training program it execs) with ``omp`` threads per rank."""

    hosts: list[str]
    slots: list[int | None]
    nodes: int
    ranks_per_node: int
    world_size: int
    master_addr: str
    master_port: int
    hostfile: str | None
    pin_argv: list[str]
    omp: str


def _ds_ccl_commands(job: Job, notes: list[str], warnings: list[str]) -> tuple[str, list[Command]]:
    config = config_path(DS_CCL_CONFIG)
    # no --cpu (accelerate rejects it with DeepSpeed; the Trainer's use_cpu=True puts the run on CPU) and no
    # --multi_gpu: the DEEPSPEED config selects accelerate's DeepSpeed launcher (torchrun on one node)
    argv = [
        "accelerate", "launch", "--config_file", config,
        "--num_processes", str(job.world_size), "--num_machines", "1",
        "--main_process_port", str(job.master_port),
        "--num_cpu_threads_per_process", job.omp,
        *job.pin_argv,
    ]  # fmt: skip
    notes.append(
        "EXPERIMENTAL backend ds-ccl: DeepSpeed ZeRO-2 (configs/deepspeed/cpu_zero2_ccl.json) with the gradient "
        "all-reduce on oneCCL through DeepSpeed's deepspeed_ccl_comm op, forced onto a gloo group by "
        "sft.distributed (torch >= 2.9 has no 'ccl' process group). It was 5-11x SLOWER than gloo on a small "
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
    if job.world_size == 1:
        warnings.append("world size 1: there is nothing to all-reduce, oneCCL is not used (plan gloo instead)")
    return config, [Command(node_rank=0, host=job.hosts[0], argv=argv)]


def _mpirun_commands(job: Job, notes: list[str], warnings: list[str]) -> tuple[str, list[Command]]:
    config = config_path("cpu_multi_node.yaml")
    argv = [
        "accelerate", "launch", "--config_file", config, "--cpu",
        "--mpirun_hostfile", str(job.hostfile),
        "--num_machines", str(job.nodes), "--num_processes", str(job.world_size),
        "--main_process_ip", job.master_addr, "--main_process_port", str(job.master_port),
        "--num_cpu_threads_per_process", job.omp,
        *job.pin_argv,
    ]  # fmt: skip
    for h, s in zip(job.hosts, job.slots):
        if s is not None and s < job.ranks_per_node:
            warnings.append(f"hostfile gives {h} slots={s} < {job.ranks_per_node} ranks per node: mpirun will refuse")
    notes.append("run the one mpirun command on the first host; mpirun starts every rank (needs passwordless ssh)")
    notes.append("Open MPI refuses to run as root unless OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 are exported")
    return config, [Command(node_rank=None, host=job.hosts[0], argv=argv)]


def _single_command(job: Job) -> tuple[str, list[Command]]:
    config = config_path("cpu_single.yaml")
    argv = [
        "accelerate", "launch", "--config_file", config, "--cpu",
        "--num_processes", "1", "--num_machines", "1",
        "--num_cpu_threads_per_process", job.omp,
        *job.pin_argv,
    ]  # fmt: skip
    return config, [Command(node_rank=0, host=job.hosts[0], argv=argv)]


def _per_node_commands(job: Job, notes: list[str]) -> tuple[str, list[Command]]:
    nodes = job.nodes
    config = config_path("cpu_multi_socket.yaml" if nodes == 1 else "cpu_multi_node.yaml")
    commands = []
    for node_rank in range(nodes):
        argv = ["accelerate", "launch", "--config_file", config, "--multi_gpu", "--num_processes", str(job.world_size), "--num_machines", str(nodes)]
        if nodes > 1:
            argv += ["--machine_rank", str(node_rank), "--main_process_ip", job.master_addr]
        argv += ["--main_process_port", str(job.master_port), "--num_cpu_threads_per_process", job.omp, *job.pin_argv]
        commands.append(Command(node_rank=node_rank, host=job.hosts[node_rank], argv=argv))
    notes.append(
        "--multi_gpu only selects accelerate's torchrun launcher: the ranks run on CPU because launch.pin sets "
        "ACCELERATE_USE_CPU=true (without it each rank would train alone with world size 1)"
    )
    if nodes > 1:
        notes.append("start command N on node N (same MASTER_ADDR/port everywhere); SLURM: launch/slurm/cpu_multi_node.sbatch")
    return config, commands


def build_commands(job: Job, ds_ccl: bool, launcher: str, notes: list[str],
                   warnings: list[str]) -> tuple[str, list[Command]]:
    """``(accelerate config file, commands)`` for the launch form the job needs (see the module docstring)."""
    if ds_ccl:
        return _ds_ccl_commands(job, notes, warnings)
    if launcher == "mpirun":
        return _mpirun_commands(job, notes, warnings)
    if job.world_size == 1:
        return _single_command(job)
    return _per_node_commands(job, notes)
