"""The CPU LoRA dropout (sft/ops/dropout.py): the drop rate and scale of nn.Dropout, an unbiased output, the
gradient of the mask it applied, masks reproduced by the seed, and installed on every LoRA layer by sft."""

import pytest
import torch

from sft.ops.dropout import LANES, FastDropout, dropout
from sft.patches.peft import install_fast_dropout


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_drop_rate_scale_and_every_lane(p):
    """The dropped share is p (to 1/65536) overall and in each of the four 16-bit lanes of a 64-bit draw (a lane with
    a biased bit, e.g. the sign of a non-negative draw, would show here), and kept elements are scaled to keep the
    mean."""
    torch.manual_seed(0)
    n = 4 * 2**20
    y = dropout(torch.ones(n), p)
    k = round(p * LANES)
    p_eff = k / LANES
    dropped = (y == 0).double()
    sigma = (p_eff * (1 - p_eff) / n) ** 0.5
    assert abs(dropped.mean().item() - p_eff) < 6 * sigma
    for lane in range(4):
        assert abs(dropped[lane::4].mean().item() - p_eff) < 6 * 2 * sigma, lane
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, LANES / (LANES - k)))
    assert abs(y.double().mean().item() - 1.0) < 6 * sigma / (1 - p_eff)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_is_the_applied_mask_times_the_scale(dtype):
    torch.manual_seed(1)
    x = (torch.rand(3, 257, 129) + 0.5).to(dtype).requires_grad_()
    y = dropout(x, 0.2)
    assert y.dtype == dtype and y.shape == x.shape
    g = torch.randn_like(y)
    y.backward(g)
    keep = y != 0  # x > 0 everywhere: a zero output is a dropped element
    scale = LANES / (LANES - round(0.2 * LANES))
    assert torch.equal(y, torch.where(keep, x.detach() * scale, 0))
    assert torch.equal(x.grad, torch.where(keep, g * scale, 0))


def test_masks_follow_the_seed_and_differ_between_calls():
    x = torch.ones(4096)
    torch.manual_seed(7)
    a, b = dropout(x, 0.5), dropout(x, 0.5)
    torch.manual_seed(7)
    assert torch.equal(dropout(x, 0.5), a)
    assert not torch.equal(a, b)


def test_eval_zero_and_one_behave_like_f_dropout():
    x = torch.randn(64, 64)
    assert torch.equal(dropout(x, 0.5, training=False), x)
    assert torch.equal(dropout(x, 0.0), x)
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    m = FastDropout(0.5).eval()
    assert torch.equal(m(x), x)
    assert isinstance(m, torch.nn.Dropout)


@pytest.mark.slow
def test_sft_installs_it_on_every_lora_layer_and_training_learns(tmp_path):
    """prepare_model swaps PEFT's nn.Dropout for FastDropout (lora.fast_dropout, on by default) on every adapted
    layer and leaves them alone when it is off; a short run with LoRA dropout 0.1 still lowers the loss."""
    from sft.config import LoraSection, ModelConfig, QuantizationConfig, load_config
    from sft.data.ingest import write_dataset
    from sft.models import load_model_and_tokenizer
    from sft.recipe import train

    for fast in (True, False):
        model, _, _ = load_model_and_tokenizer(ModelConfig(name="arch:tiny-llama", dtype="fp32"),
                                               LoraSection(dropout=0.1, fast_dropout=fast), QuantizationConfig())
        drops = [d for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
                 for d in m.lora_dropout.values()]
        assert drops and all(isinstance(d, FastDropout) == fast for d in drops)
        assert all(d.p == 0.1 for d in drops)

    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{2 * i}.", "source": "test"} for i in range(64)]
    write_dataset(str(tmp_path / "ds"), rows, progress=False)
    cfg = load_config(None, [
        "model.name=arch:tiny-llama", "model.dtype=fp32", "demo.generate=false", f"data.path={tmp_path / 'ds'}",
        "data.eval_path=null", "data.seq_length=64", "training.max_steps=8", "training.per_device_train_batch_size=2",
        "training.logging_steps=1", "demo.accuracy_samples=0", "training.eval_strategy=no",
        "training.save_strategy=no", "training.merge=false", "training.progress=false",
        "training.learning_rate=5e-3", "training.warmup_steps=0", f"training.output_dir={tmp_path / 'out'}",
        "lora.dropout=0.1",
    ])
    losses = train(cfg).loss_history
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses


def test_install_counts_only_lora_dropouts():
    from peft import LoraConfig, get_peft_model

    from sft.models import build_random

    model = get_peft_model(build_random("tiny-opt", 0), LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj"]))
    base = [m for n, m in model.named_modules() if type(m) is torch.nn.Dropout and "lora_dropout" not in n]
    layers = sum(1 for n, _ in model.named_modules() if n.endswith("q_proj"))
    assert install_fast_dropout(model) == layers
    assert all(type(m) is torch.nn.Dropout for m in base)  # the base's own dropout modules are untouched
