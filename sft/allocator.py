"""The host memory allocator (``training.allocator``): tcmalloc, jemalloc or mimalloc preloaded in place of glibc
malloc. mimalloc comes with sft itself (the ``cmeel-mimalloc`` wheel from PyPI, a dependency on x86-64 Linux), so a
plain ``pip install`` trains on a fast allocator without any system package.

PyTorch on CPU frees and re-allocates tensors of the same few sizes every step. glibc malloc keeps freed large
blocks in per-thread arenas and returns them to the OS late, so a run's peak RSS grows over its first steps by
more than its live tensors (on the 2-core AMX Xeon, ~0.8 GiB on SmolLM2-135M 8 x 512 beyond what
``gradient_checkpointing: auto`` plans for), and the page faults of re-used memory slow every step. A preloaded
jemalloc or tcmalloc replaces malloc for the whole process, which must happen before the process starts:
``LD_PRELOAD`` is read by the dynamic loader only. So

- ``sft train`` re-executes itself once, in place, with ``LD_PRELOAD`` set (:func:`reexec_with`), before it
  imports torch. Under ``sft launch`` / ``accelerate launch`` / mpirun every rank is an ``sft train`` process and
  does the same (exec keeps the PID and the CPU pinning); ``sft bench`` starts its cells with
  :func:`preload_env`;
- the Python API (``sft.recipe.train``) cannot change the allocator of a running process: it reports which one
  is loaded (:func:`loaded`) and warns when the config names one that is not (:func:`check_in_process`).

This module imports nothing heavy: it runs before torch is imported.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import sys
from pathlib import Path

from sft.errors import ConfigError

log = logging.getLogger(__name__)

CHOICES = ("auto", "jemalloc", "tcmalloc", "mimalloc", "system")

# Shared-object names, most specific first (Debian / Ubuntu: libjemalloc2, libtcmalloc-minimal4; conda: jemalloc,
# gperftools).
_SONAMES = {
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so"),
    "mimalloc": ("libmimalloc.so.3", "libmimalloc.so.2", "libmimalloc.so"),
}
_PACKAGES = {"jemalloc": "apt-get install libjemalloc2 (or conda install jemalloc)",
             "tcmalloc": "apt-get install libtcmalloc-minimal4 (or conda install gperftools)",
             "mimalloc": "pip install cmeel-mimalloc (sft's own dependency on x86-64 Linux) or apt-get install "
                         "libmimalloc3"}
# The pip distribution that ships libmimalloc (cmeel: CMake projects as wheels; MIT, Microsoft's mimalloc)
_PIP_DISTRIBUTIONS = {"mimalloc": "cmeel-mimalloc"}
_SEARCH_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                "/usr/local/lib", "/lib/x86_64-linux-gnu", "/lib64")

# Set by reexec_with in the environment of the process it starts: that process never re-executes again (even if
# the preload was refused by the loader), and neither do its children that inherit the variables.
GUARD_ENV = "SFT_ALLOCATOR_PRELOADED"

# jemalloc's settings when sft preloads it and the user set no MALLOC_CONF of their own. jemalloc's defaults purge freed pages back to the OS within seconds, and oversized (>= 8 MiB) blocks at once: a
# CPU training step, which frees and re-allocates the same large tensors, then pays page faults every step
# (jemalloc defaults: 264-278 tok/s against glibc's 364-368 on SmolLM2-135M; these settings: 393-400).
JEMALLOC_CONF = ("oversize_threshold:1,background_thread:true,metadata_thp:auto,dirty_decay_ms:-1,"
                 "muzzy_decay_ms:-1")
# mimalloc's settings when sft preloads it and the user set none of their own (MIMALLOC_* variables). mimalloc
# purges (decommits) freed memory after MIMALLOC_PURGE_DELAY ms (default 10 in mimalloc 2.x): a CPU training step
# frees and re-allocates the same large tensors, and would page-fault them in again every step.
MIMALLOC_ENV = {"MIMALLOC_PURGE_DELAY": "-1"}
# Which allocator `auto` takes, first installed wins (see resolve()): the system packages first, then the one that
# comes with sft from PyPI.
AUTO_ORDER = ("tcmalloc", "jemalloc", "mimalloc")


def _pip_library(name: str) -> str | None:
    """The shared object of allocator ``name`` installed by pip (its wheel's file list), or None."""
    dist = _PIP_DISTRIBUTIONS.get(name)
    if dist is None:
        return None
    from importlib import metadata

    try:
        files = metadata.files(dist) or []
        located = {f.name: f.locate() for f in files if f.name in _SONAMES[name]}
    except metadata.PackageNotFoundError:
        return None
    for so in _SONAMES[name]:
        if so in located and os.path.isfile(located[so]):
            return str(located[so])
    return None


def find_library(name: str) -> str | None:
    """The path of allocator ``name``'s shared object on this machine (pip's wheel first), or None."""
    pip = _pip_library(name)
    if pip:
        return pip
    dirs = [os.path.join(sys.prefix, "lib"), *(_SEARCH_DIRS)]
    for so in _SONAMES[name]:
        for d in dirs:
            p = os.path.join(d, so)
            if os.path.isfile(p):
                return p
    found = ctypes.util.find_library(name)  # ldconfig's cache: a bare soname, which the loader resolves itself
    return found or None


def _named_in(text: str) -> str:
    """The allocator whose library a list of paths (a memory map, an LD_PRELOAD) names, else ``system``."""
    return next((name for name in _SONAMES if f"lib{name}" in text), "system")


def loaded(maps: str = "/proc/self/maps") -> str:
    """The allocator this process runs on: ``jemalloc``, ``tcmalloc`` or ``system`` (glibc malloc)."""
    try:
        return _named_in(Path(maps).read_text())
    except OSError:
        return "system"


def _has_cuda_driver() -> bool:
    return os.path.exists("/dev/nvidiactl")


def resolve(choice: str) -> tuple[str, str | None]:
    """``training.allocator`` -> (allocator name, path of its library or None for the system allocator).

    ``auto``: on CPU hosts (no NVIDIA driver: a GPU run's host allocations are few, and the CUDA caching
    allocator does not go through malloc), tcmalloc where it is installed, else jemalloc (with
    :data:`JEMALLOC_CONF`), else the system allocator. Measured on the 2-core AMX Xeon VM, SmolLM2-135M 8 x 512,
    bf16-mixed, 2 interleaved repeats (`sft bench --matrix benchmarks/matrices/allocators.yaml --repeat 2`):
    tcmalloc 451-455 tok/s at 3.43 GiB peak RSS, jemalloc (JEMALLOC_CONF) 393-400 at 3.47-3.50, glibc
    364-368 at 4.20-4.21, jemalloc defaults 264-278 at 3.41. mimalloc (what sft brings from PyPI) comes after the
    system packages: on the 2-core AMD EPYC, SmolLM2 8 x 512, 2 interleaved repeats (`sft bench --matrix llama`,
    benchmarks/results/2026-12-07-vm-llama-7bd5c8c.md), tcmalloc 448-501 tok/s at 3.30 GiB, mimalloc 413-498 at
    3.63, jemalloc 427-470 at 3.47, glibc with sft's fixed mmap threshold 367-368 at 3.30.
    A named allocator that is not installed is a ConfigError naming the package to install."""
    if choice not in CHOICES:
        raise ConfigError(f"training.allocator: {choice!r} is not one of {', '.join(CHOICES)}")
    if choice == "system":
        return "system", None
    if choice == "auto":
        if _has_cuda_driver():
            return "system", None
        for name in AUTO_ORDER:
            path = find_library(name)
            if path:
                return name, path
        return "system", None
    path = find_library(choice)
    if path is None:
        raise ConfigError(f"training.allocator={choice}: lib{choice} is not installed on this machine; "
                          f"install it ({_PACKAGES[choice]}) or set training.allocator=auto|system")
    return choice, path


def preload_env(choice: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment variables that make a new process start on allocator ``choice`` (empty: nothing to set).

    An allocator the user preloaded themselves (in ``env``'s LD_PRELOAD) wins: nothing is added on top of it."""
    env = dict(os.environ if env is None else env)
    if _named_in(env.get("LD_PRELOAD", "")) != "system":
        return {}
    name, path = resolve(choice)
    if path is None:
        return {}
    out = {"LD_PRELOAD": ":".join(p for p in (path, env.get("LD_PRELOAD", "")) if p)}
    if name == "jemalloc" and "MALLOC_CONF" not in env:
        out["MALLOC_CONF"] = JEMALLOC_CONF
    if name == "mimalloc" and not any(k.startswith("MIMALLOC_") for k in env):
        out.update(MIMALLOC_ENV)
    if name == "tcmalloc" and "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD" not in env:
        # tcmalloc prints a line (with a stack) for every allocation over 1 GiB: a model's weights, a merge
        out["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] = str(1 << 40)
    return out


def reexec_with(choice: str) -> None:
    """Re-execute this process in place on allocator ``choice`` if it is not already running on it.

    Returns without doing anything when the allocator is already loaded, when this process was already
    re-executed once (``SFT_ALLOCATOR_PRELOADED``), when nothing needs preloading, or when torch has already been
    imported (its arenas would be lost with the process image; the caller then just runs on what it has)."""
    if os.environ.get(GUARD_ENV):
        return
    name, _ = resolve(choice)
    if name == loaded():
        return
    add = preload_env(choice)
    if not add:
        return
    if "torch" in sys.modules:
        log.warning("training.allocator=%s: torch is already imported, so this process keeps %s", choice, loaded())
        return
    env = {**os.environ, **add, GUARD_ENV: name}
    argv = [sys.executable, *getattr(sys, "orig_argv", sys.argv)[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


# glibc's mallopt parameter number for the mmap threshold (malloc.h: M_MMAP_THRESHOLD -3).
_M_MMAP_THRESHOLD = -3
#: The mmap threshold sft fixes on glibc malloc (see :func:`tune_system_malloc`).
GLIBC_MMAP_THRESHOLD = 1 << 20
# Set once tune_system_malloc has run in this process: None (not tried), else whether the threshold is now fixed.
_glibc_fixed: bool | None = None


def _user_set_glibc_threshold(env: dict[str, str]) -> bool:
    return "MALLOC_MMAP_THRESHOLD_" in env or "mmap_threshold" in env.get("GLIBC_TUNABLES", "")


def tune_system_malloc(threshold: int = GLIBC_MMAP_THRESHOLD, env: dict[str, str] | None = None) -> bool:
    """On glibc malloc, fix the mmap threshold at ``threshold`` bytes; True when the process now runs with a fixed
    threshold (sft's or the user's own), False where that is not possible (no glibc ``mallopt``).

    glibc serves a block above its mmap threshold (128 KiB at start) with its own mmap and unmaps it on free, but
    it raises the threshold to the size of every mmapped block freed (up to 32 MiB). After the first training
    step, activations, their gradients and temporaries (4-13 MB each on SmolLM2 8 x 512) all come from the heap,
    where a block freed below a live one cannot be given back: the run's peak RSS then grows by more than its
    live tensors, and ``gradient_checkpointing: auto`` (planned from live tensors) ends above the seed recipe's
    RSS. Setting the threshold explicitly (``mallopt``, documented in mallopt(3); the same as the environment
    variable MALLOC_MMAP_THRESHOLD_) turns that adjustment off. Measured with `sft bench` on SmolLM2-135M 8 x 512,
    LoRA r16 q/v, bf16-mixed, 2-core AMD EPYC (avx512_bf16), the same plan (24 of 30 layers kept) in every cell
    (benchmarks/results/2026-12-07-vm-glibc*.md): glibc's default 4.63 GiB peak RSS; threshold fixed at 128 KiB
    3.65 (2 repeats), at 1 MiB 3.81-3.84 (4 cells), 4 MiB with trim threshold 0 3.82-3.85; tcmalloc 3.63; the
    seed recipe 4.08-4.09. Step times of the fixed thresholds overlapped (a shared machine); 1 MiB is taken
    because it keeps LoRA's small tensors (8 x 512 x r16 in bf16 = 128 KiB) off mmap, a system call and page
    faults each. This works in a running process, so it covers the Python API too. A threshold the user set
    themselves (MALLOC_MMAP_THRESHOLD_ or GLIBC_TUNABLES) is kept."""
    global _glibc_fixed
    env = os.environ if env is None else env
    if _user_set_glibc_threshold(env):
        return True
    if _glibc_fixed is not None:
        return _glibc_fixed
    try:
        libc = ctypes.CDLL(None)
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # no mallopt: not glibc (musl, ...)
        ok = False
    _glibc_fixed = ok
    log.debug("allocator: glibc malloc, %s", f"mmap threshold fixed at {threshold // 1024} KiB" if ok else
              "dynamic mmap threshold (mallopt is not available)")
    return ok


def plans_with_live_memory() -> bool:
    """Whether this process's peak RSS follows its live tensors, which ``gradient_checkpointing: auto`` plans
    with: jemalloc, tcmalloc, or glibc malloc with a fixed mmap threshold (:func:`tune_system_malloc`)."""
    if loaded() != "system":
        return True
    return tune_system_malloc()


def check_in_process(choice: str) -> str:
    """For the Python API (and every run, which goes through it): the allocator this process runs on; warns when
    ``choice`` names another one. On glibc malloc it fixes the mmap threshold (:func:`tune_system_malloc`)."""
    have = loaded()
    if have == "system" and not _has_cuda_driver():
        tune_system_malloc()
    if choice in _SONAMES and have != choice:
        log.warning("training.allocator=%s, but this process runs on %s: the allocator is chosen when a process "
                    "starts (LD_PRELOAD=%s python ...; `sft train` does it itself)", choice, have,
                    find_library(choice) or f"lib{choice}.so")
    return have
