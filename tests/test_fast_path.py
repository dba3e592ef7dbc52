"""The fast path keeps the learning behaviour (issue #7): base dropout really off, and a short training run takes
the same losses with and without the fast path."""

import pytest
import torch

from sft.models import build_random, set_base_dropout


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
