"""The speed-ups of issue #7 keep the learning behaviour: chunked loss = the model's own loss (values and
gradients), base dropout really off, checkpointing decided from memory, packed documents isolated, and a short
training run takes the same losses with and without the fast path."""

import copy

import pytest
import torch
import torch.nn.functional as F

from sft.config import LoraSection, ModelConfig, QuantizationConfig
from sft.data.packing import pack_examples
from sft.ops.loss import chunked_causal_lm_loss
from sft.patches.transformers import install_chunked_loss
from sft.metrics import checkpointing_fraction
from sft.models import (add_lora, resolve_attention, apply_checkpointing, arch_config, build_random, choose_checkpointing, layer_activation_bytes,
                        load_model_and_tokenizer, logits_bytes, set_base_dropout)


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


def test_base_dropout_zero_makes_training_forwards_deterministic():
    ids = torch.randint(3, 250, (2, 32))
    model = build_random("tiny-opt", 0)  # OPT's config: dropout 0.1
    model.train()
    a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert not torch.equal(a, b)  # dropout is on
    assert set_base_dropout(model, 0.0) > 0
    a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(a, b)
    assert model.config.dropout == 0.0


def test_checkpointing_auto_spends_what_the_chunked_loss_saves():
    cfg = arch_config("opt-125m")
    tokens = 8 * 512
    need = cfg.num_hidden_layers * layer_activation_bytes(cfg, tokens, "fp32")
    assert 1.5 * 2**30 < need < 2.5 * 2**30  # OPT-125m, 4096 tokens, fp32: measured 1.6 GiB
    assert cfg.num_hidden_layers * layer_activation_bytes(cfg, tokens, "bf16-mixed") < need
    assert logits_bytes(cfg, tokens, "fp32") == int(2.75 * tokens * 50272 * 4)
    assert logits_bytes(cfg, tokens, "bf16-mixed") == 2 * tokens * 50272 * 4
    layers = cfg.num_hidden_layers
    # plenty of memory: the 2.26 GB the plain loss would hold in fp32 keep all 12 layers' activations (the old
    # estimate, 2 x the logits, kept 10 and recomputed two)
    assert choose_checkpointing(cfg, tokens, "fp32", available=64 * 2**30) == layers
    assert choose_checkpointing(cfg, tokens, "bf16-mixed", available=64 * 2**30) == layers
    # a quarter of 4 GiB: some layers only
    per_layer = layer_activation_bytes(cfg, tokens, "fp32")
    assert choose_checkpointing(cfg, tokens, "fp32", available=4 * 2**30) == 2**30 // per_layer < layers
    assert choose_checkpointing(cfg, tokens, "fp32", available=0) == 0  # unknown memory: recompute everything
    assert choose_checkpointing(cfg, tokens, "fp32", chunked_loss=False, available=64 * 2**30) == 0


def test_checkpointing_auto_says_when_free_memory_caps_it(caplog):
    """A machine short of free memory keeps fewer layers, so the same run is slower there: auto warns, naming the
    memory it saw and the layers it would have kept."""
    cfg, tokens = arch_config("opt-125m"), 8 * 512
    with caplog.at_level("WARNING", logger="sft.models.memory"):
        assert choose_checkpointing(cfg, tokens, "fp32", available=64 * 2**30) == 12
        assert not caplog.records
        keep = choose_checkpointing(cfg, tokens, "fp32", available=4 * 2**30)
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "4.00 GiB of memory is available" in msg and f"{keep} layers keep their activations instead of 12" in msg


def test_checkpointing_auto_in_fp32_stays_under_the_plain_loss_path():
    """Measured 2026-12-06 on the 2-core AMD EPYC (`sft bench --set dtype=fp32`, 8 x 512 tokens, LoRA r16 q/v,
    1 repeat): peak RSS with every layer recomputed / none / the model's own loss with every layer recomputed /
    the seed recipe: OPT-125m 1.58 / 3.08 / 3.71 / 4.93 GiB (0.125 GiB a layer kept; the chunked loss saves
    2.13 GiB), SmolLM2-135M 1.72 / 5.75 / - / 5.13 GiB (0.134 GiB a layer). ``auto`` spends at most what the
    chunked loss saves: every OPT layer, and more SmolLM2 layers than the old estimate's 10, within 2.13 GiB
    (scaled to SmolLM2's vocabulary) and under the seed's RSS."""
    from transformers import LlamaConfig

    smol = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    tokens, plenty = 8 * 512, 64 * 2**30
    keep = choose_checkpointing(smol, tokens, "fp32", available=plenty)
    assert 10 < keep < 30 and keep * 0.134 <= 2.13 * 49152 / 50272, keep
    assert 1.72 + keep * 0.134 <= 5.13
    assert choose_checkpointing(arch_config("opt-125m"), tokens, "fp32", available=plenty) == 12


def test_checkpointing_auto_under_bf16_fits_the_memory_the_seed_recipe_used():
    """Measured 2026-12-03 on the 2-core AMX Xeon (`sft bench`, bf16-mixed, 8 x 512 tokens, LoRA r16 q/v, 1 repeat):
    peak RSS with every layer recomputed / none / the seed recipe: SmolLM2-135M 2.52 / 6.22 / 3.97 GiB (30
    layers: 0.123 GiB a layer kept, 1.45 GiB of headroom under the seed), OPT-125m 1.69 / 3.06 / 3.88 GiB (12
    layers: 0.111 GiB a layer, 2.19 GiB of headroom). ``auto`` must keep no more layers than that headroom holds
    (the old bf16 estimate kept 16 SmolLM2 layers, 1.97 GiB: 1.19x the seed's RSS), and still all 12 of OPT's."""
    from transformers import LlamaConfig

    smol = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    tokens, plenty = 8 * 512, 64 * 2**30
    keep = choose_checkpointing(smol, tokens, "bf16-mixed", available=plenty)
    assert 0 < keep and keep * 0.123 <= 1.45, keep
    assert choose_checkpointing(arch_config("opt-125m"), tokens, "bf16-mixed", available=plenty) == 12
    # with the fused RMSNorm (measured on cbeb1db, tcmalloc): all-ckpt 2.09, no-ckpt 4.07, seed 3.79 GiB, i.e.
    # 0.066 GiB a layer and 1.70 GiB of headroom: more layers kept than without it, still inside the headroom
    fused = choose_checkpointing(smol, tokens, "bf16-mixed", available=plenty, fused_norm=True)
    assert keep < fused < 30 and fused * 0.066 <= 1.70, (keep, fused)
    # and with the fused SwiGLU product (measured on the 2-core EPYC, commit 8f4b289: all-ckpt 1.97, no-ckpt 3.67
    # GiB, 0.057 GiB a layer): more layers again, still inside the seed's headroom
    both = choose_checkpointing(smol, tokens, "bf16-mixed", available=plenty, fused_norm=True, fused_mlp=True)
    assert fused < both < 30 and both * 0.057 <= 1.70, (fused, both)
    assert choose_checkpointing(arch_config("opt-125m"), tokens, "bf16-mixed", available=plenty,
                                fused_norm=True) == 12  # OPT has no RMSNorm: its estimate is unchanged


def test_auto_resolves_on_the_model_not_in_the_config():
    lora = LoraSection(r=4, target_modules=["q_proj", "v_proj"])
    mc = ModelConfig(name="arch:tiny-llama", dtype="fp32", gradient_checkpointing="auto")
    model, _, _ = load_model_and_tokenizer(mc, lora, QuantizationConfig(), tokens_per_micro_batch=256)
    # a 49k vocabulary over 256 tokens frees far more than two tiny layers keep
    assert checkpointing_fraction(model) == 0.0 and model.sft_checkpointing is False
    assert mc.gradient_checkpointing == "auto"  # resolved on the model; the caller's config is never changed
    mc = ModelConfig(name="arch:tiny-llama", dtype="fp32", gradient_checkpointing="auto")
    model, _, _ = load_model_and_tokenizer(mc, lora, QuantizationConfig())  # batch unknown: recompute
    assert checkpointing_fraction(model) == 1.0 and model.sft_checkpointing is True


@pytest.mark.parametrize("keep", [0, 1, 2])
def test_selective_checkpointing_gives_the_same_gradients(keep):
    lora = LoraSection(r=4, target_modules=["q_proj", "v_proj"], dropout=0.0)
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = add_lora(build_random("tiny-llama", 0), lora, gradient_checkpointing=ckpt)
        model.train()
        if ckpt:
            assert apply_checkpointing(model, keep) == 2 - keep
            assert checkpointing_fraction(model) == (2 - keep) / 2
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


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


@pytest.mark.slow
def test_fast_path_trains_like_the_plain_path(tmp_path):
    """Three optimizer steps through sft.recipe: chunked loss + no checkpointing vs the model's own loss +
    checkpointing (dropout 0 in both): the same losses."""
    from sft.config import load_config
    from sft.data.ingest import write_dataset
    from sft.recipe import train

    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{2 * i}.", "source": "test"} for i in range(64)]
    write_dataset(str(tmp_path / "ds"), rows, progress=False)
    histories = []
    for fast in (True, False):
        cfg = load_config(None, [
            "model.name=arch:tiny-llama", "model.dtype=fp32", f"model.chunked_loss={str(fast).lower()}",
            f"model.gradient_checkpointing={str(not fast).lower()}", "demo.generate=false",
            f"data.path={tmp_path / 'ds'}", "data.eval_path=null", "data.seq_length=64", "training.max_steps=3",
            "training.per_device_train_batch_size=2", "training.logging_steps=1", "demo.accuracy_samples=0",
            "training.eval_strategy=no", "training.save_strategy=no", "training.merge=false",
            "training.progress=false", "training.learning_rate=5e-3", "training.warmup_steps=0",
            f"training.output_dir={tmp_path / ('fast' if fast else 'plain')}", "lora.dropout=0.0",
        ])
        histories.append(train(cfg).loss_history)
    fast_h, plain_h = histories
    assert len(fast_h) == len(plain_h) == 3
    for a, b in zip(fast_h, plain_h):
        assert abs(a - b) <= 1e-4 * abs(b), (fast_h, plain_h)
    assert fast_h[-1] < fast_h[0]


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


def _compiled_without_recompiles(model, first: dict, later: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(eager loss, compiled loss) of ``first`` (the same dropout draws for both), after which every batch of
    ``later`` must run forward and backward through ``torch.compile(model)`` without a recompilation: dynamo's own
    check (error_on_recompile) raises on any. The eager backend keeps it fast (recompiles happen in dynamo)."""
    import torch._dynamo as dynamo

    compiled = torch.compile(model, backend="eager")
    dynamo.reset()
    try:
        torch.manual_seed(11)
        eager = model(**first).loss
        torch.manual_seed(11)
        out = compiled(**first)
        out.loss.backward()
        with dynamo.config.patch(error_on_recompile=True):
            for b in later:
                nxt = compiled(**b)
                nxt.loss.backward()
                assert torch.isfinite(nxt.loss)
    finally:
        dynamo.reset()
    return eager, out.loss


def test_compiled_model_does_not_recompile_for_a_new_packing_layout():
    """training.torch_compile with sft_varlen: a second batch whose documents have other lengths must reuse the
    compiled graphs. Before, the per-document split sizes became guards and every new layout recompiled (a 3-step
    OPT-125m bench cell spent 195-464 s per step recompiling). Dynamo's own recompile check (error_on_recompile)
    fails the test on any recompilation."""
    model = build_random("tiny-llama", 0)
    set_base_dropout(model, 0.0)
    model.set_attn_implementation(resolve_attention("sft_varlen"))
    model.train()
    install_chunked_loss(model)
    g = torch.Generator().manual_seed(5)

    def batch(lengths):
        docs = [torch.randint(3, 250, (n,), generator=g).tolist() for n in lengths]
        (block,) = list(pack_examples([(d, d) for d in docs], seq_length=48, eos_token_id=2))
        return {k: torch.tensor(block[k])[None] for k in ("input_ids", "labels", "position_ids")}

    # each layout fills the 48-token block exactly (documents + their EOS)
    eager, compiled = _compiled_without_recompiles(model, batch((11, 17, 17)),
                                                   [batch(n) for n in ((5, 30, 10), (20, 26), (47,))])
    assert torch.allclose(compiled, eager, atol=1e-5)


def test_compiled_model_with_lora_dropout_does_not_recompile_for_new_label_counts():
    """training.torch_compile on sft's default path (fused LoRA linear with the CPU dropout mask, chunked loss):
    batches whose prompts mask a different number of labels must reuse the compiled graphs. Before, the chunked
    loss's labelled-row count became a guard (one recompile per step: a 4-step OPT-125m bench cell was still
    compiling its second step after 10 minutes) and the mask's 64-bit draws broke the graph inside the LoRA
    function. Dynamo's error_on_recompile fails the test on any recompilation; the compiled loss must equal the
    eager one with the same dropout masks."""
    from peft import LoraConfig, get_peft_model

    from sft.patches.peft import install_fast_dropout, install_fused_lora

    model = build_random("tiny-llama", 0)
    set_base_dropout(model, 0.0)
    model.set_attn_implementation(resolve_attention("sft_varlen"))
    install_chunked_loss(model)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]))
    install_fast_dropout(model)
    assert install_fused_lora(model) > 0
    model.train()
    g = torch.Generator().manual_seed(7)

    def batch(prompts):
        docs = []
        for n in prompts:  # 16-token documents: the first n tokens are prompt (no label)
            ids = torch.randint(3, 250, (15,), generator=g).tolist()
            docs.append((ids, [-100] * n + ids[n:]))
        (block,) = list(pack_examples(docs, seq_length=48, eos_token_id=2))
        return {k: torch.tensor(block[k])[None] for k in ("input_ids", "labels", "position_ids")}

    eager, compiled = _compiled_without_recompiles(model, batch((3, 5, 9)),
                                                   [batch(n) for n in ((1, 2, 3), (10, 0, 4), (14, 14, 6))])
    assert torch.allclose(compiled, eager, atol=1e-5)
