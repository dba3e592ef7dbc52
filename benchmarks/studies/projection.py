"""The cost model's projection for the configurations users ask about, as a markdown table and a plot.

    python -m benchmarks.studies.projection [--out benchmarks/results/projection]

For opt-1.3b and llama-7b shapes, LoRA r16 on q/v, LoRA r16 on every linear layer, and QLoRA r16 on every linear
layer, it projects weak-scaling efficiency (per-node batch fixed) at 2 ... 64 nodes on 10, 25 and 100 Gbit/s links
with :class:`benchmarks.costmodel.CostModel` (compute + one ring all-reduce of the LoRA gradients per DDP bucket).

Which inputs are what:
* gradient bytes per step: **derived exactly** from the architecture (LoRA parameters counted on the meta device,
  fp32 gradients); QLoRA moves the same LoRA gradients as LoRA (the 4-bit base is frozen);
* link latency per message: **assumed** 25 us at 10 Gbit/s, 10 us at 25, 5 us at 100 (typical TCP over Ethernet;
  the capped-veth measurement in tests/test_multinode.py saw 80-150 us on one shared VM);
* compute seconds per step on one node: **assumed** from FLOPs: ``tokens * 6 * params / (peak * MFU)`` for one
  node of the stated kind (a 2-socket AMX Xeon or one H100) at the stated MFU, with ``tokens`` = 8 sequences x
  2048 tokens per node per step. QLoRA adds the dequantization (assumed 1.3x the LoRA step). Replace them with a
  measured ``sft bench`` step time (``sft bench project --step-time``) for your own nodes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.costmodel import CostModel, gbit_to_Bps, lora_param_count

NODES = [2, 4, 8, 16, 32, 64]
LINKS = [(10.0, 25.0), (25.0, 10.0), (100.0, 5.0)]  # (Gbit/s, assumed latency in us)
TOKENS_PER_STEP = 8 * 2048
#: (label, peak bf16 FLOP/s, assumed MFU): the node kinds the projection is made for (assumptions, see above)
NODE_KINDS = [("2-socket AMX Xeon, 2 x 56 cores", 2 * 56 * 2.0e9 * 1024, 0.25), ("1 x H100 SXM", 989e12, 0.35)]
CONFIGS = [  # (label, LoRA targets, compute factor over LoRA)
    ("LoRA r16 q,v", ["q_proj", "v_proj"], 1.0),
    ("LoRA r16 all-linear", ["all-linear"], 1.0),
    ("QLoRA r16 all-linear", ["all-linear"], 1.3),
]
MODELS = {"opt-1.3b": 1.3e9, "llama-7b": 6.7e9}


def rows() -> list[dict]:
    out = []
    for model, params in MODELS.items():
        for cfg, targets, factor in CONFIGS:
            grad_bytes = 4 * lora_param_count(f"arch:{model}", 16, targets)
            for node, peak, mfu in NODE_KINDS:
                t_compute = factor * TOKENS_PER_STEP * 6 * params / (peak * mfu)
                for gbps, lat_us in LINKS:
                    cm = CostModel(t_compute, grad_bytes, gbit_to_Bps(gbps), lat_us * 1e-6, batch=8)
                    out.append({"model": model, "config": cfg, "node": node, "link_gbps": gbps,
                                "latency_us": lat_us, "grad_mib": grad_bytes / 2**20, "t_compute_s": t_compute,
                                "efficiency": {n: cm.weak_efficiency(n) for n in NODES}})
    return out


def markdown(table: list[dict]) -> str:
    head = "| model | config | LoRA grads | node (assumed) | step on 1 node | link | " + \
           " | ".join(f"{n} nodes" for n in NODES) + " |"
    lines = [head, "|" + "---|" * (6 + len(NODES))]
    for r in table:
        lines.append(f"| {r['model']} | {r['config']} | {r['grad_mib']:.1f} MiB | {r['node']} | "
                     f"{r['t_compute_s']:.2f} s | {r['link_gbps']:g} Gbit/s | "
                     + " | ".join(f"{r['efficiency'][n]:.2f}" for n in NODES) + " |")
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, (node, _, _) in zip(axes, NODE_KINDS):
        for r in table:
            if r["node"] != node or r["config"] != "LoRA r16 all-linear":
                continue
            ax.plot(NODES, [r["efficiency"][n] for n in NODES], marker="o",
                    label=f"{r['model']}, {r['link_gbps']:g} Gbit/s")
        ax.set_xscale("log", base=2)
        ax.set_xticks(NODES, [str(n) for n in NODES])
        ax.set_xlabel("nodes")
        ax.set_title(f"LoRA r16 all-linear, node = {node}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("weak-scaling efficiency (1 = linear)")
    axes[1].legend(fontsize=8)
    fig.suptitle("Cost-model projection (gradient bytes derived; compute step and latency assumed)")
    fig.text(0.01, 0.01, "python -m benchmarks.studies.projection; model checked on 2 namespace nodes over tbf-capped "
             "veth links (tests/test_multinode.py)", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.studies.projection", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/projection", help="writes OUT.md, OUT.json, OUT.png")
    args = ap.parse_args(argv)
    table = rows()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown(table))
    out.with_suffix(".json").write_text(json.dumps(table, indent=1))
    plot(table, out.with_suffix(".png"))
    print(markdown(table))
    print(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
