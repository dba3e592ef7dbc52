"""The fused CPU SwiGLU product (sft/ops/mlp.py, model.fused_mlp): one intermediate-sized tensor less kept per layer,
and only Llama-style SiLU MLPs routed. Loss and gradients against transformers' MLP, no-grad forwards and the
compiler fallback: tests/test_fused_ops.py."""

import torch

from sft.models import build_random
from sft.ops import mlp as fused
from sft.patches.transformers import install_fused_mlp


def _mlps(model):
    return [m for m in model.modules() if type(m).__name__.endswith("MLP")]


def _saved_bytes(module, x) -> int:
    """Bytes of distinct activation storages autograd keeps for one forward of ``module`` (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum().backward()
    return sum(seen.values())


def test_the_product_no_longer_stores_silu_of_the_gate():
    mlp = _mlps(build_random("tiny-llama", 0))[0]
    for p in mlp.parameters():
        p.requires_grad_(False)  # frozen base, as under LoRA
    inter = mlp.gate_proj.out_features
    x = torch.randn(4, 16, mlp.gate_proj.in_features, requires_grad=True)
    eager = _saved_bytes(mlp, x)
    install_fused_mlp(torch.nn.ModuleList([mlp]))
    got = _saved_bytes(mlp, x)
    # eager keeps gate, silu(gate) and up; the fused product keeps gate and up only
    assert eager - got == 4 * 16 * inter * 4, (eager, got)


def test_only_llama_style_silu_mlps_are_routed():
    model = build_random("tiny-llama", 0)
    mlp = _mlps(model)[0]
    mlp.act_fn = torch.nn.GELU()
    assert install_fused_mlp(torch.nn.ModuleList([mlp])) == 0
    assert install_fused_mlp(build_random("tiny-opt", 0)) == 0  # OPT: fc1 / fc2, ReLU
