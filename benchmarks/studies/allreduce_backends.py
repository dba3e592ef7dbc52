"""All-reduce latency / bandwidth of the CPU collectives available to sft, side by side, on one node.

    python -m benchmarks.studies.allreduce_backends            # all backends, 2 ranks, writes the Markdown table
    python -m benchmarks.studies.allreduce_backends --backends gloo ds-shm --sizes-mb 1 4 --rounds 1

(``benchmarks/allreduce.py`` is the cost model's gloo-only fit; this script compares backends.)

It starts its own ranks (one pair of processes per backend and round, so a backend that crashes, e.g. with a
segfault inside oneCCL, is reported with its error and does not take the others down). Backends:

* ``gloo``    torch.distributed.all_reduce on a gloo process group (what sft uses on CPU today).
* ``ds-shm``  DeepSpeed's shared-memory kernel (op ``deepspeed_shm_comm``, JIT-built with ninja):
              ``deepspeed.comm.inference_all_reduce``. DeepSpeed (0.19.8) only uses it there (tensor-parallel
              inference / AutoTP); ZeRO gradient reduction goes through the process group (gloo). It is only
              initialised when the env has LOCAL_SIZE == world size (DeepSpeed's own launcher sets it; torchrun /
              accelerate do not). Its bf16/fp16 kernels need avx512bw, its fp32 kernel avx2; without the ISA (or
              without LOCAL_SIZE) DeepSpeed falls back to the process group's all_reduce: the table marks those `*`.
* ``ds-ccl``  DeepSpeed's oneCCL op (``deepspeed_ccl_comm``, ``deepspeed.comm.ccl.CCLBackend``) on top of a gloo
              group. Needs a oneCCL prefix (CCL_ROOT) with lib/libccl.so and include/oneapi/ccl.hpp, e.g.
              ``pip install --no-deps --prefix P oneccl==2021.17.2 oneccl-devel==2021.17.2 impi-rt==2021.17.2
              intel-sycl-rt==2025.3.3 intel-cmplr-lib-rt==2025.3.3 intel-cmplr-lib-ur==2025.3.3`` (see
              benchmarks/results/cpu_collectives.md). DeepSpeed selects it only when oneccl_bindings_for_pytorch
              imports; without that binding this script forces it (see ``_init_ds_ccl``).

Sizes are payload bytes (MiB = 2**20 bytes) of an fp32 or bf16 tensor. Per size: a correctness check, warm-up,
then ``--iters`` timed all-reduces (a barrier before each; the time is the slowest rank's), pooled over ``--rounds``
rounds that interleave the backends (this CPU is shared: rounds spread the noise over all of them); the table shows
the median. algbw = bytes / time; busbw = algbw * 2 (n - 1) / n (NCCL-tests convention; equal to algbw for 2 ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BACKENDS = ("gloo", "ds-shm", "ds-ccl")
DTYPES = ("fp32", "bf16")
DEFAULT_SIZES_MB = (1, 4, 16, 64, 200)
MiB = 1 << 20


# ------------------------------------------------------------------------------------------------ rank side
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_gloo():
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    return lambda t: dist.all_reduce(t)


def _init_ds_shm():
    import deepspeed
    import deepspeed.comm as dscomm
    import torch

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    cdb = dscomm.comm.cdb
    if getattr(cdb, "shm_comm_op", None) is None:
        raise RuntimeError("DeepSpeed did not load deepspeed_shm_comm (ShareMemCommBuilder incompatible here?)")
    if not hasattr(torch.ops.deepspeed, "inference_all_reduce_"):
        raise RuntimeError("torch.ops.deepspeed.inference_all_reduce_ not registered")
    level = getattr(cdb, "shm_vector_kernel_level", 0)
    local = os.environ.get("LOCAL_SIZE") == os.environ.get("WORLD_SIZE")

    def path(dtype) -> str:  # what TorchBackend.inference_all_reduce runs for this dtype
        need = 1 if dtype == torch.float32 else 2  # fp32 kernel: avx2; bf16/fp16 kernels: avx512bw
        if level < need:
            return f"gloo fallback (shm kernel level {level} < {need}: CPU lacks {'avx2' if need == 1 else 'avx512bw'})"
        return "shm" if local else "not initialised (LOCAL_SIZE != world size)"

    op = lambda t: dscomm.inference_all_reduce(t)  # noqa: E731
    op.path = path
    return op


def _init_ds_ccl():
    """Force DeepSpeed's CCLBackend without oneccl_bindings_for_pytorch.

    deepspeed.init_distributed() builds CCLBackend only when the CPU accelerator reports 'ccl' (it does so only if
    oneccl_bindings_for_pytorch imports), and CCLBackend then calls torch.distributed.init_process_group('ccl'),
    which torch 2.13 rejects ("AssertionError: Unknown backend type ccl"). So: create the torch group with gloo
    first (CCLBackend skips init when a group exists), claim 'ccl' on the accelerator, then init DeepSpeed. The
    oneCCL communicator is bootstrapped through the gloo group (KVS address broadcast). CCLBackend runs
    all_reduce / broadcast / barrier on oneCCL and every other collective on the gloo group.
    """
    import datetime

    import deepspeed
    import deepspeed.comm as dscomm
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if not os.environ.get("CCL_ROOT"):
        raise RuntimeError("CCL_ROOT is not set (prefix holding lib/libccl.so and include/oneapi/ccl.hpp)")
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    get_accelerator()._communication_backend_name = "ccl"
    deepspeed.init_distributed(dist_backend="ccl", verbose=False)
    cdb = dscomm.comm.cdb
    if type(cdb).__name__ != "CCLBackend" or not cdb.is_initialized():
        raise RuntimeError(f"DeepSpeed picked {type(cdb).__name__}, not CCLBackend")
    return lambda t: dscomm.all_reduce(t)


def rank_main(args) -> int:
    backend = args.worker
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.pin:
        try:
            cpus = sorted(os.sched_getaffinity(0))
            if len(cpus) >= world:
                os.sched_setaffinity(0, {cpus[rank]})
        except (AttributeError, OSError):
            pass
    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0 = time.perf_counter()
    op = {"gloo": _init_gloo, "ds-shm": _init_ds_shm, "ds-ccl": _init_ds_ccl}[backend]()
    init_s = time.perf_counter() - t0
    if backend != "gloo":  # DeepSpeed never unlinks its /dev/shm buffers: once all ranks mapped them, sft does
        from sft.distributed import release_deepspeed_shm

        release_deepspeed_shm()

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    results = {"backend": backend, "init_s": init_s, "samples": {}, "checks": {}, "paths": {}}
    for dname in args.dtypes:
        dt = dtypes[dname]
        esize = torch.tensor([], dtype=dt).element_size()
        for mb in args.sizes_mb:
            nbytes = int(mb * MiB)
            numel = nbytes // esize
            # correctness: sum of (rank + 1) over ranks (exact in fp32 and bf16 for a few ranks)
            x = torch.full((numel,), float(rank + 1), dtype=dt)
            op(x)
            ok = bool(torch.all(x == world * (world + 1) / 2).item())
            x.zero_()  # time on zeros: no overflow / denormals however many iterations
            iters = args.iters if nbytes <= 16 * MiB else max(3, args.iters // (2 if nbytes <= 64 * MiB else 4))
            for _ in range(args.warmup):
                op(x)
            times = []
            for _ in range(iters):
                dist.barrier()
                s = time.perf_counter()
                op(x)
                times.append(time.perf_counter() - s)
            gathered = [None] * world
            dist.all_gather_object(gathered, times)
            key = f"{dname}:{mb}"
            results["samples"][key] = [max(ts) for ts in zip(*gathered)]
            results["checks"][key] = ok
            results["paths"][key] = op.path(dt) if hasattr(op, "path") else backend
    oks = [None] * world
    dist.all_gather_object(oks, results["checks"])
    results["checks"] = {k: all(o[k] for o in oks) for k in results["checks"]}
    if rank == 0:
        Path(args.out).write_text(json.dumps(results))
    dist.barrier()
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    return 0


# ---------------------------------------------------------------------------------------------- parent side
def _ccl_root(explicit: str | None) -> str | None:
    """CCL_ROOT: --ccl-root, $CCL_ROOT, or this interpreter's prefix (where `pip install oneccl-devel` puts it)."""
    for cand in (explicit, os.environ.get("CCL_ROOT"), sys.prefix):
        if cand and (Path(cand) / "lib" / "libccl.so").exists() and (Path(cand) / "include" / "oneapi" / "ccl.hpp").exists():
            return str(Path(cand).resolve())
    return None


def _precheck(backend: str, ccl_root: str | None) -> str | None:
    """Why a backend cannot run here (None: try it)."""
    if backend == "gloo":
        return None
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"deepspeed does not import: {type(e).__name__}: {e}"
    if backend == "ds-ccl" and ccl_root is None:
        return ("no oneCCL runtime/headers: need lib/libccl.so + include/oneapi/ccl.hpp under --ccl-root, $CCL_ROOT "
                "or this venv (see benchmarks/results/cpu_collectives.md for the pip line)")
    return None


def _rank_env(backend: str, rank: int, world: int, port: int, threads: int, ccl_root: str | None) -> dict:
    env = dict(os.environ)
    env.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads),
        DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )  # fmt: skip
    # DeepSpeed's shm op only initialises when LOCAL_SIZE == world size (its launcher's variable, not torchrun's)
    env["LOCAL_SIZE"] = str(world)
    if backend == "ds-ccl" and ccl_root:
        env["CCL_ROOT"] = ccl_root
        env["CPATH"] = os.pathsep.join(filter(None, [f"{ccl_root}/include", env.get("CPATH")]))  # builder adds no -I
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [f"{ccl_root}/lib", env.get("LD_LIBRARY_PATH")]))
        env.setdefault("CCL_PROCESS_LAUNCHER", "none")  # else oneCCL looks for Hydra/PMI
        env.setdefault("CCL_LOCAL_RANK", str(rank))
        env.setdefault("CCL_LOCAL_SIZE", str(world))
        env.setdefault("CCL_ATL_TRANSPORT", "ofi")
        env.setdefault("CCL_WORKER_COUNT", "1")
    return env


def _error_excerpt(text: str, limit: int = 1500) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("W1", "E1", "I1"))]
    keys = ("Error", "error", "signal", "Assertion", "terminated", "CCL_ERROR")
    keep = [ln for ln in lines if any(k in ln for k in keys)]
    return "\n".join(keep[-6:] if keep else lines[-8:])[-limit:]


def run_backend(backend: str, args, ccl_root: str | None) -> tuple[dict | None, str | None]:
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", backend, "--out", str(out),
               "--sizes-mb", *map(str, args.sizes_mb), "--dtypes", *args.dtypes, "--iters", str(args.iters),
               "--warmup", str(args.warmup)] + ([] if args.pin else ["--no-pin"])  # fmt: skip
        procs, logs = [], []
        for r in range(args.ranks):
            log = open(Path(tmp) / f"rank{r}.log", "w+")
            logs.append(log)
            env = _rank_env(backend, r, args.ranks, port, args.threads, ccl_root)
            # cwd=tmp: crash dumps (oneCCL writes *.btr backtrace files to the cwd) do not land in the repo
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp))
        deadline = time.time() + args.timeout
        failed = None
        while any(p.poll() is None for p in procs):
            if time.time() > deadline:
                failed = f"timed out after {args.timeout:.0f} s"
                break
            if any(p.poll() not in (None, 0) for p in procs):
                time.sleep(2)  # let the peer print its own error
                break
            time.sleep(0.2)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        codes = [p.returncode for p in procs]
        text = ""
        for r, log in enumerate(logs):
            log.seek(0)
            text += f"[rank {r}, exit {codes[r]}]\n" + log.read()
            log.close()
        if args.verbose:
            print(text, file=sys.stderr)
        if failed is None and any(c != 0 for c in codes):
            failed = f"exit codes {codes}"
        if failed is None and not out.exists():
            failed = "rank 0 wrote no result"
        if failed:
            return None, f"{failed}:\n{_error_excerpt(text)}"
        return json.loads(out.read_text()), None


def _fmt_lat(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def build_report(args, results: dict, errors: dict, meta: dict) -> str:
    world = args.ranks
    bus = 2 * (world - 1) / world
    lines = [f"# All-reduce on CPU: {world} ranks x {args.threads} thread(s), one node", ""]
    lines.append(
        f"Run: `{meta['command']}` on {meta['host']} ({meta['cpus']} CPUs, {meta['cpu_model']}); torch {meta['torch']}, "
        f"deepspeed {meta['deepspeed']}; {meta['date']}. Median over all timed iterations of {args.rounds} interleaved "
        f"round(s) ({args.iters} iterations per round up to 16 MiB, half that to 64 MiB, a quarter above), slowest "
        f"rank per iteration. algbw = bytes / median time; busbw = algbw x 2(n-1)/n."
    )
    lines.append("")
    ok = [b for b in args.backends if b in results]
    for b in args.backends:
        if b in errors:
            lines.append(f"- **{b}: not available** - {errors[b]['summary']}")
            continue
        init = statistics.median(results[b]["init_s"])
        bad = [k for k, v in results[b]["checks"].items() if not v]
        lines.append(f"- **{b}**: init {init:.1f} s (median), result check {'FAILED for ' + ', '.join(bad) if bad else 'ok'}")
        for dname, pth in sorted({(k.split(':')[0], v) for k, v in results[b]["paths"].items()}):
            if pth not in (b, "shm"):
                lines.append(f"  - `*` {dname}: {pth}")
    lines.append("")
    if ok:
        for dname in args.dtypes:
            head = "| size |" + "".join(f" {b} latency | {b} algbw GB/s | {b} busbw GB/s |" for b in ok)
            lines += [f"## {dname}", "", head, "|---|" + "---|---|---|" * len(ok)]
            for mb in args.sizes_mb:
                nbytes = mb * MiB
                row = f"| {mb:g} MiB |"
                for b in ok:
                    ts = results[b]["samples"].get(f"{dname}:{mb}")
                    if not ts:
                        row += " - | - | - |"
                        continue
                    med = statistics.median(ts)
                    alg = nbytes / med / 1e9
                    mark = "" if results[b]["paths"].get(f"{dname}:{mb}", b) in (b, "shm") else " *"
                    row += f" {_fmt_lat(med)}{mark} | {alg:.2f} | {alg * bus:.2f} |"
                lines.append(row)
            lines.append("")
        if len(ok) > 1 and "gloo" in ok:
            others = [b for b in ok if b != "gloo"]
            lines += ["Speed-up over gloo (gloo median latency / backend median latency; > 1 is faster):", ""]
            lines += ["| dtype | size |" + "".join(f" {b} |" for b in others), "|---|---|" + "---|" * len(others)]
            for dname in args.dtypes:
                for mb in args.sizes_mb:
                    g = results["gloo"]["samples"].get(f"{dname}:{mb}")
                    row = f"| {dname} | {mb:g} MiB |"
                    for b in others:
                        t = results[b]["samples"].get(f"{dname}:{mb}")
                        row += f" {statistics.median(g) / statistics.median(t):.2f}x |" if g and t else " - |"
                    lines.append(row)
            lines.append("")
    if errors:
        lines += ["## Errors (verbatim excerpts)", ""]
        for b, e in errors.items():
            lines += [f"### {b}", "", "```", e["detail"], "```", ""]
    return "\n".join(lines)


def _meta(argv) -> dict:
    import torch

    try:
        import deepspeed

        dsv = deepspeed.__version__
    except Exception:  # noqa: BLE001
        dsv = "not installed"
    model, flags = platform.processor() or "?", set()
    if Path("/proc/cpuinfo").exists():
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name") and model in ("?", platform.processor()):
                model = ln.split(":", 1)[1].strip()
            if ln.startswith("flags") and not flags:
                flags = set(ln.split(":", 1)[1].split())
    isa = " ".join(f for f in ("avx2", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16") if f in flags) or "?"
    try:
        load = f", load average {os.getloadavg()[0]:.1f} at the end"
    except OSError:
        load = ""
    return {
        "command": "python -m benchmarks.studies.allreduce_backends "
                   + " ".join(sys.argv[1:] if argv is None else argv),
        "host": socket.gethostname(), "cpus": os.cpu_count(), "cpu_model": f"{model}, ISA: {isa}{load}",
        "torch": torch.__version__, "deepspeed": dsv, "date": time.strftime("%Y-%m-%d %H:%M"),
    }  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    ap.add_argument("--sizes-mb", nargs="+", type=float, default=list(DEFAULT_SIZES_MB))
    ap.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per rank (default 1: 2 ranks on 2 cores)")
    ap.add_argument("--iters", type=int, default=20, help="timed iterations per size and round (up to 16 MiB)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the backends (samples pooled)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per backend and round (first use JIT-builds ops)")
    ap.add_argument("--ccl-root", default=None, help="oneCCL prefix (lib/libccl.so, include/oneapi/ccl.hpp); default $CCL_ROOT or this venv")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin rank i to the i-th allowed CPU")
    ap.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "allreduce_backends.md"), help="Markdown table ('' = none)")
    ap.add_argument("--json", default=None, help="also write raw samples here")
    ap.add_argument("--verbose", action="store_true", help="print every rank's log")
    ap.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.sizes_mb = [int(m) if float(m).is_integer() else m for m in args.sizes_mb]
    if args.worker:
        return rank_main(args)

    ccl_root = _ccl_root(args.ccl_root)
    results: dict[str, dict] = {}
    errors: dict[str, dict] = {}
    for b in args.backends:
        why = _precheck(b, ccl_root)
        if why:
            errors[b] = {"summary": why, "detail": why}
    for rnd in range(args.rounds):
        for b in args.backends:
            if b in errors:
                continue
            t0 = time.time()
            res, err = run_backend(b, args, ccl_root)
            if err:
                head, *rest = err.splitlines()
                errors[b] = {"summary": f"{head} {next((ln.strip() for ln in rest if ln.strip()), '')[:300]}", "detail": err}
                results.pop(b, None)
                print(f"[round {rnd + 1}] {b}: FAILED ({time.time() - t0:.0f} s)\n{err}", file=sys.stderr, flush=True)
                continue
            agg = results.setdefault(b, {"init_s": [], "samples": {}, "checks": {}, "paths": {}})
            agg["init_s"].append(res["init_s"])
            agg["paths"].update(res.get("paths", {}))
            for k, v in res["samples"].items():
                agg["samples"].setdefault(k, []).extend(v)
            for k, v in res["checks"].items():
                agg["checks"][k] = agg["checks"].get(k, True) and v
            print(f"[round {rnd + 1}] {b}: done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)

    meta = _meta(argv)
    report = build_report(args, results, errors, meta)
    print(report)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(report + "\n")
        print(f"\nwrote {args.output}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results, "errors": errors}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
