"""What the training path computes (the correctness issue): the evaluation loss, checked against a direct computation."""

from __future__ import annotations

import pytest

from sft.data.ingest import write_dataset
from tests.helpers import train_args


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-opt"])
def test_eval_loss_equals_a_direct_computation_on_the_same_rows(sft, tmp_path, arch):  # noqa: F811
    """The summary's eval_loss is sum(token losses) / labelled tokens over the packed, isolated eval blocks (two
    documents per block): recomputed here one row at a time with the model's own forward and cross-entropy (no
    packing, no sft code). OPT's own mask ignores position ids, so this also checks that evaluation isolates the
    packed documents (it fell back to the model's attention before)."""
    import json

    import torch

    from sft.config import ModelConfig
    from sft.data.formatting import tokenize_example
    from sft.models import build_random, load_tokenizer
    from tests.helpers import fixed_length_rows

    seq = 64
    tok = load_tokenizer(ModelConfig(name=f"arch:{arch}"))
    rows = fixed_length_rows(tok, 8, seq // 2 - 1, vary_prompt=True)  # two rows (+ EOS each) fill one block
    write_dataset(str(tmp_path / "train"), rows, progress=False)
    write_dataset(str(tmp_path / "eval"), rows, progress=False)
    args = train_args(tmp_path / "out", tmp_path / "train", f"model=arch:{arch}", f"data.seq_length={seq}", f"data.eval_path={tmp_path / 'eval'}",
                      "training.eval_strategy=steps", "training.eval_steps=1", "training.learning_rate=0",
                      "data.answer_only=true", "training.per_device_eval_batch_size=3")
    args = [a for a in args if a not in ("data.eval_path=null", "training.eval_strategy=no")]
    r = sft(*args)
    assert r.rc == 0, r.err[-3000:]
    s = json.loads((tmp_path / "out" / "summary.json").read_text())["summary"]

    model = build_random(arch, 42).eval()  # lr 0: the adapter is still the identity (lora_B = 0)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids, labels = tokenize_example(tok, row["question"], row["answer"], answer_only=True)
            ids, labels = ids + [tok.eos_token_id], labels + [tok.eos_token_id]
            logits = model(torch.tensor([ids])).logits[0, :-1].double()
            target = torch.tensor(labels[1:])
            keep = target != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
            count += int(keep.sum())
    assert s["eval_loss"] == pytest.approx(total / count, rel=1e-5)
