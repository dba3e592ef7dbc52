"""Attention for packed blocks, forward + backward of one layer, side by side.

    python -m benchmarks.studies.attention [--shape opt-125m smollm2-135m] [--dtype bf16|fp32] [--repeats 5]

Candidates, on one batch of packed blocks (documents of 40-260 tokens, as the bench's synthetic data):

* ``mask``: one SDPA call with the block-diagonal causal mask (what transformers does for the Llama family);
* ``varlen-bf16`` / ``varlen-fp32``: sft_varlen (one causal SDPA per document), in bf16, or in fp32 for bf16
  inputs (``SFT_ATTENTION_FP32``; sft.ops.attention.upcast_on_cpu decides ``auto``);
* ``varlen-bf16-math``: sft_varlen in bf16 with sft's GEMM backward (``model.fast_attention_backward``, the
  default) in place of the flash kernel's;
* ``varlen-fp32-lean``: sft_varlen computed in fp32 for bf16 inputs with ``model.fast_attention_backward`` (the
  default without AMX): bf16 kept for the backward, k/v with their own heads.

Each candidate runs once to warm up and then ``--repeats`` times, interleaved and in alternating order; the
median and the spread are printed with the CPU's bf16 flags.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {"opt-125m": (12, 12, 64), "smollm2-135m": (9, 3, 64)}  # query heads, kv heads, head dim


class _Attention(torch.nn.Module):
    is_causal = True


def packed_positions(batch: int, length: int, seed: int = 0, shortest: int = 40, longest: int = 260) -> torch.Tensor:
    """Per-document position ids of ``batch`` packed rows: documents of ``shortest``..``longest - 1`` tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        pos: list[int] = []
        while len(pos) < length:
            pos += range(int(torch.randint(shortest, longest, (1,), generator=g)))
        rows.append(pos[:length])
    return torch.tensor(rows)


def candidates(shape: str, batch: int, length: int, dtype: torch.dtype):
    from sft.ops.attention import UPCAST_ENV, varlen_sdpa_forward
    from sft.patches.transformers import use_math_backward

    heads, kv_heads, dim = SHAPES[shape]
    pos = packed_positions(batch, length)
    doc = torch.cumsum((pos == 0).int(), 1)
    mask = ((doc[:, :, None] == doc[:, None, :]) & torch.ones(length, length, dtype=torch.bool).tril())[:, None]
    module = _Attention().train()
    math_module = _Attention().train()
    assert use_math_backward(math_module) == 1  # what model.fast_attention_backward installs

    def qkv():
        def one(h):
            return torch.randn(batch, length, h, dim, dtype=dtype).transpose(1, 2).requires_grad_()
        return one(heads), one(kv_heads), one(kv_heads)

    def masked() -> float:
        q, k, v = qkv()
        t = time.perf_counter()
        rep = heads // kv_heads
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                             attn_mask=mask)
        out.backward(torch.ones_like(out))
        return time.perf_counter() - t

    def varlen(upcast: str, mod=module):
        def run() -> float:
            os.environ[UPCAST_ENV] = upcast
            q, k, v = qkv()
            t = time.perf_counter()
            out, _ = varlen_sdpa_forward(mod, q, k, v, None, position_ids=pos)
            out.backward(torch.ones_like(out))
            return time.perf_counter() - t
        return run

    runs = {"mask": masked, "varlen-bf16": varlen("0"), "varlen-fp32": varlen("1"),
            "varlen-bf16-math": varlen("0", math_module), "varlen-fp32-lean": varlen("1", math_module)}
    if dtype != torch.bfloat16:
        for name in ("varlen-fp32", "varlen-bf16-math", "varlen-fp32-lean"):
            runs.pop(name)
        runs["varlen"] = runs.pop("varlen-bf16")
    return runs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    from sft.ops.capabilities import cpu_flags

    flags = cpu_flags()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, amx_bf16={'amx_bf16' in flags}, "
          f"avx512_bf16={'avx512_bf16' in flags}; {args.batch} x {args.length} tokens, {args.dtype}")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    saved = os.environ.get("SFT_ATTENTION_FP32")
    try:
        for shape in args.shape:
            runs = candidates(shape, args.batch, args.length, dtype)
            times: dict[str, list[float]] = {k: [] for k in runs}
            for name in runs:
                runs[name]()  # warm-up
            for r in range(args.repeats):
                for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                    times[name].append(runs[name]())
            base = statistics.median(times["mask"])
            for name, ts in times.items():
                med = statistics.median(ts)
                print(f"{shape:13s} {name:12s} median {1e3 * med:7.1f} ms  (min {1e3 * min(ts):.1f}, "
                      f"max {1e3 * max(ts):.1f})  {base / med:.2f}x the mask")
    finally:
        if saved is None:
            os.environ.pop("SFT_ATTENTION_FP32", None)
        else:
            os.environ["SFT_ATTENTION_FP32"] = saved


if __name__ == "__main__":
    main()
