"""What the compiled CPU ops (the RMSNorm of sft/ops/norm.py, the SwiGLU product of sft/ops/mlp.py) share: the loss and
every gradient of transformers' modules in fp32 and under bf16 autocast, eager forwards without autograd, and a
working fallback with one warning when compilation fails."""

import copy
import logging

import pytest
import torch

from sft.models import build_random
from sft.ops import mlp, norm
from sft.patches.transformers import install_fused_mlp, install_fused_norm

# op name -> (module, installer, class-name suffix of the modules it routes, routed modules per decoder layer,
# extra routed modules, input width of a routed module)
OPS = {
    "norm": (norm, install_fused_norm, "RMSNorm", 2, 1, lambda m: m.weight.shape[0]),
    "mlp": (mlp, install_fused_mlp, "MLP", 1, 0, lambda m: m.gate_proj.in_features),
}


def _modules(model, suffix):
    return [m for m in model.modules() if type(m).__name__.endswith(suffix)]


def _step(model, ids, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("mixed", [False, True])
def test_the_fused_op_gives_the_models_loss_and_gradients(op, mixed):
    """Every such module of a tiny Llama is routed; the loss and every gradient match transformers' (fp32: to
    rounding; bf16-mixed: roundings differ, the norm sums its gradients in bf16, the product rounds once)."""
    _, install, suffix, per_layer, extra, _ = OPS[op]
    torch.manual_seed(0)
    ref = build_random("tiny-llama", 0).train()
    if mixed:
        for p in ref.parameters():
            p.data = p.data.to(torch.float32 if p.ndim == 1 else torch.bfloat16)
    model = copy.deepcopy(ref)
    n = install(model)
    assert n == len(_modules(model, suffix)) == per_layer * model.config.num_hidden_layers + extra
    ids = torch.randint(0, model.config.vocab_size, (2, 33))
    loss_ref, g_ref = _step(ref, ids, mixed)
    loss, g = _step(model, ids, mixed)
    assert g.keys() == g_ref.keys() and len(g) == sum(1 for p in model.parameters())
    rtol = 2e-2 if mixed else 1e-5
    assert torch.allclose(loss, loss_ref, rtol=rtol / 10, atol=0), (loss, loss_ref)
    for k in g:
        a, b = g[k].float(), g_ref[k].float()
        assert (a - b).norm() <= rtol * b.norm() + 1e-12, k


@pytest.mark.parametrize("op", OPS)
def test_no_grad_forwards_keep_the_modules_own_forward(op, monkeypatch):
    mod, install, *_ = OPS[op]
    model = build_random("tiny-llama", 0)
    install(model)
    monkeypatch.setattr(mod, "_compiled", lambda: (_ for _ in ()).throw(AssertionError("compiled under no_grad")))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 100, (1, 5)))


@pytest.mark.parametrize("op", OPS)
def test_a_failing_compiler_falls_back_with_one_warning(op, monkeypatch, caplog):
    mod, install, suffix, _, _, width = OPS[op]

    def broken():
        def f(*a):
            raise RuntimeError("no C++ compiler found")
        return f

    monkeypatch.setattr(mod, "_compiled", broken)
    monkeypatch.setitem(mod._state, "broken", False)
    module = _modules(build_random("tiny-llama", 0), suffix)[0]
    x = torch.randn(3, 16, width(module), requires_grad=True)
    want = type(module).forward(module, x)
    assert install(torch.nn.ModuleList([module])) == 1
    with caplog.at_level(logging.WARNING, logger=mod.__name__):
        a = module(x)
        b = module(x)
    assert torch.equal(a, want) and torch.equal(b, a)
    assert sum("torch.compile failed" in r.message for r in caplog.records) == 1
