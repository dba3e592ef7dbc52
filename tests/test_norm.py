"""The fused CPU RMSNorm (sft/ops/norm.py, model.fused_norm): the values and gradients of transformers' norm in fp32
and under bf16 autocast, only on Llama-style norms, and a working fallback when compilation fails."""

import copy
import logging

import pytest
import torch

from sft.models import build_random
from sft.ops import norm as fused


def _norms(model):
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]


def _step(model, ids, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mixed", [False, True])
def test_fused_norm_gives_the_models_loss_and_gradients(mixed):
    """Every norm of a tiny Llama is routed; the loss and every gradient match transformers' norm (fp32: to
    rounding; bf16-mixed: the same bf16 GEMM inputs, gradients summed in bf16 instead of fp32)."""
    torch.manual_seed(0)
    ref = build_random("tiny-llama", 0).train()
    if mixed:
        for p in ref.parameters():
            p.data = p.data.to(torch.float32 if p.ndim == 1 else torch.bfloat16)
    model = copy.deepcopy(ref)
    n = fused.install_fused_norm(model)
    assert n == len(_norms(model)) == 2 * model.config.num_hidden_layers + 1
    ids = torch.randint(0, model.config.vocab_size, (2, 33))
    loss_ref, g_ref = _step(ref, ids, mixed)
    loss, g = _step(model, ids, mixed)
    assert g.keys() == g_ref.keys() and len(g) == sum(1 for p in model.parameters())
    rtol = 2e-2 if mixed else 1e-5
    assert torch.allclose(loss, loss_ref, rtol=rtol / 10, atol=0), (loss, loss_ref)
    for k in g:
        a, b = g[k].float(), g_ref[k].float()
        assert (a - b).norm() <= rtol * b.norm() + 1e-12, k


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
    assert fused.install_fused_norm(m) == 0
    assert not fused.is_llama_rmsnorm(OffsetNorm)
    assert fused.install_fused_norm(build_random("tiny-opt", 0)) == 0  # OPT: LayerNorm


def test_no_grad_forwards_keep_the_modules_own_forward(monkeypatch):
    model = build_random("tiny-llama", 0)
    fused.install_fused_norm(model)
    monkeypatch.setattr(fused, "_compiled", lambda: (_ for _ in ()).throw(AssertionError("compiled under no_grad")))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 100, (1, 5)))


def test_a_failing_compiler_falls_back_with_one_warning(monkeypatch, caplog):
    def broken():
        def f(*a):
            raise RuntimeError("no C++ compiler found")
        return f

    monkeypatch.setattr(fused, "_compiled", broken)
    monkeypatch.setitem(fused._state, "broken", False)
    norm = build_random("tiny-llama", 0).model.norm
    x = torch.randn(3, 16, norm.weight.shape[0], requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="sft.ops.norm"):
        a = fused.rms_norm(norm, x)
        b = fused.rms_norm(norm, x)
    assert torch.equal(a, type(norm).forward(norm, x)) and torch.equal(b, a)
    assert sum("torch.compile failed" in r.message for r in caplog.records) == 1
