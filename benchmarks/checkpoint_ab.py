"""Selective activation checkpointing, A/B in one process: the step time with every decoder layer recomputed,
with the first K layers keeping their activations, and with none recomputed, interleaved (alternating order) so
that a shared machine's drift hits every mode alike. sft's model path (``load_model_and_tokenizer``: chunked loss,
base dropout 0), bf16-mixed autocast, LoRA r16 on q/v, 8 x 512 packed tokens of 64-192-token documents, AdamW.

    python -m benchmarks.checkpoint_ab MODEL K ROUNDS     # e.g. embedded:smollm2-135m-instruct 16 2
"""
import random
import statistics
import sys
import time

import torch
from sft.config import ModelConfig, LoraSection, QuantizationConfig
from sft.models.loading import load_model_and_tokenizer
from transformers.modeling_layers import GradientCheckpointingLayer

name, K, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(2)
mc = ModelConfig(name=name, dtype="bf16-mixed", gradient_checkpointing=True)
model, tok, _ = load_model_and_tokenizer(mc, LoraSection(r=16, alpha=32, target_modules=["q_proj", "v_proj"]),
                                         QuantizationConfig(), tokens_per_micro_batch=8 * 512)
model.train()
layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
V = model.config.vocab_size
random.seed(0)
pos = []
for _ in range(8):
    row = []
    while len(row) < 512:
        row += list(range(random.randint(64, 192)))
    pos.append(row[:512])
pos = torch.tensor(pos)
ids = torch.randint(0, V, (8, 512))


def step():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids, position_ids=pos)
    out.loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)


modes = {"all": 0, f"keep{K}": K, "none": len(layers)}
times = {m: [] for m in modes}
step()  # warm-up
for r in range(rounds):
    for m, keep in (modes.items() if r % 2 == 0 else reversed(modes.items())):
        for i, l in enumerate(layers):
            l.gradient_checkpointing = i >= keep
        t = time.perf_counter(); step(); times[m].append(time.perf_counter() - t)
        print(m, round(times[m][-1], 2), flush=True)
for m, v in times.items():
    print(f"{m}: median {statistics.median(v):.2f} s, all {[round(x, 2) for x in v]}")
