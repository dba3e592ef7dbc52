"""QLoRA: NF4 + double quantization on CPU, k-bit preparation, quant-storage rules, and merging into a 4-bit base."""

import json
from pathlib import Path

import pytest
import torch

from sft.config import LoraSection, ModelConfig, QuantizationConfig
from sft.errors import ConfigError
from sft.models import (
    NF4_BLOCKSIZE, build_random, load_base_model, load_model_and_tokenizer, materialize_arch, nf4_roundtrip,
    quantized_weight_names, resolve_quant_storage,
)
from sft.models.quantization import bnb_config

bnb = pytest.importorskip("bitsandbytes")

NF4 = QuantizationConfig(mode="nf4")
IDS = torch.tensor([[1, 17, 300, 4000, 45000, 12, 99, 7], [5, 6, 7, 8, 9, 10, 11, 12]])


def test_bnb_config_is_nf4_double_quant_bf16():
    c = bnb_config(NF4)
    assert c.load_in_4bit and c.bnb_4bit_quant_type == "nf4" and c.bnb_4bit_use_double_quant
    assert c.bnb_4bit_compute_dtype == torch.bfloat16 and c.bnb_4bit_quant_storage == torch.uint8


@pytest.mark.parametrize("env", [
    {"ACCELERATE_USE_FSDP": "true"},
    {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
    {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "configs/deepspeed/zero3.json"},
])
def test_sharded_launch_needs_quant_storage_equal_to_compute_dtype(monkeypatch, env):
    root = Path(__file__).resolve().parent.parent
    for k, v in env.items():
        monkeypatch.setenv(k, str(root / v) if k.endswith("CONFIG_FILE") else v)
    assert resolve_quant_storage(NF4) == "bf16"  # unset: follows the compute dtype
    assert bnb_config(NF4).bnb_4bit_quant_storage == torch.bfloat16
    assert resolve_quant_storage(QuantizationConfig(mode="nf4", quant_storage="bf16")) == "bf16"
    with pytest.raises(ConfigError, match="quant_storage: uint8 under a .*quant_storage=bf16"):
        resolve_quant_storage(QuantizationConfig(mode="nf4", quant_storage="uint8"))


def test_zero2_and_plain_launches_keep_uint8_storage(monkeypatch, tmp_path):
    for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(k, raising=False)
    assert resolve_quant_storage(NF4) == "uint8"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert resolve_quant_storage(QuantizationConfig(mode="nf4", quant_storage="uint8")) == "uint8"


def test_arch_nf4_quantizes_the_same_weights_the_bf16_path_trains():
    """arch: + nf4 saves the random model to the cache and quantizes it while loading. Its weights must be the
    bf16 path's (fp32 init, then cast), and each 4-bit weight must dequantize to exactly nf4_roundtrip of that:
    the merge relies on reproducing it bit for bit."""
    from safetensors.torch import load_file

    reference = {k: v.to(torch.bfloat16) for k, v in build_random("tiny-llama", 0).state_dict().items()}
    saved = load_file(materialize_arch("tiny-llama", 0) / "model.safetensors")
    assert saved.keys() <= reference.keys()
    for k, v in saved.items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, reference[k]), k

    model = load_base_model(ModelConfig(name="arch:tiny-llama"), NF4, seed=0)
    four_bit = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert set(four_bit) == quantized_weight_names(model.config, NF4) and len(four_bit) == 14
    for name, m in four_bit.items():
        qs = m.weight.quant_state
        assert qs.quant_type == "nf4" and qs.nested and qs.blocksize == NF4_BLOCKSIZE  # NF4 + double quant
        assert m.compute_dtype == torch.bfloat16
        seen = bnb.functional.dequantize_4bit(m.weight.data, qs)
        assert torch.equal(seen, nf4_roundtrip(reference[name], NF4)), name
        assert not torch.equal(seen, reference[name])  # 4-bit really lost something
    for name, p in model.named_parameters():  # the rest is the bf16 path's weights as they are
        if name not in four_bit:
            assert torch.equal(p.data.to(torch.bfloat16), reference[name]), name


@pytest.mark.slow
def test_qlora_prepares_and_trains_on_cpu():
    model, tok, _ = load_model_and_tokenizer(
        ModelConfig(name="arch:tiny-llama"), LoraSection(r=8, alpha=16, dropout=0.0, target_modules=["all-linear"]), NF4
    )
    # prepare_model_for_kbit_training: non-quantized parameters in fp32, frozen; checkpointing on
    assert model.base_model.model.model.norm.weight.dtype == torch.float32
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert model.base_model.model.is_gradient_checkpointing
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.fixture(scope="module")
def nf4_adapter(tmp_path_factory) -> Path:
    from tests.helpers import make_adapter

    return make_adapter(tmp_path_factory.mktemp("nf4") / "adapter", ModelConfig(name="arch:tiny-llama"), NF4)


def test_nf4_merge_matches_adapter_on_4bit_base(nf4_adapter, tmp_path):
    """The merge adds the adapter to the dequantized 4-bit weights. Against the adapter on the 4-bit base its
    logits are within bf16 rounding; adding it to the original weights instead is far worse (printed: see the
    numbers in sft/merging/__init__.py's docstring)."""
    from transformers import AutoModelForCausalLM

    from sft.merging import load_adapter_model, merge_adapter

    out = tmp_path / "merged"
    r = merge_adapter(nf4_adapter, out, check=True)
    assert (r.method, r.dtype, r.quantized_base, r.checked) == ("shards", "bfloat16", True, True)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    wrong = merge_adapter(nf4_adapter, tmp_path / "onto-original", check=False, nf4_onto="original")

    reference, _ = load_adapter_model(nf4_adapter, dtype=torch.float32)  # the 4-bit model's own weights, dense
    four_bit, _ = load_adapter_model(nf4_adapter, keep_4bit=True)  # bitsandbytes' 4-bit forward, bf16 compute
    ref = reference(input_ids=IDS).logits.detach()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref4 = four_bit(input_ids=IDS).logits.float()
    errors = {}
    for name, path in (("dequantized", out), ("original", Path(wrong.out))):
        merged = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            got = merged(input_ids=IDS).logits
        errors[name] = ((got - ref).abs().max().item(), (got - ref).abs().mean().item(), (got - ref4).abs().max().item())
    scale = ref.abs().max().item()
    print(f"\nmax|logit| {scale:.3f}; merged onto dequantized: max {errors['dequantized'][0]:.4f} mean "
          f"{errors['dequantized'][1]:.5f} (vs bnb 4-bit forward {errors['dequantized'][2]:.4f}); onto original: max "
          f"{errors['original'][0]:.4f} mean {errors['original'][1]:.5f} (vs bnb {errors['original'][2]:.4f})")
    assert errors["dequantized"][0] <= 3e-2 * scale  # bf16 rounding of the merged weights
    assert errors["dequantized"][0] <= 3 * (ref4 - ref).abs().max().item()  # ~ what bf16 compute does anyway
    assert errors["original"][0] > 10 * errors["dequantized"][0]
    assert errors["original"][1] > 10 * errors["dequantized"][1]
    assert errors["original"][2] > 5 * errors["dequantized"][2]


def test_nf4_whole_model_fallback_also_merges_onto_dequantized_weights(nf4_adapter, tmp_path):
    from safetensors.torch import load_file

    from sft.merging import merge_adapter

    a = merge_adapter(nf4_adapter, tmp_path / "shards", method="shards", check=False)
    b = merge_adapter(nf4_adapter, tmp_path / "model", method="model", check=True)
    assert b.method == "model" and b.dtype == "bfloat16"
    sa, sb = load_file(Path(a.out) / "model.safetensors"), load_file(Path(b.out) / "model.safetensors")
    assert sa.keys() == sb.keys()
    for k in sa:  # same weights up to one bf16 rounding step (PEFT adds in another order)
        assert torch.allclose(sa[k].float(), sb[k].float(), rtol=1e-2, atol=1e-3), k
