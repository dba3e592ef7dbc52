"""Machine facts stored with every result, the measured GEMM peak, and a small table of spec-sheet peaks.

MFU and HFU are computed against a peak *measured on this machine at the start of the run* (a spec sheet says
what a chip could do at its best clock with perfect kernels; the measured GEMM says what this machine, this torch
and this thread count actually reach). The peak is the best of bf16 and fp32 GEMMs: on an AMX Xeon or a GPU that is
bf16, on a CPU without native bf16 (AVX2 only) bf16 is emulated and fp32 is the machine's real peak. An fp32 run
on an AMX machine is therefore judged against the bf16 peak it leaves unused, which is the point of MFU.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "deeplake", "bitsandbytes", "deepspeed", "tokenizers",
             "safetensors", "pyarrow")

# Spec-sheet dense (no sparsity) peaks, FLOP/s. GPUs: vendor datasheets. CPUs: FLOP per cycle per core of the
# matrix unit, to be multiplied by cores and clock (AMX: 1024 bf16 FLOP/cycle/core on Sapphire/Emerald/Granite
# Rapids; AVX-512 BF16 vdpbf16ps: 2 ports x 32 bf16 products x 2 = 128; AVX-512 FP32 FMA: 2 x 16 x 2 = 64;
# AVX2 FP32 FMA: 2 x 8 x 2 = 32).
SPEC_GPU_PEAKS = {
    "NVIDIA H100 SXM bf16 dense": 989e12,
    "NVIDIA H100 PCIe bf16 dense": 756e12,
    "NVIDIA H200 bf16 dense": 989e12,
    "NVIDIA A100 bf16 dense": 312e12,
    "NVIDIA L40S bf16 dense": 362e12,
}
SPEC_CPU_FLOP_PER_CYCLE = {
    "Xeon AMX bf16": 1024,
    "AVX-512 BF16 (vdpbf16ps)": 128,
    "AVX-512 FP32 FMA": 64,
    "AVX2 FP32 FMA": 32,
}


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> dict:
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    out["python"] = platform.python_version()
    return out


def gpu_facts() -> list[dict]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"name": p.name, "memory_bytes": p.total_memory, "capability": f"{p.major}.{p.minor}",
                     "multiprocessors": p.multi_processor_count})
    return gpus


def cpu_max_mhz() -> float | None:
    """Max clock from cpufreq (not always exposed in VMs), else the current clock from /proc/cpuinfo."""
    try:
        return float(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1000
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1])
    except (OSError, ValueError):
        pass
    return None


def machine_facts() -> dict:
    """CPU model, sockets, cores, ISA flags, memory, GPUs, library versions, git commit, host and date."""
    from launch.topology import detect_topology

    facts: dict = {"hostname": socket.gethostname(), "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    try:
        topo = detect_topology()
        s = topo.summary()
        facts["cpu"] = {
            "model": s["model_name"],
            "sockets": s["sockets"],
            "numa_nodes": s["numa_nodes"],
            "physical_cores": s["physical_cores"],
            "logical_cpus": s["logical_cpus"],
            "allowed_physical_cores": s["allowed_physical_cores"],
            "flags": s["flags"],
            "amx_bf16": "amx_bf16" in s["flags"],
            "avx512_bf16": "avx512_bf16" in s["flags"],
            "avx512f": "avx512f" in s["flags"],
            "mhz": cpu_max_mhz(),
        }
    except Exception as e:  # topology is a fact, not a requirement
        facts["cpu"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        import psutil

        facts["memory_bytes"] = psutil.virtual_memory().total
    except Exception:
        facts["memory_bytes"] = None
    facts["gpus"] = gpu_facts()
    facts["libraries"] = library_versions()
    facts["git"] = git_state()
    facts["platform"] = platform.platform()
    facts["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    return facts


def compute_cores(facts: dict) -> int:
    cpu = facts.get("cpu") or {}
    return int(cpu.get("allowed_physical_cores") or cpu.get("physical_cores") or os.cpu_count() or 1)


def measure_peak(seconds: float = 2.0, threads: int | None = None) -> dict:
    """bf16 and fp32 GEMM peaks on this machine (GPU 0 when there is one); the MFU denominator is the larger.

    CPU: each dtype is measured with all threads, and with one thread scaled by the thread count; the better of the
    two is the peak. On a shared CPU an all-thread OpenMP GEMM can collapse (threads spin at barriers while a peer is
    descheduled: measured 5 GFLOP/s with 2 threads vs 47 with 1 on a loaded 2-core EPYC), which would make the peak
    too low and MFU exceed 1 for runs that avoid it (e.g. 2 ranks x 1 thread)."""
    import torch

    from sft.metrics import measure_gemm_peak

    cuda = torch.cuda.is_available()
    if threads and not cuda:
        torch.set_num_threads(threads)
    n_threads = None if cuda else torch.get_num_threads()
    size = 8192 if cuda else 2048
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here; training does not enable TF32 either
    out: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "threads": n_threads, "gemm_size": size,
                 "per": "gpu" if cuda else "machine"}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        r = measure_gemm_peak(dtype, size=size, seconds=seconds)
        out[f"{name}_nn_flops"], out[f"{name}_nt_flops"] = r["nn"], r["nt"]
        out[f"{name}_all_threads_flops"] = r["peak"]
        best = r["peak"]
        if not cuda and n_threads and n_threads > 1:
            torch.set_num_threads(1)
            one = measure_gemm_peak(dtype, size=size, seconds=seconds)["peak"]
            torch.set_num_threads(n_threads)
            out[f"{name}_one_thread_flops"] = one
            best = max(best, one * n_threads)
        out[f"{name}_flops"] = best
    out["peak_dtype"] = "bf16" if out["bf16_flops"] >= out["fp32_flops"] else "fp32"
    out["peak_flops"] = max(out["bf16_flops"], out["fp32_flops"])
    return out


def core_groups(ranks: int, threads: int | None) -> tuple[list[list[int]], int]:
    """CPU lists (one logical CPU per physical core) for each rank, and threads per rank."""
    from launch.topology import detect_topology

    topo = detect_topology()
    allowed = set(topo.allowed)
    cpus = [min(c for c in cs if c in allowed) for core, cs in topo.cores().items() if allowed.intersection(cs)]
    per = threads or max(1, len(cpus) // ranks)
    if per * ranks > len(cpus):
        return [], per  # oversubscribed: do not pin
    return [cpus[i * per:(i + 1) * per] for i in range(ranks)], per


def measure_peak_isolated(seconds: float, env: dict[str, str] | None = None, pin: bool = True) -> dict:
    """:func:`measure_peak` in a fresh process started like a one-rank cell (same pinning, OMP_NUM_THREADS and
    extra environment), so that the peak is measured with the thread set-up the cells train with."""
    import json
    import sys

    from launch.topology import format_cpu_list

    import torch

    run_env = dict(os.environ)
    run_env.update(env or {})
    cmd = [sys.executable, "-m", "benchmarks.machine", "--peak", str(seconds)]
    if not torch.cuda.is_available():
        groups, threads = core_groups(1, None)
        run_env["OMP_NUM_THREADS"] = str(threads)
        if pin and groups:
            cmd = [sys.executable, "-m", "launch.pin", "--cpus", format_cpu_list(groups[0]), "--", *cmd[1:]]
    out = subprocess.run(cmd, cwd=REPO_ROOT, env=run_env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"peak measurement failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def spec_peaks(facts: dict) -> list[tuple[str, float, str]]:
    """(name, FLOP/s, how it was derived) rows for the spec table printed beside the measured peak."""
    rows: list[tuple[str, float, str]] = []
    mhz = (facts.get("cpu") or {}).get("mhz") or 2000.0
    cores = compute_cores(facts)
    for name, per_cycle in SPEC_CPU_FLOP_PER_CYCLE.items():
        rows.append((f"{name}, per core", per_cycle * mhz * 1e6,
                     f"spec estimate: {per_cycle} FLOP/cycle x {mhz:.0f} MHz"))
    flags = set((facts.get("cpu") or {}).get("flags") or [])
    have = {"Xeon AMX bf16": "amx_bf16", "AVX-512 BF16 (vdpbf16ps)": "avx512_bf16", "AVX-512 FP32 FMA": "avx512f",
            "AVX2 FP32 FMA": "avx2"}
    best = next((n for n, flag in have.items() if flag in flags), None)
    if best:
        per_cycle = SPEC_CPU_FLOP_PER_CYCLE[best]
        rows.append((f"this CPU ({best}), {cores} cores", per_cycle * mhz * 1e6 * cores,
                     f"spec estimate: best unit present x {cores} cores x {mhz:.0f} MHz"))
    for name, flops in SPEC_GPU_PEAKS.items():
        rows.append((name, flops, "datasheet"))
    return rows


def describe_machine(facts: dict) -> str:
    cpu = facts.get("cpu") or {}
    flags = ", ".join(cpu.get("flags") or []) or "none of interest"
    gpus = "; ".join(f"{g['name']} ({g['memory_bytes'] / 2**30:.0f} GiB)" for g in facts.get("gpus") or []) or "none"
    mem = facts.get("memory_bytes")
    mem_text = f"{mem / 2**30:.0f} GiB" if mem else "?"
    libs = ", ".join(f"{k} {v}" for k, v in (facts.get("libraries") or {}).items() if v)
    git = facts.get("git") or {}
    commit = (git.get("commit") or "unknown")[:12] + (" (dirty)" if git.get("dirty") else "")
    return (f"{facts.get('hostname')}: {cpu.get('model', '?')}, {cpu.get('sockets', '?')} socket(s), "
            f"{cpu.get('physical_cores', '?')} physical cores ({cpu.get('allowed_physical_cores', '?')} allowed), "
            f"flags: {flags}; memory {mem_text}; GPU: {gpus}\n"
            f"libraries: {libs}\ngit: {commit}")


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m benchmarks.machine", description="machine facts / GEMM peak")
    ap.add_argument("--peak", type=float, default=None, metavar="SECONDS", help="measure the GEMM peak")
    a = ap.parse_args()
    if a.peak is not None:
        print(json.dumps(measure_peak(a.peak)))
    else:
        print(json.dumps(machine_facts(), indent=2))
