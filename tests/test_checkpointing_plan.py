"""Activation checkpointing decided from memory (issue #7): auto spends what the chunked loss saves, says when free
memory caps it, resolves on the model, and selective checkpointing keeps the gradients."""

import pytest
import torch

from sft.config import LoraSection, ModelConfig, QuantizationConfig
from sft.metrics import checkpointing_fraction
from sft.models import (
    add_lora,
    apply_checkpointing,
    arch_config,
    build_random,
    choose_checkpointing,
    layer_activation_bytes,
    load_model_and_tokenizer,
    logits_bytes,
)


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


def test_checkpointing_auto_keeps_every_smollm2_layer_with_the_lean_fp32_attention():
    """Measured 2026-12-07 on the 2-core AMD EPYC (avx512_bf16, no AMX; `sft bench`, bf16-mixed, 8 x 512 tokens,
    LoRA r16 q/v, tcmalloc, the lean fp32 attention): peak RSS with every SmolLM2 layer recomputed / none / the
    seed recipe 1.76 / 3.29 / 4.07 GiB: 0.051 GiB a layer, and all 30 layers fit under the seed with 0.78 GiB to
    spare. There ``auto`` keeps every layer; on the heavier layers (no lean attention) it keeps what it kept."""
    from transformers import LlamaConfig

    smol = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    tokens, plenty = 8 * 512, 64 * 2**30
    kw = dict(available=plenty, fused_norm=True, fused_mlp=True, live_memory=True)
    lean = choose_checkpointing(smol, tokens, "bf16-mixed", lean_attention=True, **kw)
    heavy = choose_checkpointing(smol, tokens, "bf16-mixed", **kw)
    assert lean == 30 and heavy < 30, (lean, heavy)
    assert 1.76 + lean * 0.051 <= 4.07
    assert layer_activation_bytes(smol, tokens, "bf16-mixed", fused_norm=True, fused_mlp=True,
                                  lean_attention=True) >= 0.051 * 2**30  # the estimate never undercounts
    # nothing changes for QLoRA or for layers without the fused norm (not measured with the lean attention)
    assert choose_checkpointing(smol, tokens, "bf16-mixed", "nf4", lean_attention=True, **kw) == \
        choose_checkpointing(smol, tokens, "bf16-mixed", "nf4", **kw)
