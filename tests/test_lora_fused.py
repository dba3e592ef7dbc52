"""The fused CPU LoRA linear (sft/ops/lora.py, lora.fused): PEFT's output and gradients (same dropout masks) in fp32
and under bf16 autocast, with and without dropout and bias; the fallbacks to PEFT's forward; installed by
prepare_model; training, checkpointing and the merge on top of it."""

import copy

import pytest
import torch

from sft.ops.lora import fused_forward
from sft.patches.peft import install_fast_dropout, install_fused_lora


class _Proj(torch.nn.Module):
    def __init__(self, din, dout, bias):
        super().__init__()
        self.q_proj = torch.nn.Linear(din, dout, bias=bias)

    def forward(self, x):
        return self.q_proj(x)


def _peft_pair(din=96, dout=80, bias=True, p=0.1, policy="fp32"):
    """(PEFT's lora.Linear, the same module fused), equal weights; B is non-zero so both LoRA factors matter."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    m = _Proj(din, dout, bias)
    if policy == "bf16-mixed":
        for prm in m.parameters():
            prm.data = prm.data.to(torch.float32 if prm.ndim == 1 else torch.bfloat16)
    pm = get_peft_model(m, LoraConfig(r=8, lora_alpha=24, lora_dropout=p, target_modules=["q_proj"]))
    install_fast_dropout(pm)
    torch.nn.init.normal_(pm.base_model.model.q_proj.lora_B["default"].weight, std=0.1)
    fused = copy.deepcopy(pm)
    assert install_fused_lora(fused) == 1
    return pm.train(), fused.train()


def _run(model, x, g, autocast):
    x = x.clone().requires_grad_()
    torch.manual_seed(123)  # the same dropout masks for both paths
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    y.backward(g)
    lin = model.base_model.model.q_proj
    return y.detach(), x.grad, lin.lora_A["default"].weight.grad, lin.lora_B["default"].weight.grad


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False])
def test_fp32_equals_peft(p, bias):
    peft_model, fused = _peft_pair(bias=bias, p=p)
    x, g = torch.randn(3, 17, 96), torch.randn(3, 17, 80)
    want, got = _run(peft_model, x, g, False), _run(fused, x, g, False)
    for name, a, b in zip(("y", "dx", "dA", "dB"), want, got):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)
    assert fused.base_model.model.q_proj.base_layer.weight.grad is None  # the frozen base gets no gradient


@pytest.mark.parametrize("p", [0.0, 0.05])
def test_bf16_autocast_matches_peft_to_bf16_rounding(p):
    """bf16 weights, fp32 norms/biases and LoRA masters under autocast (the bf16-mixed policy): the same dtypes out,
    values equal to bf16 rounding (the scalar factors are applied to other operands), and the fp32 masters get
    fp32 gradients."""
    peft_model, fused = _peft_pair(din=192, dout=160, p=p, policy="bf16-mixed")
    x, g = torch.randn(4, 64, 192, dtype=torch.bfloat16), torch.randn(4, 64, 160, dtype=torch.bfloat16)
    want, got = _run(peft_model, x, g, True), _run(fused, x, g, True)
    for name, a, b in zip(("y", "dx", "dA", "dB"), want, got):
        assert a.dtype == b.dtype, name
        rel = ((a.float() - b.float()).norm() / a.float().norm()).item()
        assert rel < 1e-2, (name, rel)
    assert got[2].dtype == torch.float32 and got[3].dtype == torch.float32


def test_dropout_masks_are_applied_to_the_adapter_input_only():
    """With A zero-initialised B would get no signal; with B zero the output is the base's: the adapter path, not
    the base, sees the dropout. Here: the gradient of A is exactly k * gu^T (x masked), the mask the fast dropout
    draws from the same seed."""
    from sft.ops.dropout import FastDropout

    peft_model, fused = _peft_pair(p=0.5, bias=False)
    x, g = torch.randn(2, 9, 96), torch.randn(2, 9, 80)
    y, dx, da, db = _run(fused, x, g, False)
    lin = fused.base_model.model.q_proj
    base = x @ lin.base_layer.weight.t()
    torch.manual_seed(123)
    xd = FastDropout(0.5).train()(x)  # the same draws: the dropped elements and the 1/(1-p) scale
    a, b, s = lin.lora_A["default"].weight, lin.lora_B["default"].weight, lin.scaling["default"]
    torch.testing.assert_close(y, base + s * (xd @ a.t().detach()) @ b.t().detach(), rtol=1e-5, atol=1e-5)
    gu = s * g.reshape(-1, 80) @ b.detach()
    torch.testing.assert_close(da, gu.t() @ xd.reshape(-1, 96), rtol=1e-4, atol=1e-5)


def test_falls_back_to_peft_where_it_does_not_apply():
    """No grad (evaluation, generation), adapters disabled, a merged layer, nn.Dropout (lora.fast_dropout off):
    PEFT's own forward, bit for bit."""
    peft_model, fused = _peft_pair(p=0.0)
    x = torch.randn(2, 5, 96)
    with torch.no_grad():
        assert torch.equal(fused(x), peft_model(x))
    with fused.disable_adapter(), peft_model.disable_adapter():
        assert torch.equal(fused(x), peft_model(x))

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    plain = get_peft_model(_Proj(96, 80, True), LoraConfig(r=8, lora_dropout=0.3, target_modules=["q_proj"]))
    install_fused_lora(plain)
    lin = plain.base_model.model.q_proj
    assert type(lin.lora_dropout["default"]) is torch.nn.Dropout
    torch.manual_seed(5)
    a = plain(x)
    torch.manual_seed(5)
    assert torch.equal(a, type(lin).forward(lin, x))  # the class's (PEFT's) forward, same seed


def test_forward_is_an_instance_attribute_only():
    from peft.tuners.lora.layer import Linear

    _, fused = _peft_pair()
    lin = fused.base_model.model.q_proj
    assert lin.forward.__func__ is fused_forward
    assert Linear.forward is not fused_forward
    assert "forward" not in lin.state_dict()


@pytest.mark.slow
def test_prepare_model_installs_it_and_training_checkpointing_and_merge_work(tmp_path):
    """lora.fused (default on) routes every adapted projection; off, none. A run with it and every-layer
    checkpointing learns, and its merged model reproduces the adapter model's logits."""
    from sft.config import LoraSection, ModelConfig, QuantizationConfig, load_config
    from sft.data.ingest import write_dataset
    from sft.models import load_model_and_tokenizer
    from sft.recipe import train

    for on in (True, False):
        model, _, _ = load_model_and_tokenizer(ModelConfig(name="arch:tiny-llama", dtype="fp32"),
                                               LoraSection(fused=on), QuantizationConfig())
        lins = [m for m in model.modules() if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict)]
        assert lins and all((getattr(m.forward, "__func__", None) is fused_forward) == on for m in lins)

    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{2 * i}.", "source": "test"} for i in range(64)]
    write_dataset(str(tmp_path / "ds"), rows, progress=False)
    cfg = load_config(None, [
        "model.name=arch:tiny-llama", "model.dtype=fp32", "model.gradient_checkpointing=true", "demo.generate=false",
        f"data.path={tmp_path / 'ds'}", "data.eval_path=null", "data.seq_length=64", "training.max_steps=8",
        "training.per_device_train_batch_size=2", "training.logging_steps=1", "demo.accuracy_samples=0",
        "training.eval_strategy=no", "training.save_strategy=no", "training.merge=true", "training.progress=false",
        "training.learning_rate=5e-3", "training.warmup_steps=0", f"training.output_dir={tmp_path / 'out'}",
        "lora.dropout=0.1",
    ])
    result = train(cfg)
    losses = result.loss_history
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert result.merge_max_abs_diff is not None and result.merge_max_abs_diff < 1e-3
