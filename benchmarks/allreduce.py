"""All-reduce micro-benchmark (gloo, or the backend sft would choose): effective bandwidth and latency.

    python -m benchmarks.allreduce --ranks 2 --out result.json [--sizes 4,65536,1048576,8388608]
    python -m benchmarks.allreduce --rank R --ranks N --master ADDR:PORT --out result.json   # one rank per node

The first form starts every rank on this machine; the second is one rank of a multi-node measurement (start it on
every node, same --master; rank 0 writes the fit), which is how a real link between nodes is measured.

Starts ``ranks`` processes on this machine (torch.multiprocessing, one thread each), times ``all_reduce`` of fp32
buffers of each size (median of repeats after warm-up), and fits the ring model
``t = 2 (N-1)/N * bytes / bandwidth + 2 (N-1) * latency`` by least squares, so that the cost model's local check
uses this machine's numbers instead of a guess.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

DEFAULT_SIZES = (4, 4096, 65536, 1 << 20, 4 << 20, 16 << 20)


def _worker(rank: int, world: int, port: int, sizes: list[int], repeats: int, out: str, addr: str = "127.0.0.1") -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world)
    times = {}
    for nbytes in sizes:
        t = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
        for _ in range(3):
            dist.all_reduce(t)
        samples = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            samples.append(time.perf_counter() - t0)
        times[nbytes] = statistics.median(samples)
    dist.barrier()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"world": world, "times_s": {str(k): v for k, v in times.items()}}, f)
    dist.destroy_process_group()


def fit_ring(times_s: dict[int, float], world: int) -> dict:
    """Fit t = a + b * bytes minimising the *relative* error (weights 1/t^2: small messages fix the latency, large
    ones the bandwidth); then bandwidth = 2(N-1)/N / b and latency = a / (2 (N-1))."""
    xs = [float(k) for k in times_s]
    ys = [float(v) for v in times_s.values()]
    ws = [1.0 / (y * y) for y in ys]
    sw = sum(ws)
    sx = sum(w * x for w, x in zip(ws, xs))
    sy = sum(w * y for w, y in zip(ws, ys))
    sxx = sum(w * x * x for w, x in zip(ws, xs))
    sxy = sum(w * x * y for w, x, y in zip(ws, xs, ys))
    det = sw * sxx - sx * sx
    b = (sw * sxy - sx * sy) / det if det > 0 else float("nan")
    a = (sy - b * sx) / sw
    b = max(b, 1e-15)
    a = max(a, 0.0)
    return {
        "world": world,
        "bandwidth_Bps": 2 * (world - 1) / world / b,
        "latency_s": a / (2 * (world - 1)),
        "times_s": {str(int(k)): v for k, v in times_s.items()},
    }


def measure(world: int = 2, sizes=DEFAULT_SIZES, repeats: int = 20) -> dict:
    """Run the micro-benchmark in this process's children; returns the fit."""
    import tempfile

    import torch.multiprocessing as mp

    from benchmarks.runner import free_port

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "allreduce.json")
        mp.start_processes(_worker, args=(world, free_port(), list(sizes), repeats, out), nprocs=world,
                           join=True, start_method="spawn")
        with open(out) as f:
            raw = json.load(f)
    return fit_ring({int(k): v for k, v in raw["times_s"].items()}, world)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.allreduce", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None, help="write the fit as JSON here")
    ap.add_argument("--rank", type=int, default=None, help="run only this rank here (one process per node)")
    ap.add_argument("--master", default=None, metavar="ADDR:PORT", help="with --rank: rank 0's address and port")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.rank is not None:
        if not args.master or ":" not in args.master:
            ap.error("--rank needs --master ADDR:PORT")
        import tempfile

        addr, port = args.master.rsplit(":", 1)
        with tempfile.TemporaryDirectory() as d:
            raw_path = os.path.join(d, "times.json")
            _worker(args.rank, args.ranks, int(port), sizes, args.repeats, raw_path, addr)
            if args.rank != 0:
                return 0
            with open(raw_path) as f:
                raw = json.load(f)
        fit = fit_ring({int(k): v for k, v in raw["times_s"].items()}, args.ranks)
    else:
        fit = measure(args.ranks, sizes, args.repeats)
    text = json.dumps(fit, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
