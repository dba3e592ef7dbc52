"""LoRA-input dropout on CPU: ``F.dropout`` against sft's mask (sft/ops/dropout.py), fwd + bwd, median of N.

    python -m benchmarks.studies.dropout [--shape 8 512 576] [--repeat 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sft.ops.dropout import dropout as fast_dropout


def _time(fn, x0: torch.Tensor, repeat: int) -> float:
    times = []
    for _ in range(repeat + 1):
        x = x0.detach().clone().requires_grad_()
        start = time.perf_counter()
        y = fn(x)
        y.backward(torch.ones_like(y))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs="+", default=[8, 512, 576])
    ap.add_argument("--p", type=float, default=0.05)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args(argv)
    print(f"fwd + bwd of dropout p={args.p} on {tuple(args.shape)}, {torch.get_num_threads()} threads, median ms")
    for dtype in (torch.float32, torch.bfloat16):
        x0 = torch.randn(args.shape, dtype=dtype)
        ref = _time(lambda x: F.dropout(x, args.p, True), x0, args.repeat)
        ours = _time(lambda x: fast_dropout(x, args.p, True), x0, args.repeat)
        print(f"  {str(dtype):15s} F.dropout {ref:7.2f}   sft {ours:7.2f}   ({ref / ours:.2f}x)")


if __name__ == "__main__":
    main()
