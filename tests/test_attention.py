"""The per-document attention's bf16 CPU backward (sft/ops/attention.py, model.fast_attention_backward): the
gradients of PyTorch's flash kernel to bf16 rounding, as close to the exact (fp64) gradients as the kernel's own,
installed by sft on both model families, and out of the way where it does not apply."""

import copy

import pytest
import torch
import torch.nn.functional as F

from sft.config import LoraSection, ModelConfig, QuantizationConfig
from sft.models import build_random, load_model_and_tokenizer, resolve_attention, set_base_dropout
from sft.ops.attention import MATH_BACKWARD_ATTR, _CausalFlashMathBackward, varlen_sdpa_forward
from sft.patches.transformers import use_math_backward


class _Attn(torch.nn.Module):
    is_causal = True


def _docs(lengths, heads=4, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(heads, n, dim, generator=g) for _ in range(3)) for n in lengths]


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("lengths", [[1, 17, 64, 130], [256]])
def test_math_backward_matches_the_exact_gradients_as_well_as_the_flash_kernel(lengths):
    """One document at a time, bf16: the forward is the flash kernel's, bit for bit, and every gradient is within
    bf16 rounding of the fp64 gradient, no worse than 1.5x the flash backward's own error (a wrong softmax term,
    mask or scale is off by O(1))."""
    for q32, k32, v32 in _docs(lengths):
        scale = 0.3  # not 1/sqrt(d): the scale must reach every gradient
        grad = torch.randn_like(q32)
        exact = [t.double().requires_grad_() for t in (q32, k32, v32)]
        F.scaled_dot_product_attention(*(t[None] for t in exact), is_causal=True, scale=scale)[0].backward(
            grad.double())
        flash = [t.bfloat16().requires_grad_() for t in (q32, k32, v32)]
        ref = F.scaled_dot_product_attention(*(t[None] for t in flash), is_causal=True, scale=scale)[0]
        ref.backward(grad.bfloat16())
        ours = [t.bfloat16().requires_grad_() for t in (q32, k32, v32)]
        out = _CausalFlashMathBackward.apply(*ours, scale)
        out.backward(grad.bfloat16())
        assert torch.equal(out, ref)
        # relative to the larger of the gradient and dV: a one-token document's exact dQ and dK are 0
        norm = [max(e.grad.norm().item(), exact[2].grad.norm().item()) for e in exact]
        for name, a, f, e, n in zip("qkv", ours, flash, exact, norm):
            assert a.grad.dtype == torch.bfloat16 and a.grad.shape == a.shape
            err = (a.grad.double() - e.grad).norm().item() / n
            kernel = (f.grad.double() - e.grad).norm().item() / n
            assert err <= max(1.5 * kernel, 4e-3), (name, len(q32[0]), err, kernel)


def _pair_bf16(arch: str):
    ref = build_random(arch, 0)
    set_base_dropout(ref, 0.0)
    ref.set_attn_implementation(resolve_attention("sft_varlen"))
    ref = ref.to(torch.bfloat16).train()
    fast = copy.deepcopy(ref)
    assert use_math_backward(fast) == ref.config.num_hidden_layers
    return ref, fast


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-opt"])
def test_a_bf16_model_trains_to_the_same_gradients_with_either_backward(arch):
    """Whole model, packed rows with several documents, bf16 weights: the same loss (the forward is shared) and
    every parameter's gradient within bf16 rounding of the flash backward's."""
    ref, fast = _pair_bf16(arch)
    pos = torch.stack([torch.cat([torch.arange(n) for n in (7, 20, 5, 32)]), torch.arange(64)])
    ids = torch.randint(3, 250, (2, 64), generator=torch.Generator().manual_seed(5))
    losses = []
    for m in (ref, fast):
        loss = m(input_ids=ids, position_ids=pos, labels=ids, use_cache=False).loss
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(*losses)
    compared = 0
    for (n, p), q in zip(ref.named_parameters(), fast.parameters()):
        if p.grad is None:
            continue
        compared += 1
        if n.endswith("k_proj.bias"):  # exactly 0 in exact arithmetic (a bias on every key of a row shifts its
            continue                   # scores by one constant, which softmax ignores): both are rounding noise
        assert _rel(q.grad, p.grad) <= 0.03, (n, _rel(q.grad, p.grad))
    assert compared == sum(1 for _ in ref.parameters())


def test_sft_installs_it_and_the_switch_turns_it_off():
    q = QuantizationConfig()
    for flag in (True, False):
        cfg = ModelConfig(name="arch:tiny-llama", dtype="bf16-mixed", fast_attention_backward=flag)
        model, _, _ = load_model_and_tokenizer(cfg, LoraSection(r=4), q, tokens_per_micro_batch=64)
        marked = [m for m in model.modules() if getattr(m, MATH_BACKWARD_ATTR, False)]
        assert len(marked) == (model.config.num_hidden_layers if flag else 0)


def test_it_stays_out_of_fp32_no_grad_and_dropout(monkeypatch):
    """fp32 inputs, forwards without gradients, and attention dropout keep PyTorch's SDPA (no custom node).

    bf16 stays bf16 here whatever the CPU (SFT_ATTENTION_FP32=0): without AMX, ``auto`` computes bf16 attention in
    fp32, which is the fp32 case (this test failed on a CPU without AMX before the variable was pinned)."""
    from sft.ops.attention import UPCAST_ENV

    monkeypatch.setenv(UPCAST_ENV, "0")
    mod = _Attn().train()
    setattr(mod, MATH_BACKWARD_ATTR, True)
    pos = torch.cat([torch.arange(n) for n in (9, 23)])[None].expand(2, -1)

    def nodes(out):
        seen, todo = set(), [out.grad_fn]
        while todo:
            fn = todo.pop()
            if fn is not None and fn not in seen:
                seen.add(fn)
                todo += [f for f, _ in fn.next_functions]
        return {type(fn).__name__ for fn in seen}

    def run(dtype, grad=True, dropout=0.0):
        q, k, v = (torch.randn(2, 4, 32, 16, dtype=dtype, requires_grad=grad) for _ in range(3))
        return varlen_sdpa_forward(mod, q, k, v, None, dropout=dropout, position_ids=pos)[0]

    assert "_CausalFlashMathBackwardBackward" in nodes(run(torch.bfloat16))
    assert "_CausalFlashMathBackwardBackward" not in nodes(run(torch.float32))
    assert "_CausalFlashMathBackwardBackward" not in nodes(run(torch.bfloat16, dropout=0.1))
    assert run(torch.bfloat16, grad=False).grad_fn is None
    monkeypatch.setenv(UPCAST_ENV, "1")  # bf16 inputs computed in fp32 (auto's choice without AMX): SDPA
    assert "_CausalFlashMathBackwardBackward" not in nodes(run(torch.bfloat16))
