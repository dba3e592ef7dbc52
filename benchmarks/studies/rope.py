"""The rotary embedding of a Llama-family layer, fwd + bwd of q and k: transformers' ``apply_rotary_pos_emb`` against
sft's compiled kernel (sft/ops/rope.py), interleaved, median of N.

    python -m benchmarks.studies.rope [--shape smollm2-135m llama-1b] [--tokens 8 512] [--repeat 15] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = {"smollm2-135m": (9, 3, 64), "llama-1b": (32, 8, 64)}  # query heads, kv heads, head dim


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=["smollm2-135m"])
    ap.add_argument("--tokens", type=int, nargs=2, default=[8, 512], metavar=("BATCH", "LENGTH"))
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = ap.parse_args(argv)
    import transformers.models.llama.modeling_llama as llama

    from sft.ops import rope
    from sft.ops.capabilities import cpu_flags

    original = getattr(llama.apply_rotary_pos_emb, "_sft_original", llama.apply_rotary_pos_emb)
    fused = rope.fused(original)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    flags = cpu_flags()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, amx_bf16={'amx_bf16' in flags}, "
          f"avx512_bf16={'avx512_bf16' in flags}; {args.tokens[0]} x {args.tokens[1]} tokens, {args.dtype}")
    B, L = args.tokens
    for shape in args.shape:
        heads, kv, dim = SHAPES[shape]
        q0, k0 = torch.randn(B, heads, L, dim, dtype=dtype), torch.randn(B, kv, L, dim, dtype=dtype)
        cos, sin = torch.randn(B, L, dim, dtype=dtype), torch.randn(B, L, dim, dtype=dtype)
        gq, gk = torch.randn_like(q0), torch.randn_like(k0)

        def run(fn) -> float:
            q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
            start = time.perf_counter()
            qe, ke = fn(q, k, cos, sin)
            torch.autograd.backward((qe, ke), (gq, gk))
            return time.perf_counter() - start

        runs = {"transformers": original, "sft fused": fused}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for fn in runs.values():
            run(fn)  # warm-up (the fused kernel compiles here)
        for r in range(args.repeat):
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                times[name].append(run(runs[name]))
        base = statistics.median(times["transformers"])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"{shape:13s} {name:13s} median {1e3 * med:6.2f} ms  (min {1e3 * min(ts):.2f}, "
                  f"max {1e3 * max(ts):.2f})  {base / med:.2f}x")


if __name__ == "__main__":
    main()
