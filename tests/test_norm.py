"""The fused CPU RMSNorm (sft/ops/norm.py, model.fused_norm): its bf16 output under autocast, and only Llama-style
norms routed. Loss and gradients against transformers' norm, no-grad forwards and the compiler fallback:
tests/test_fused_ops.py."""

import torch

from sft.models import build_random
from sft.ops import norm as fused
from sft.patches.transformers import install_fused_norm


def test_under_autocast_the_output_is_what_the_projections_would_cast_it_to():
    norm = build_random("tiny-llama", 0).model.norm
    x = torch.randn(4, 7, norm.weight.shape[0], dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = type(norm).forward(norm, x).to(torch.bfloat16)  # fp32 (fp32 weight), cast by the next linear
        got = fused.rms_norm(norm, x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_only_llama_style_norms_are_routed():
    class OffsetNorm(torch.nn.Module):  # Gemma's shape: 1 + weight
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(8))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)

    m = torch.nn.Sequential(OffsetNorm())
    assert install_fused_norm(m) == 0
    assert not fused.is_llama_rmsnorm(OffsetNorm)
    assert install_fused_norm(build_random("tiny-opt", 0)) == 0  # OPT: LayerNorm
