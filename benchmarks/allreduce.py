"""All-reduce micro-benchmark (gloo, or the backend sft would choose): effective bandwidth and latency.

    python -m benchmarks.allreduce --ranks 2 --out result.json [--sizes 4,65536,1048576,8388608]
    python -m benchmarks.allreduce --rank R --ranks N --master ADDR:PORT --out result.json   # one rank per node

The first form starts every rank on this machine; the second is one rank of a multi-node measurement (start it on
every node, same --master; rank 0 writes the fit), which is how a real link between nodes is measured.

Starts ``ranks`` processes on this machine (torch.multiprocessing, one thread each), times ``all_reduce`` of fp32
buffers of each size (median of repeats after warm-up), and fits the ring model
``t = 2 (N-1)/N * bytes / bandwidth + 2 (N-1) * latency`` by least squares, so that the cost model's local check
uses this machine's numbers instead of a guess.

``--gap-s S`` idles every rank S seconds before each timed all-reduce: training calls the all-reduce once per step,
after a compute phase, and a link that behaves differently after a quiet spell (a shaper's token bucket refilling,
TCP restarting slow start after idle) must be measured the way the step uses it. Back-to-back repeats measured a
tbf-capped veth link's sustained rate: 86.6 ms for 1 MiB at 100 Mbit/s with a 256 KB bucket, while the training
step, which lets the bucket refill during its 45 ms of compute, paid ~21 ms less (2026-12-06, AMD EPYC VM).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

DEFAULT_SIZES = (4, 4096, 65536, 1 << 20, 4 << 20, 16 << 20)


def _worker(rank: int, world: int, port: int, sizes: list[int], repeats: int, out: str, addr: str = "127.0.0.1",
            gap_s: float = 0.0) -> None:
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
            if gap_s > 0:  # sleeping, not spinning: two spinning ranks on 2 cores made 1 Gbit/s slower and noisier
                time.sleep(gap_s)
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            samples.append(time.perf_counter() - t0)
        times[nbytes] = statistics.median(samples)
    dist.barrier()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"world": world, "gap_s": gap_s, "times_s": {str(k): v for k, v in times.items()}}, f)
    dist.destroy_process_group()


def fit_ring(times_s: dict[int, float], world: int) -> dict:
    """Fit t = a + b * bytes: ``a`` is the smaller time of the two smallest messages (that small, it is all
    latency), ``b`` the least-squares slope of the rest with that intercept, which the largest messages dominate
    (they fix the bandwidth); then bandwidth = 2(N-1)/N / b and latency = a / (2 (N-1)).

    An unconstrained fit weighted by relative error (the earlier version) let the small messages' jitter set the
    slope: over a 100 Mbit/s link with sizes up to 4 MiB it reported 188 Mbit/s, although 4 MiB took 350 ms."""
    pts = sorted((int(k), float(v)) for k, v in times_s.items())
    if len(pts) < 2:
        raise ValueError("the fit needs at least two message sizes")
    x0 = pts[0][0]
    a = min(t for _, t in pts[:2])  # the two smallest messages are all latency: the faster one has less jitter
    rest = [(x - x0, t - a) for x, t in pts[1:]]
    sxx = sum(x * x for x, _ in rest)
    b = sum(x * y for x, y in rest) / sxx if sxx > 0 else float("nan")
    b = max(b, 1e-15)
    a = max(a - b * x0, 0.0)
    return {
        "world": world,
        "bandwidth_Bps": 2 * (world - 1) / world / b,
        "latency_s": a / (2 * (world - 1)),
        "times_s": {str(int(k)): v for k, v in times_s.items()},
    }


def fit_measured(raw: dict) -> dict:
    """The fit of a measurement file written by rank 0, with the idle gap it was measured with."""
    return dict(fit_ring({int(k): v for k, v in raw["times_s"].items()}, raw["world"]), gap_s=raw.get("gap_s", 0.0))


def measure(world: int = 2, sizes=DEFAULT_SIZES, repeats: int = 20, gap_s: float = 0.0) -> dict:
    """Run the micro-benchmark in this process's children; returns the fit."""
    import tempfile

    import torch.multiprocessing as mp

    from benchmarks.runner import free_port

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "allreduce.json")
        mp.start_processes(_worker, args=(world, free_port(), list(sizes), repeats, out, "127.0.0.1", gap_s),
                           nprocs=world, join=True, start_method="spawn")
        with open(out) as f:
            return fit_measured(json.load(f))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.allreduce", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--gap-s", type=float, default=0.0,
                    help="idle seconds before each timed all-reduce (training's compute between all-reduces)")
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
            _worker(args.rank, args.ranks, int(port), sizes, args.repeats, raw_path, addr, args.gap_s)
            if args.rank != 0:
                return 0
            with open(raw_path) as f:
                raw = json.load(f)
        fit = fit_measured(raw)
    else:
        fit = measure(args.ranks, sizes, args.repeats, args.gap_s)
    text = json.dumps(fit, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
