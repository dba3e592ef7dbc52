"""The fused CPU SwiGLU product (sft/ops/mlp.py, model.fused_mlp): the loss and gradients of transformers' MLP in fp32
and under bf16 autocast, one intermediate-sized tensor less kept per layer, only on Llama-style SiLU MLPs, and a
working fallback when compilation fails."""

import copy
import logging

import pytest
import torch

from sft.models import build_random
from sft.ops import mlp as fused


def _mlps(model):
    return [m for m in model.modules() if type(m).__name__.endswith("MLP")]


def _step(model, ids, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mixed", [False, True])
def test_fused_mlp_gives_the_models_loss_and_gradients(mixed):
    """Every MLP of a tiny Llama is routed; the loss and every gradient match transformers' MLP (fp32: to rounding;
    bf16-mixed: the product rounded once instead of twice)."""
    torch.manual_seed(0)
    ref = build_random("tiny-llama", 0).train()
    if mixed:
        for p in ref.parameters():
            p.data = p.data.to(torch.float32 if p.ndim == 1 else torch.bfloat16)
    model = copy.deepcopy(ref)
    n = fused.install_fused_mlp(model)
    assert n == len(_mlps(model)) == model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (2, 33))
    loss_ref, g_ref = _step(ref, ids, mixed)
    loss, g = _step(model, ids, mixed)
    assert g.keys() == g_ref.keys() and len(g) == sum(1 for p in model.parameters())
    rtol = 2e-2 if mixed else 1e-5
    assert torch.allclose(loss, loss_ref, rtol=rtol / 10, atol=0), (loss, loss_ref)
    for k in g:
        a, b = g[k].float(), g_ref[k].float()
        assert (a - b).norm() <= rtol * b.norm() + 1e-12, k


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
    fused.install_fused_mlp(torch.nn.ModuleList([mlp]))
    got = _saved_bytes(mlp, x)
    # eager keeps gate, silu(gate) and up; the fused product keeps gate and up only
    assert eager - got == 4 * 16 * inter * 4, (eager, got)


def test_only_llama_style_silu_mlps_are_routed():
    model = build_random("tiny-llama", 0)
    mlp = _mlps(model)[0]
    mlp.act_fn = torch.nn.GELU()
    assert fused.install_fused_mlp(torch.nn.ModuleList([mlp])) == 0
    assert fused.install_fused_mlp(build_random("tiny-opt", 0)) == 0  # OPT: fc1 / fc2, ReLU


def test_no_grad_forwards_keep_the_modules_own_forward(monkeypatch):
    model = build_random("tiny-llama", 0)
    fused.install_fused_mlp(model)
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
    mlp = _mlps(build_random("tiny-llama", 0))[0]
    x = torch.randn(3, 16, mlp.gate_proj.in_features, requires_grad=True)
    want = type(mlp).forward(mlp, x)
    fused.install_fused_mlp(torch.nn.ModuleList([mlp]))
    with caplog.at_level(logging.WARNING, logger="sft.ops.mlp"):
        a = mlp(x)
        b = mlp(x)
    assert torch.equal(a, want) and torch.equal(b, a)
    assert sum("torch.compile failed" in r.message for r in caplog.records) == 1
