"""Chunked loss (issue #7) = the model's own loss: values and gradients, with and without grad, under autocast,
and in bf16 as exact as the plain bf16 path."""

import copy

import pytest
import torch

from sft.models import build_random
from sft.ops.loss import chunked_causal_lm_loss
from sft.patches.transformers import install_chunked_loss


def _pair(arch: str):
    model = build_random(arch, 0)
    model.eval()  # no dropout: the two copies must see identical forwards
    fast = copy.deepcopy(model)
    assert install_chunked_loss(fast, chunk=7)  # a chunk that does not divide the row count
    return model, fast


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-opt"])
@pytest.mark.parametrize("num_items", [None, 57])
def test_chunked_loss_equals_the_models_loss_and_gradients(arch, num_items):
    model, fast = _pair(arch)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 250, (3, 41), generator=g)
    labels = ids.clone()
    labels[0, :15] = -100  # a masked prompt
    labels[2, 30:] = -100
    nib = None if num_items is None else torch.tensor(num_items)
    ref = model(input_ids=ids, labels=labels, num_items_in_batch=nib, use_cache=False).loss
    got = fast(input_ids=ids, labels=labels, num_items_in_batch=nib)
    assert got.logits is None  # never materialised
    assert torch.allclose(got.loss, ref, rtol=1e-6, atol=1e-6), (got.loss.item(), ref.item())
    ref.backward()
    got.loss.backward()
    gr, gf = _grads(model), _grads(fast)
    assert gr.keys() == gf.keys() and len(gr) > 10  # every parameter, lm_head / embedding included
    for name in gr:
        assert torch.allclose(gf[name], gr[name], rtol=1e-4, atol=1e-6), name


def test_lm_head_chunk_rows_are_a_multiple_of_64_within_the_budget():
    from sft.ops.loss import default_chunk

    assert default_chunk(50272, 4) == 1024 and default_chunk(50272, 2) == 768  # the measured best rows
    for vocab in (152_064, 256_000):  # large vocabularies: fewer rows, one chunk of logits within 256 MiB
        rows = default_chunk(vocab, 4)
        assert rows % 64 == 0 and 64 <= rows < 1024 and rows * vocab * 4 <= 256 * 2**20
    assert default_chunk(10**8, 4) == 64


def test_chunked_loss_without_grad_and_under_autocast():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=True)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 300, (2, 9))
    logits = head(hidden)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 300).float(), labels[:, 1:].reshape(-1))
    with torch.no_grad():
        assert torch.allclose(chunked_causal_lm_loss(hidden, head, labels, chunk=5), ref, atol=1e-6)
    # the bias and weight train here (e.g. lm_head in modules_to_save): their gradients come out too
    loss = chunked_causal_lm_loss(hidden, head, labels, chunk=4)
    loss.backward()
    gw, gb, gh = head.weight.grad.clone(), head.bias.grad.clone(), hidden.grad.clone()
    head.zero_grad(), hidden.grad.zero_()
    ref.backward()
    assert torch.allclose(gw, head.weight.grad, atol=1e-6) and torch.allclose(gb, head.bias.grad, atol=1e-6)
    assert torch.allclose(gh, hidden.grad, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf = chunked_causal_lm_loss(hidden, head, labels, chunk=4)
    assert abs(bf.item() - ref.item()) < 0.05 * ref.item()  # bf16 logits, fp32 softmax: close, not equal
    # a micro-batch without a single label: zero loss, graph still connected
    none = chunked_causal_lm_loss(hidden, head, torch.full_like(labels, -100))
    none.backward()
    assert none.item() == 0.0


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("chunk", [None, 37])
def test_chunked_loss_in_bf16_is_as_exact_as_the_plain_bf16_path(chunk):
    """Under bf16 autocast the plain path rounds the lm_head output (logits) to bf16 and computes the loss in fp32;
    the chunked loss does the same GEMM per chunk, then fp32 softmax per row block, and rounds scale*(softmax -
    onehot) to bf16 for the gradient GEMM. Against an fp64 truth its loss and hidden-state gradient must be within
    2x the plain bf16 path's own error (plus 1 bf16 ulp, 2^-8, of slack): a lever that dropped a term, used fp32
    where bf16 is claimed or misplaced a row would be off by far more."""
    torch.manual_seed(0)
    vocab, d = 3001, 64
    head = torch.nn.Linear(d, vocab, bias=False).to(torch.bfloat16)
    head.weight.data.mul_(4.0)  # logits of a few units, like a trained model's
    hidden = torch.randn(3, 83, d, requires_grad=True)
    labels = torch.randint(0, vocab, (3, 83))
    labels[1, :20] = -100
    keep = labels[:, 1:].reshape(-1) != -100
    h64 = hidden.detach().double()[:, :-1].reshape(-1, d)[keep].requires_grad_()
    true = torch.nn.functional.cross_entropy(h64 @ head.weight.double().t(), labels[:, 1:].reshape(-1)[keep])
    true.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = torch.nn.functional.cross_entropy(head(hidden)[:, :-1].reshape(-1, vocab).float(),
                                                  labels[:, 1:].reshape(-1))
    (g_plain,) = torch.autograd.grad(plain, hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = chunked_causal_lm_loss(hidden, head, labels, chunk=chunk)
    (g_fast,) = torch.autograd.grad(fast, hidden)
    ulp = 2.0 ** -8
    assert abs(fast.item() - true.item()) <= 2 * abs(plain.item() - true.item()) + ulp * abs(true.item())
    g_true = torch.zeros_like(hidden, dtype=torch.float64)[:, :-1].reshape(-1, d)
    g_true[keep] = h64.grad
    flat = lambda g: g[:, :-1].reshape(-1, d)
    e_plain, e_fast = _rel(flat(g_plain), g_true), _rel(flat(g_fast), g_true)
    assert e_fast <= 2 * e_plain + ulp, (e_fast, e_plain)
    assert g_fast[:, -1].abs().max() == 0  # the last position predicts nothing
