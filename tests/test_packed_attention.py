"""Packed documents stay isolated (issue #7): per-sample loss with packing, the per-document attention (sft_varlen)
= the block-diagonal mask, its backward and its bf16 path."""

import copy

import pytest
import torch
import torch.nn.functional as F

from sft.config import ModelConfig, QuantizationConfig
from sft.data.packing import pack_examples
from sft.models import build_random, resolve_attention, set_base_dropout
from sft.patches.transformers import install_chunked_loss


@pytest.mark.parametrize("arch,attn,train", [("tiny-llama", "sdpa", False), ("tiny-llama", "sft_varlen", True),
                                             ("tiny-opt", "sft_varlen", True)])
def test_packed_documents_are_isolated_per_sample_loss(arch, attn, train):
    """A document's loss inside a packed block equals its loss alone: Llama-style models through transformers'
    block-diagonal SDPA mask (built from the per-document position ids), and any supported model through
    sft_varlen while training (OPT's own mask ignores position ids)."""
    model = build_random(arch, 0)
    set_base_dropout(model, 0.0)
    model.set_attn_implementation(resolve_attention(attn))
    model.train(train)
    install_chunked_loss(model)
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (11, 17, 9)]
    eos = 2
    (block,) = list(pack_examples([(d, d) for d in docs], seq_length=40, eos_token_id=eos))
    ids, labels, pos = (torch.tensor(block[k])[None] for k in ("input_ids", "labels", "position_ids"))
    start = 0
    with torch.no_grad():
        for d in docs:
            n = len(d) + 1  # the document and its EOS
            alone = torch.tensor(d + [eos])[None]
            solo = model(input_ids=alone, labels=alone, position_ids=torch.arange(n)[None]).loss
            only = torch.full_like(labels, -100)
            # the document's own next-token targets (its first token is predicted by nothing inside it)
            only[0, start + 1:start + n] = labels[0, start + 1:start + n]
            packed = model(input_ids=ids, labels=only, position_ids=pos).loss
            assert torch.allclose(packed, solo, atol=1e-5), (start, packed.item(), solo.item())
            start += n


def test_varlen_attention_equals_the_block_diagonal_mask():
    """sft_varlen (one causal SDPA per document) = transformers' SDPA with the block-diagonal mask, in values and
    gradients, on a Llama-style model with grouped-query attention; rows with one document and rows with several."""
    ref = build_random("tiny-llama", 0)
    set_base_dropout(ref, 0.0)
    ref.train()
    fast = copy.deepcopy(ref)
    fast.set_attn_implementation(resolve_attention("sft_varlen"))
    pos = torch.stack([torch.cat([torch.arange(n) for n in (7, 20, 5, 32)]), torch.arange(64)])
    ids = torch.randint(3, 250, (2, 64), generator=torch.Generator().manual_seed(5))
    a = ref(input_ids=ids, position_ids=pos, use_cache=False).logits
    b = fast(input_ids=ids, position_ids=pos, use_cache=False).logits
    assert torch.allclose(a, b, atol=1e-5)
    w = torch.randn_like(a)
    (a * w).sum().backward()
    (b * w).sum().backward()
    for (n, p), q in zip(ref.named_parameters(), fast.parameters()):
        # fp32 summation order differs (per-document kernels): compare against the gradient's own scale
        assert (p.grad - q.grad).abs().max() <= 1e-5 * p.grad.abs().max() + 1e-7, n
    fast.eval()  # outside training: transformers' own SDPA path (generation with padding and a cache)
    with torch.no_grad():
        assert torch.equal(fast(input_ids=ids, position_ids=pos, use_cache=False).logits,
                           ref.eval()(input_ids=ids, position_ids=pos, use_cache=False).logits)


def test_auto_attention_is_per_document_on_cpu_and_keeps_sdpa_for_llama_on_cuda():
    from sft.models import load_base_model

    q = QuantizationConfig()
    opt = load_base_model(ModelConfig(name="arch:tiny-opt", dtype="fp32"), q)
    llama = load_base_model(ModelConfig(name="arch:tiny-llama", dtype="fp32"), q)
    assert opt.config._attn_implementation == "sft_varlen"  # OPT's own mask ignores position ids, on every device
    assert llama.config._attn_implementation == ("sdpa" if torch.cuda.is_available() else "sft_varlen")


def test_varlen_attention_backward_is_one_concatenation_per_row():
    """The per-document split's backward must not be a slice per document: each slice's backward writes a zero
    tensor of the whole q/k/v and autograd adds them up (O(documents x block) work per layer; ~1.7 s of a 10.4 s
    OPT-125m step, 8 x 512, before the fix). With split, the graph has one split node per row and input."""
    from sft.ops.attention import varlen_sdpa_forward

    class _Attn(torch.nn.Module):
        is_causal = True

    mod = _Attn().train()
    q, k, v = (torch.randn(2, 4, 64, 8, requires_grad=True) for _ in range(3))
    pos = torch.cat([torch.arange(n) for n in (7, 20, 5, 32)])[None].expand(2, -1)
    out, _ = varlen_sdpa_forward(mod, q, k, v, None, position_ids=pos)
    assert out.shape == (2, 64, 4, 8) and out.is_contiguous()
    names, seen, todo = [], set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        todo += [f for f, _ in fn.next_functions]
    assert not [n for n in names if n.startswith("SliceBackward")], names
    ref = torch.cat([F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True)
                     for s, e in [(0, 7), (7, 27), (27, 32), (32, 64)]], dim=2).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize("upcast", ["1", "0"])
def test_varlen_attention_in_bf16_upcast_or_not(monkeypatch, upcast):
    """bf16 inputs: with SFT_ATTENTION_FP32=1 the documents' attention runs in fp32 and the bf16 output is the fp32
    result rounded once; with 0 it runs in bf16. Both return bf16 and stay within bf16 rounding of the fp32 answer,
    and gradients flow back to the bf16 inputs in bf16."""
    from sft.ops.attention import UPCAST_ENV, upcast_on_cpu, varlen_sdpa_forward

    monkeypatch.setenv(UPCAST_ENV, upcast)
    assert upcast_on_cpu(torch.bfloat16) is (upcast == "1") and not upcast_on_cpu(torch.float32)

    class _Attn(torch.nn.Module):
        is_causal = True

    g = torch.Generator().manual_seed(0)
    q32, k32, v32 = (torch.randn(2, 4, 48, 16, generator=g) for _ in range(3))
    pos = torch.cat([torch.arange(n) for n in (20, 28)])[None].expand(2, -1)
    ref, _ = varlen_sdpa_forward(_Attn().train(), q32, k32, v32, None, position_ids=pos)
    q, k, v = (t.bfloat16().requires_grad_() for t in (q32, k32, v32))
    out, _ = varlen_sdpa_forward(_Attn().train(), q, k, v, None, position_ids=pos)
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref).abs().max().item()
    assert err <= (0.02 if upcast == "1" else 0.05), err
    if upcast == "1":  # one rounding of the fp32 result of the (rounded) inputs
        exact, _ = varlen_sdpa_forward(_Attn().train(), q.detach().float(), k.detach().float(), v.detach().float(),
                                       None, position_ids=pos)
        assert torch.equal(out, exact.bfloat16())
    out.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()


def _saved_bytes(fn) -> tuple[int, set]:
    """Bytes of the distinct storages autograd keeps for the backward of ``fn()``, those in fp32, and the output."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    fp32 = sum(n for n, dtype in storages.values() if dtype == torch.float32)
    return sum(n for n, _ in storages.values()), fp32, out


def test_bf16_attention_computed_in_fp32_keeps_bf16_inputs_for_its_backward(monkeypatch):
    """Without AMX, bf16 attention is computed in fp32 (SFT_ATTENTION_FP32=1, auto's choice there). Its backward
    keeps the bf16 q, k, v (k and v with their own kv heads, not expanded to the query heads) and the bf16 output,
    not fp32 copies: on SmolLM2's shapes (9 query heads, 3 kv heads) that is 3.1x less memory a layer, which
    ``gradient_checkpointing: auto`` spends on keeping layers instead of recomputing them. The gradients stay as
    close to fp64 as the kernel's own fp32 backward's."""
    from sft.ops.attention import MATH_BACKWARD_ATTR, UPCAST_ENV, varlen_sdpa_forward

    monkeypatch.setenv(UPCAST_ENV, "1")

    class _Attn(torch.nn.Module):
        is_causal = True

    g = torch.Generator().manual_seed(0)
    B, L, D = 2, 96, 16
    q64 = torch.randn(B, 9, L, D, generator=g, dtype=torch.float64)
    k64, v64 = (torch.randn(B, 3, L, D, generator=g, dtype=torch.float64) for _ in range(2))
    pos = torch.cat([torch.arange(n) for n in (30, 50, 16)])[None].expand(B, -1)
    q, k, v = (t.bfloat16().requires_grad_() for t in (q64, k64, v64))
    mod = _Attn().train()
    setattr(mod, MATH_BACKWARD_ATTR, True)  # what model.fast_attention_backward (the default) installs
    nbytes, fp32, out = _saved_bytes(lambda: varlen_sdpa_forward(mod, q, k, v, None, position_ids=pos)[0])
    bf16_inputs = 2 * (q.numel() + k.numel() + v.numel() + q.numel())  # q, k, v and the output, in bf16
    lse = 4 * B * 9 * L  # the log-sum-exp, one float a query row: the only thing kept in fp32
    assert fp32 <= lse and nbytes <= bf16_inputs + lse, (nbytes, fp32, bf16_inputs)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(grad.bfloat16())
    # fp64 reference on the same bf16-rounded inputs
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    spans = [(0, 30), (30, 80), (80, 96)]
    ks, vs = (t.repeat_interleave(3, 1) for t in ref_in[1:])
    ref = torch.cat([F.scaled_dot_product_attention(ref_in[0][:, :, s:e], ks[:, :, s:e], vs[:, :, s:e],
                                                    is_causal=True) for s, e in spans], 2).transpose(1, 2)
    assert (out.double() - ref).abs().max() < 0.02
    ref.backward(grad)
    for got, want in zip((q.grad, k.grad, v.grad), ref_in):
        assert got.dtype == torch.bfloat16
        rel = ((got.double() - want.grad).abs().max() / want.grad.abs().max()).item()
        assert rel < 1e-2, rel


def test_a_bf16_llama_trains_through_the_lean_fp32_attention(monkeypatch):
    """Training a bf16 Llama-style model (grouped-query attention) with sft_varlen, SFT_ATTENTION_FP32=1 and
    model.fast_attention_backward runs every layer's attention through the lean fp32 path, with the loss of the
    fp32 model to bf16 rounding and finite gradients for every parameter that trains; without the key, none."""
    from sft.ops.attention import UPCAST_ENV, lean_runs
    from sft.patches.transformers import use_math_backward

    monkeypatch.setenv(UPCAST_ENV, "1")
    model = build_random("tiny-llama", 0)
    set_base_dropout(model, 0.0)
    model.set_attn_implementation(resolve_attention("sft_varlen"))
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    ref = copy.deepcopy(model).train()
    plain = copy.deepcopy(model).bfloat16().train()
    model = model.bfloat16().train()
    assert use_math_backward(model) == model.config.num_hidden_layers
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 250, (2, 48), generator=g)
    pos = torch.cat([torch.arange(n) for n in (20, 28)])[None].expand(2, -1)
    before = lean_runs()
    loss = model(input_ids=ids, labels=ids, position_ids=pos).loss
    loss.backward()
    assert lean_runs() - before == model.config.num_hidden_layers
    plain(input_ids=ids, labels=ids, position_ids=pos).loss.backward()
    assert lean_runs() - before == model.config.num_hidden_layers  # not marked: PyTorch's kernel on fp32 copies
    want = ref(input_ids=ids, labels=ids, position_ids=pos).loss
    assert abs(loss.item() - want.item()) < 0.05, (loss.item(), want.item())
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(gr is not None and torch.isfinite(gr.float()).all() for gr in grads)
