"""transformers' Hub kernels stay off for models sft loads with from_pretrained (sft/models/pretrained.py): a
``model.train()`` (the Trainer calls it) must not kernelize the model and strip sft's instance-level forwards (the
fused RMSNorm), and nothing is looked up on the Hub."""

import pytest
import torch

from sft.config import LoraSection, ModelConfig, QuantizationConfig
from sft.models import load_model_and_tokenizer
from sft.ops.norm import rms_norm


def _norms(model):
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]


@pytest.mark.slow
def test_train_keeps_the_fused_norm_of_a_pretrained_model():
    """The embedded SmolLM2 comes through from_pretrained (its dense copy): after .train() and .eval() every norm
    still runs sft's fused forward, and a training forward runs the compiled kernel, not the eager ops."""
    model, tok, _ = load_model_and_tokenizer(ModelConfig(name="embedded:smollm2-135m-instruct", dtype="bf16-mixed"),
                                             LoraSection(r=4), QuantizationConfig(), tokens_per_micro_batch=64)
    norms = _norms(model)
    assert norms and all(getattr(n.forward, "__func__", None) is rms_norm for n in norms)
    model.train()
    model.eval()
    model.train()
    assert all(getattr(n.forward, "__func__", None) is rms_norm for n in norms)
    assert not model.get_base_model().use_kernels
    ids = torch.randint(0, 1000, (1, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids)  # compiles (tracing runs aten ops of its own)
    with torch.profiler.profile() as prof, torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids)
    names = {e.name for e in prof.events()}
    assert "aten::rsqrt" not in names  # transformers' eager RMSNorm (the compiled kernel has no aten ops)
