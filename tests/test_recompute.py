"""Recomputed layers (activation checkpointing) with sft's compiled CPU kernels on, LoRA and QLoRA.

torch's non-reentrant checkpoint stops a layer's recomputation early by raising an exception from a saved-tensor
hook once every tensor it needs is back; that exception can fire inside the compiled SwiGLU / RMSNorm kernels.
They used to take it for a compiler failure: the QLoRA run then died in its first backward with
``AssertionError: Unexpected state: target_frame.early_stop is set`` (found on `arch:llama-7b` NF4, where `auto`
must recompute), after warning that torch.compile had failed.
"""

import json
import logging

import pytest
import torch

import sft
from sft.config import load_config
from sft.data.ingest import ingest
from sft.ops import mlp, norm


@pytest.fixture(scope="module")
def qa_dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("recompute")
    src = d / "qa.jsonl"
    with src.open("w") as f:
        for i in range(200):
            f.write(json.dumps({"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}."}) + "\n")
    ingest([str(src)], str(d / "ds"), progress=False)
    return str(d / "ds")


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_every_layer_recomputed_with_the_compiled_kernels(qa_dataset, tmp_path, caplog, monkeypatch, quant):
    if quant == "nf4":
        pytest.importorskip("bitsandbytes")
    # earlier tests in this process compiled the kernels for many shapes (dynamo's recompile limit then fails a
    # fullgraph compile) and may have turned a kernel off: start both afresh
    torch._dynamo.reset()
    for op in (mlp, norm):
        monkeypatch.setitem(op._state, "broken", False)
    mlp_runs, norm_runs = mlp.runs(), norm.runs()
    cfg = load_config(None, [
        "model.name=arch:tiny-llama", f"quantization.mode={quant}", "model.dtype=bf16-mixed",
        "model.gradient_checkpointing=true", "data.seq_length=128", f"data.path={qa_dataset}",
        "training.max_steps=3", f"training.output_dir={tmp_path / 'out'}", "training.merge=false",
        "training.progress=false", "training.eval_strategy=no", "training.save_strategy=no"])
    with caplog.at_level(logging.WARNING):
        summary = sft.train(cfg)
    assert summary.steps == 3
    assert not [r for r in caplog.records if "torch.compile failed" in r.getMessage()], caplog.text
    # the compiled kernels ran, in forward and recompute
    assert mlp.runs() > mlp_runs and norm.runs() > norm_runs, (mlp._state, norm._state)
