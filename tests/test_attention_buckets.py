"""Length-bucketed per-document attention (sft/ops/attention.py, model.attention_bucket): documents padded to a
multiple of the bucket and attended in batched causal calls give the exact per-document attention (outputs and
gradients, fp32 and bf16, grouped-query heads, buckets split by the score budget), in a whole model too; sft sets it
from the config."""

import copy

import pytest
import torch
import torch.nn.functional as F

import sft.ops.attention as attention
from sft.config import LoraSection, ModelConfig, QuantizationConfig
from sft.models import build_random, load_model_and_tokenizer, resolve_attention, set_base_dropout
from sft.ops.attention import BUCKET_ATTR, MATH_BACKWARD_ATTR, use_buckets, varlen_sdpa_forward

LENGTHS = [[1, 31, 32, 33, 7], [64, 40], [96, 8]]  # rows of 104 tokens; 1 token, bucket edges, a whole row


class _Attn(torch.nn.Module):
    is_causal = True


def _positions(rows):
    L = max(sum(r) for r in rows)
    assert all(sum(r) == L for r in rows)
    return torch.stack([torch.cat([torch.arange(n) for n in r]) for r in rows]), L


def _exact(q, k, v, rows, g):
    """fp64 per-document reference: (B, L, H, D) output and the gradients of q, k, v."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    ke, ve = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = []
    for b, r in enumerate(rows):
        s, parts = 0, []
        for n in r:
            parts.append(F.scaled_dot_product_attention(q[b:b + 1, :, s:s + n], ke[b:b + 1, :, s:s + n],
                                                        ve[b:b + 1, :, s:s + n], is_causal=True)[0])
            s += n
        out.append(torch.cat(parts, 1).transpose(0, 1))
    out = torch.stack(out)
    out.backward(g.double())
    return out.detach(), q.grad, k.grad, v.grad


def _run(bucket, dtype, heads=4, kv_heads=2, math=False, seed=0):
    pos, L = _positions(LENGTHS)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(len(LENGTHS), h, L, 16, generator=gen).to(dtype).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    g = torch.randn(len(LENGTHS), L, heads, 16, generator=gen).to(dtype)
    mod = _Attn().train()
    setattr(mod, BUCKET_ATTR, bucket)
    setattr(mod, MATH_BACKWARD_ATTR, math)
    out, _ = varlen_sdpa_forward(mod, q, k, v, None, position_ids=pos)
    out.backward(g)
    return (out.detach(), q.grad, k.grad, v.grad), _exact(q, k, v, LENGTHS, g)


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("bucket", [0, 1, 16, 32, 256])
def test_fp32_is_the_exact_per_document_attention(bucket):
    got, exact = _run(bucket, torch.float32)
    assert got[0].shape == exact[0].shape and got[0].is_contiguous()
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, exact):
        assert _rel(a, e) < 1e-5, (name, bucket, _rel(a, e))


def test_a_bucket_split_by_the_score_budget_is_unchanged(monkeypatch):
    want, _ = _run(32, torch.float32)
    monkeypatch.setattr(attention, "SCORES_BUDGET", 1)  # one document per batched call
    got, _ = _run(32, torch.float32)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("math", [False, True])
def test_bf16_is_as_close_to_exact_as_one_call_per_document(math):
    """bf16 (flash kernel forward; its backward or sft's GEMM backward): batched within bf16 rounding of exact, no
    worse than 1.5x the per-document calls' own error."""
    got, exact = _run(32, torch.bfloat16, math=math)
    ref, _ = _run(0, torch.bfloat16, math=math)
    for name, a, r, e in zip(("out", "dq", "dk", "dv"), got, ref, exact):
        assert a.dtype == torch.bfloat16
        assert _rel(a, e) <= max(1.5 * _rel(r, e), 4e-3), (name, _rel(a, e), _rel(r, e))


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-opt"])
def test_a_model_gets_the_same_loss_and_gradients(arch):
    ref = build_random(arch, 0)
    set_base_dropout(ref, 0.0)
    ref.set_attn_implementation(resolve_attention("sft_varlen"))
    ref.train()
    bucketed = copy.deepcopy(ref)
    assert use_buckets(bucketed, 16) == ref.config.num_hidden_layers
    pos = torch.stack([torch.cat([torch.arange(n) for n in (7, 20, 5, 32)]), torch.arange(64)])
    ids = torch.randint(3, 250, (2, 64), generator=torch.Generator().manual_seed(5))
    losses = []
    for m in (ref, bucketed):
        loss = m(input_ids=ids, position_ids=pos, labels=ids, use_cache=False).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    for (n, p), q in zip(ref.named_parameters(), bucketed.parameters()):
        if p.grad is not None and not n.endswith("k_proj.bias"):  # k bias: exactly 0 up to rounding noise
            assert _rel(q.grad, p.grad) < 1e-4, n


def test_sft_sets_it_from_the_config():
    for bucket in (32, 0):
        cfg = ModelConfig(name="arch:tiny-llama", dtype="fp32", attention_bucket=bucket)
        model, _, _ = load_model_and_tokenizer(cfg, LoraSection(r=4), QuantizationConfig(), tokens_per_micro_batch=64)
        set_on = [getattr(m, BUCKET_ATTR) for m in model.modules() if hasattr(m, BUCKET_ATTR)]
        assert set_on == ([bucket] * model.config.num_hidden_layers if bucket else [])
