"""Throughput, FLOPs and memory: the numbers every run and benchmark reports.

FLOPs per token for LoRA fine-tuning (a frozen base):
  * forward: 2 FLOPs per weight of every matmul (N_mm) + attention scores and values (4 * layers * ctx * d_attn,
    with ctx the average causal context, seq/2);
  * backward: gradients w.r.t. activations only for frozen weights (another 2 * N_mm) — weight gradients are
    needed for the adapters alone (2 * N_lora) — and twice the attention forward;
  * so model FLOPs ~= 4 * N_mm + 6 * N_lora + 3 * attention (vs the 6 * N of full fine-tuning).
Hardware FLOPs add the recomputed forward when activation checkpointing is on (2 * N_mm + attention).
MFU = achieved model FLOP/s / peak; HFU likewise with hardware FLOPs.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

import torch


@dataclass
class FlopsPerToken:
    model: float
    hardware: float


def _matmul_params(model: torch.nn.Module) -> tuple[int, int, int]:
    """(frozen matmul weights incl. the LM head, LoRA weights, embedding-only params)."""
    frozen = lora = 0
    for name, p in model.named_parameters():
        n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
        if "lora_" in name:
            lora += n
        elif p.ndim == 2 or p.__class__.__name__ == "Params4bit":
            frozen += n
    emb = model.get_input_embeddings()
    emb_n = emb.weight.numel() if emb is not None else 0
    out = model.get_output_embeddings()
    tied = out is not None and emb is not None and out.weight.data_ptr() == emb.weight.data_ptr()
    # A tied embedding is counted once by named_parameters but used twice: as a lookup (no FLOPs) and as the
    # LM head (a matmul). An untied input embedding is a lookup only.
    if not tied:
        frozen -= emb_n
    return frozen, lora, emb_n


def flops_per_token(model: torch.nn.Module, seq_length: int, checkpointing: bool | float) -> FlopsPerToken:
    """Model FLOPs (forward + backward) and hardware FLOPs (plus the recomputed forward share: ``checkpointing`` is
    True/False or the fraction of layers that recompute) per token."""
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", 0)
    heads = getattr(cfg, "num_attention_heads", 0)
    head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else 0)
    n_mm, n_lora, _ = _matmul_params(model)
    attn_fwd = 4 * layers * (seq_length / 2) * heads * head_dim  # QK^T and AV over the causal half on average
    fwd = 2 * n_mm + 2 * n_lora + attn_fwd
    bwd = 2 * n_mm + 4 * n_lora + 2 * attn_fwd
    model_flops = fwd + bwd
    hardware = model_flops + fwd * float(checkpointing)
    return FlopsPerToken(model=model_flops, hardware=hardware)


def checkpointing_fraction(model: torch.nn.Module) -> float:
    """The share of transformers' checkpointable layers that recompute their activations (0 off, 1 all; in
    between with selective checkpointing)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    return sum(1 for m in layers if m.gradient_checkpointing) / len(layers) if layers else 0.0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


def cuda_memory() -> dict[str, int]:
    if not torch.cuda.is_available():
        return {}
    return {
        "cuda_max_allocated": torch.cuda.max_memory_allocated(),
        "cuda_max_reserved": torch.cuda.max_memory_reserved(),
    }


@dataclass
class StepTimer:
    """Wall time of optimizer steps, excluding evaluation and checkpoint saves (flagged by the caller)."""

    tokens_per_step: int
    times: list[float] = None  # type: ignore[assignment]
    first_step_s: float | None = None
    _t: float | None = None
    _skip_next: bool = False

    def __post_init__(self) -> None:
        self.times = []

    def start(self) -> None:
        self._t = time.perf_counter()

    def step(self) -> None:
        now = time.perf_counter()
        if self._t is not None:
            if self.first_step_s is None:
                self.first_step_s = now - self._t  # includes warm-up / compilation
            elif not self._skip_next:
                self.times.append(now - self._t)
        self._skip_next = False
        self._t = now

    def interrupted(self) -> None:
        """Evaluation or saving happened since the last step: do not count the next interval."""
        self._skip_next = True

    @property
    def tokens_per_second(self) -> float:
        if not self.times:
            return float("nan") if self.first_step_s is None else self.tokens_per_step / self.first_step_s
        return self.tokens_per_step * len(self.times) / sum(self.times)

    def summary(self) -> dict[str, float]:
        ts = sorted(self.times)
        pick = lambda q: ts[min(len(ts) - 1, int(q * len(ts)))] if ts else float("nan")  # noqa: E731
        return {
            "tokens_per_s": self.tokens_per_second,
            "step_time_median_s": pick(0.5),
            "step_time_p90_s": pick(0.9),
            "first_step_s": self.first_step_s or float("nan"),
            "measured_steps": len(self.times),
            "step_times_s": list(self.times),  # in step order: the distribution behind the median (stragglers, jitter)
        }


# --------------------------------------------------------------------------------------------- benchmark helpers
# (used by benchmarks/; additions only)


def measure_gemm_peak(dtype: torch.dtype = torch.bfloat16, size: int = 2048, seconds: float = 2.0,
                      device: str | None = None, rounds: int = 4) -> dict[str, float]:
    """Achieved GEMM FLOP/s for ``dtype``, the best of the two operand layouts a training step uses.

    ``a @ b`` (both operands row-major, as in the backward pass's ``grad @ W``) and ``a @ b.T`` (``F.linear``'s
    layout, the forward pass) can run different kernels: on a CPU without native bf16 (AVX2 only) bf16 ``a @ b``
    measured ~0.3 GFLOP/s and ``a @ b.T`` ~5 GFLOP/s. A peak is the best the machine does, so both layouts are
    timed in ``rounds`` short rounds and the best round of the best layout is the peak (on a shared, noisy machine
    the best round is the one least disturbed). ``size`` is the largest matrix side: a layout so slow that one
    ``size``-GEMM would take more than a sixteenth of ``seconds`` is timed on smaller matrices (found with a 512
    probe), so the measurement ends in about ``seconds``. Returns ``{"nn": FLOP/s, "nt": FLOP/s, "peak": max}``."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)

    def rate(fn, n: int, budget: float) -> float:
        k, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < budget or k == 0:
            fn()
            k += 1
        sync()
        return 2 * n**3 * k / (time.perf_counter() - t0)

    def operands(n: int, layout: str):
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        fn = (lambda: a @ b) if layout == "nn" else (lambda: a @ b.T)
        fn()
        sync()
        return fn

    out: dict[str, float] = {}
    for layout in ("nn", "nt"):
        n = size
        if size > 512:
            probe = rate(operands(512, layout), 512, 0.0)  # one timed call
            fit = int((probe * seconds / 32) ** (1 / 3)) // 128 * 128  # one GEMM ~ seconds / 16
            n = max(512, min(size, fit))
        fn = operands(n, layout)
        out[layout] = max(rate(fn, n, seconds / 2 / rounds) for _ in range(max(1, rounds)))
    out["peak"] = max(out["nn"], out["nt"])
    return out


def percentile(values, q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` by linear interpolation; nan when empty."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return float("nan")
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def utilization(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """MFU (with model FLOPs per token) or HFU (with hardware FLOPs per token) against ``peak_flops``."""
    if not peak_flops or peak_flops <= 0:
        return float("nan")
    return tokens_per_s * flops_per_token / peak_flops
