"""The fused CPU rotary embedding (sft/ops/rope.py, model.fused_rope): the values and gradients of transformers'
``apply_rotary_pos_emb`` (closer to fp32 than eager bf16), installed on the Llama family's modeling modules only,
the original function outside training, and a fallback with one warning when compilation fails."""

import copy
import logging

import pytest
import torch

import transformers.models.llama.modeling_llama as llama
from sft.models import build_random
from sft.ops import rope
from sft.patches.transformers import install_fused_rope

ORIGINAL = getattr(llama.apply_rotary_pos_emb, "_sft_original", llama.apply_rotary_pos_emb)


@pytest.fixture
def eager(monkeypatch):
    """transformers' own function in the Llama module for the test, restored afterwards whatever it installed."""
    monkeypatch.setattr(llama, "apply_rotary_pos_emb", ORIGINAL)
    monkeypatch.setitem(rope._state, "broken", False)


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, L, D = 2, 24, 16
    q = torch.randn(B, 4, L, D, generator=g)
    k = torch.randn(B, 2, L, D, generator=g)
    emb = llama.LlamaRotaryEmbedding(llama.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=D))
    pos = torch.cat([torch.arange(10), torch.arange(L - 10)])[None].expand(B, -1)
    cos, sin = emb(q, pos)
    return [t.to(dtype) for t in (q, k, cos, sin)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_rope_gives_transformers_values_and_gradients(eager, dtype):
    """fp32: the original's values and gradients to fp32 rounding. bf16: the fp32 result rounded once, at least as
    close to fp32 as the eager bf16 function, values and gradients."""
    fused = rope.fused(ORIGINAL)
    q, k, cos, sin = _inputs(dtype)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k)]
    ref = ORIGINAL(*ref_in, cos.float(), sin.float())
    got_in = [t.detach().clone().requires_grad_() for t in (q, k)]
    eager_in = [t.detach().clone().requires_grad_() for t in (q, k)]
    before = rope.runs()
    got = fused(*got_in, cos, sin)
    assert rope.runs() == before + 1
    want = ORIGINAL(*eager_in, cos, sin)
    g = [torch.randn(t.shape, generator=torch.Generator().manual_seed(5)).to(dtype) for t in ref]  # rounded
    for outs, ins in ((ref, ref_in), (got, got_in), (want, eager_in)):
        torch.autograd.backward(outs, [x.to(outs[0].dtype) for x in g])
    for i in range(2):
        assert got[i].dtype == want[i].dtype == dtype and got[i].shape == want[i].shape
        if dtype == torch.float32:
            torch.testing.assert_close(got[i], ref[i], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got_in[i].grad, ref_in[i].grad, rtol=1e-5, atol=1e-6)
        else:
            err, eager_err = ((x.float() - ref[i]).abs().max() for x in (got[i], want[i]))
            assert err <= eager_err and err <= 2 ** -8 * ref[i].abs().max(), (err, eager_err)
            gerr, geager = ((x.grad.float() - ref_in[i].grad).abs().max() for x in (got_in[i], eager_in[i]))
            assert gerr <= geager and gerr <= 2 ** -8 * ref_in[i].grad.abs().max(), (gerr, geager)


def _step(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_a_llama_trains_through_the_fused_rope_with_its_own_loss_and_gradients(eager):
    """Installed on every attention layer of a tiny Llama; the fp32 loss and every gradient equal transformers'."""
    torch.manual_seed(0)
    ref = build_random("tiny-llama", 0).train()
    model = copy.deepcopy(ref)
    ids = torch.randint(0, model.config.vocab_size, (2, 33))
    loss_ref, g_ref = _step(ref, ids)  # before the swap: transformers' function
    assert install_fused_rope(model) == model.config.num_hidden_layers
    assert llama.apply_rotary_pos_emb is not ORIGINAL and llama.apply_rotary_pos_emb._sft_original is ORIGINAL
    assert install_fused_rope(model) == model.config.num_hidden_layers  # again: no second wrapping
    assert llama.apply_rotary_pos_emb._sft_original is ORIGINAL
    before = rope.runs()
    loss, g = _step(model, ids)
    assert rope.runs() - before == model.config.num_hidden_layers
    assert g.keys() == g_ref.keys() and len(g) == sum(1 for p in model.parameters())
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    for n in g:
        assert (g[n] - g_ref[n]).norm() <= 1e-5 * g_ref[n].norm() + 1e-12, n


def test_no_grad_forwards_and_other_models_keep_transformers_function(eager, monkeypatch):
    model = build_random("tiny-llama", 0)
    install_fused_rope(model)
    monkeypatch.setattr(rope, "_compiled", lambda: (_ for _ in ()).throw(AssertionError("compiled under no_grad")))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 100, (1, 5)))
    assert install_fused_rope(build_random("tiny-opt", 0)) == 0  # OPT has no rotary embedding


def test_a_failing_compiler_falls_back_with_one_warning(eager, monkeypatch, caplog):
    def broken():
        def f(*a):
            raise RuntimeError("no C++ compiler found")
        return f

    monkeypatch.setattr(rope, "_compiled", broken)
    fused = rope.fused(ORIGINAL)
    q, k, cos, sin = _inputs(torch.float32)
    q.requires_grad_()
    with caplog.at_level(logging.WARNING, logger="sft.ops.rope"):
        for _ in range(2):
            out = fused(q, k, cos, sin)
    want = ORIGINAL(q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(out, want))
    warnings = [r for r in caplog.records if "model.fused_rope" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler found" in warnings[0].getMessage()
