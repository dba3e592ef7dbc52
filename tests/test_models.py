"""Model sources, dtype policy and LoRA wiring."""

import time

import pytest
import torch

from sft.config import LoraSection, ModelConfig, QuantizationConfig
from sft.errors import ModelError
from sft.models import (
    ARCHITECTURES, add_lora, apply_dtype_policy, build_random, count_parameters, embedded_gguf, load_model_and_tokenizer,
    resolve_source,
)


def test_seed_recipe_parameter_count_on_meta_device():
    # OPT-1.3B with LoRA r=16 on q_proj/v_proj: the numbers the seed project printed.
    model = build_random("opt-1.3b", seed=0, device="meta")
    peft_model = add_lora(model, LoraSection(r=16, alpha=32, dropout=0.05, target_modules=["q_proj", "v_proj"]),
                          gradient_checkpointing=False)
    assert count_parameters(peft_model) == (3_145_728, 1_318_903_808)


@pytest.mark.parametrize("arch, params", [("opt-125m", 125_239_296), ("llama-1b", 1_235_814_400), ("llama-7b", 6_738_415_616)])
def test_published_architectures_have_published_sizes(arch, params):
    model = build_random(arch, seed=0, device="meta")
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-opt"])
def test_tiny_architectures_build_and_run(arch):
    model, tok, _ = load_model_and_tokenizer(ModelConfig(name=f"arch:{arch}", dtype="fp32"), LoraSection(),
                                             QuantizationConfig())
    ids = tok("Question: hi\n\nAnswer: yo", return_tensors="pt")["input_ids"]
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    trainable, total = count_parameters(model)
    assert 0 < trainable < total


def test_random_init_is_deterministic_per_seed():
    a, b, c = build_random("tiny-llama", 1), build_random("tiny-llama", 1), build_random("tiny-llama", 2)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_bf16_mixed_policy_keeps_1d_params_fp32():
    model = build_random("tiny-llama", 0)
    apply_dtype_policy(model, "bf16-mixed")
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.ndim == 1 else torch.bfloat16), name


def test_small_vocab_architecture_gets_a_tokenizer_that_fits():
    from sft.models import load_tokenizer

    tok = load_tokenizer(ModelConfig(name="arch:llama-7b"))
    assert len(tok) <= ARCHITECTURES["llama-7b"]["vocab_size"]
    ids = tok("héllo wörld")["input_ids"]
    assert tok.decode(ids) == "héllo wörld"


@pytest.mark.slow
def test_embedded_demo_gguf_loads_and_answers():
    folder, name = embedded_gguf("smollm2-135m-instruct")
    assert name.endswith(".gguf")
    model, tok, source = load_model_and_tokenizer(ModelConfig(dtype="fp32"), None, QuantizationConfig())
    assert source.kind == "gguf"
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert tok.chat_template
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_hub_id_without_network_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match="not in the local cache, and the hub cannot be reached.*arch:opt-1.3b"):
        resolve_source(ModelConfig(name="facebook/opt-1.3b"))
    assert time.perf_counter() - t0 < 10  # a hub look-up would hang ~50 s


@pytest.mark.parametrize("name, fragment", [
    ("arch:gpt-9", "unknown architecture 'gpt-9'"),
    ("/no/such/model.gguf", "GGUF file not found: /no/such/model.gguf"),
    ("./no/such/dir", "local path ./no/such/dir does not exist"),
    ("embedded:nope", "unknown embedded model 'nope'"),
])
def test_bad_model_names(name, fragment):
    with pytest.raises(ModelError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        resolve_source(ModelConfig(name=name))


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelError, match="without config.json"):
        resolve_source(ModelConfig(name=str(tmp_path)))
