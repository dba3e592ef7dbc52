"""A cost model for data-parallel LoRA fine-tuning: compute time per step + a ring all-reduce of the LoRA gradients.

Only the adapter weights train, so the only per-step communication is one all-reduce of their gradients
(DDP; a few MB for LoRA r16). With a ring all-reduce over N ranks each rank sends and receives
2 (N-1)/N of the buffer, in 2 (N-1) sequential messages:

    t_allreduce(N) = 2 (N-1)/N * bytes / bandwidth + 2 (N-1) * latency        (0 for N = 1)

The model assumes no overlap of that all-reduce with the backward pass (DDP can overlap it, so this is the
pessimistic side) and that compute per step scales with the work per rank (no change in kernel efficiency with
the micro-batch size):

* weak scaling (the per-rank batch is fixed, the global batch grows with N):
      t_step(N) = t_compute + t_allreduce(N),   efficiency(N) = t_compute / t_step(N)
* strong scaling (the global batch G is fixed and split over N ranks; t_compute is measured at batch b on one rank):
      t_compute(N) = t_compute * (G / N) / b,   efficiency(N) = t_compute(N) / (t_compute(N) + t_allreduce(N))

Both give efficiency 1 at N = 1 and fall with N. "Efficiency" is throughput per unit of hardware relative to one
unit (a node in a projection, a rank's share of the cores on one machine).
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from dataclasses import asdict, dataclass

#: DDP's default gradient bucket (25 MiB): each bucket is one all-reduce, so one latency term each.
DDP_BUCKET_BYTES = 25 * 2**20


def ring_allreduce_seconds(nbytes: float, ranks: int, bandwidth_Bps: float, latency_s: float, buckets: int = 1) -> float:
    """Time of a ring all-reduce of ``nbytes`` over ``ranks`` ranks (bandwidth in bytes/s, latency per message).

    ``buckets`` all-reduces of ``nbytes / buckets`` each: the bandwidth term is unchanged, the latency term is paid
    once per bucket."""
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    if bandwidth_Bps <= 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth_Bps}")
    if latency_s < 0 or nbytes < 0:
        raise ValueError("latency and bytes must be >= 0")
    if ranks == 1:
        return 0.0
    n = ranks
    return 2 * (n - 1) / n * nbytes / bandwidth_Bps + 2 * (n - 1) * latency_s * max(1, buckets)


def synchronous_compute_s(step_times_per_node: list[list[float]], samples: int = 100_000, seed: int = 0) -> float:
    """The compute part of a synchronous data-parallel step from each node's measured step times alone.

    Every rank waits at the all-reduce for the slowest one, so a step costs the largest of the nodes' compute
    times, not their mean: this is the median, over combinations of one measured step per node, of the largest
    (every combination while there are at most ``samples`` of them, else ``samples`` drawn with ``seed``). With
    identical nodes and no jitter it equals the one-node median; jitter makes it larger, the more so the more nodes.
    """
    lists = [list(t) for t in step_times_per_node]
    if not lists or any(not t for t in lists):
        raise ValueError("need at least one measured step per node")
    if math.prod(len(t) for t in lists) <= samples:
        worst = [max(c) for c in itertools.product(*lists)]
    else:
        rng = random.Random(seed)
        worst = [max(rng.choice(t) for t in lists) for _ in range(samples)]
    return statistics.median(worst)


def ddp_buckets(nbytes: float, bucket_bytes: int = DDP_BUCKET_BYTES) -> int:
    return max(1, math.ceil(nbytes / bucket_bytes))


@dataclass
class CostModel:
    """Inputs of the model. ``t_compute_s``: measured step time of one unit (rank or node) at ``batch`` sequences
    per step with no communication. ``grad_bytes``: bytes of the trainable (LoRA) gradients."""

    t_compute_s: float
    grad_bytes: float
    bandwidth_Bps: float
    latency_s: float
    batch: int = 1
    buckets: int | None = None  # None: DDP's default bucketing of grad_bytes
    #: per-step cost of running data-parallel at all, beyond the gradient all-reduce's bytes and latency (DDP's
    #: reducer, the per-step token-count and loss collectives, the collective library's threads sharing the cores):
    #: measured as (N-rank step over a fast link) - (one rank's step) - (that link's all-reduce); 0 for N = 1
    overhead_s: float = 0.0

    def __post_init__(self) -> None:
        if self.t_compute_s <= 0:
            raise ValueError(f"t_compute_s must be > 0, got {self.t_compute_s}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")

    @property
    def n_buckets(self) -> int:
        return self.buckets if self.buckets is not None else ddp_buckets(self.grad_bytes)

    def allreduce_s(self, n: int) -> float:
        return ring_allreduce_seconds(self.grad_bytes, n, self.bandwidth_Bps, self.latency_s, self.n_buckets)

    def comm_s(self, n: int) -> float:
        """Communication per step: the all-reduce plus the data-parallel overhead (none on one rank)."""
        return self.allreduce_s(n) + (self.overhead_s if n > 1 else 0.0)

    def weak_step_s(self, n: int) -> float:
        return self.t_compute_s + self.comm_s(n)

    def weak_efficiency(self, n: int) -> float:
        return self.t_compute_s / self.weak_step_s(n)

    def strong_compute_s(self, n: int, global_batch: int) -> float:
        return self.t_compute_s * (global_batch / n) / self.batch

    def strong_step_s(self, n: int, global_batch: int) -> float:
        return self.strong_compute_s(n, global_batch) + self.comm_s(n)

    def strong_efficiency(self, n: int, global_batch: int) -> float:
        c = self.strong_compute_s(n, global_batch)
        return c / (c + self.comm_s(n))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["n_buckets"] = self.n_buckets
        return d


def projection_table(model: CostModel, nodes: list[int], global_batch: int | None = None) -> list[dict]:
    """Rows ``{nodes, allreduce_s, weak_step_s, weak_efficiency, strong_step_s, strong_efficiency}``."""
    g = global_batch or model.batch * max(nodes)
    rows = []
    for n in nodes:
        rows.append({
            "nodes": n,
            "allreduce_s": model.allreduce_s(n),
            "weak_step_s": model.weak_step_s(n),
            "weak_efficiency": model.weak_efficiency(n),
            "strong_global_batch": g,
            "strong_step_s": model.strong_step_s(n, g),
            "strong_efficiency": model.strong_efficiency(n, g),
        })
    return rows


def gbit_to_Bps(gbit_per_s: float) -> float:
    """Network bandwidth as quoted (Gbit/s) -> bytes/s."""
    return gbit_per_s * 1e9 / 8


def lora_param_count(model_name: str, r: int, targets: list[str]) -> int:
    """Number of LoRA parameters (r * (in + out) per adapted Linear) for a model, counted on the meta device
    (no memory, no weights): what one all-reduce moves per step, times the gradient's element size."""
    import torch

    model = meta_model(model_name)
    count = 0
    all_linear = targets == ["all-linear"] or targets == "all-linear"
    out_emb = model.get_output_embeddings()
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or mod is out_emb:
            continue
        leaf = name.split(".")[-1]
        if all_linear or leaf in targets:
            count += r * (mod.in_features + mod.out_features)
    return count


def meta_model(model_name: str):
    """The architecture of ``model_name`` (an ``arch:`` name, a bare architecture name, or a local directory) on
    the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sft.models import ARCHITECTURES, arch_config

    arch = model_name[len("arch:"):] if model_name.startswith("arch:") else model_name
    if arch in ARCHITECTURES:
        config = arch_config(arch)
    else:
        config = AutoConfig.from_pretrained(model_name)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
