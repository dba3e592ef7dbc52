"""Selective activation checkpointing, A/B in one process: the step time with every decoder layer recomputed,
with the first K layers keeping their activations, and with none recomputed, interleaved (alternating order) so
that a shared machine's drift hits every mode alike. sft's model path (``load_model_and_tokenizer``: chunked loss,
base dropout 0), bf16-mixed autocast, LoRA r16 on q/v, 8 x 512 packed tokens of 64-192-token
documents, AdamW.

    python -m benchmarks.studies.checkpoint_ab MODEL K ROUNDS     # e.g. embedded:smollm2-135m-instruct 16 2
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from benchmarks.studies.attention import packed_positions


def main(argv=None) -> None:
    from transformers.modeling_layers import GradientCheckpointingLayer

    from sft.config import LoraSection, ModelConfig, QuantizationConfig
    from sft.models.loading import load_model_and_tokenizer

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        raise SystemExit("usage: python -m benchmarks.studies.checkpoint_ab MODEL K ROUNDS")
    name, keep_k, rounds = argv[0], int(argv[1]), int(argv[2])
    torch.set_num_threads(2)
    mc = ModelConfig(name=name, dtype="bf16-mixed", gradient_checkpointing=True)
    model, _, _ = load_model_and_tokenizer(mc, LoraSection(r=16, alpha=32, target_modules=["q_proj", "v_proj"]),
                                           QuantizationConfig(), tokens_per_micro_batch=8 * 512)
    model.train()
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    pos = packed_positions(8, 512, shortest=64, longest=193)
    ids = torch.randint(0, model.config.vocab_size, (8, 512))

    def step() -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids, position_ids=pos)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    modes = {"all": 0, f"keep{keep_k}": keep_k, "none": len(layers)}
    times: dict[str, list[float]] = {m: [] for m in modes}
    step()  # warm-up
    for r in range(rounds):
        for m, keep in (list(modes.items()) if r % 2 == 0 else list(reversed(modes.items()))):
            for i, layer in enumerate(layers):
                layer.gradient_checkpointing = i >= keep
            times[m].append(step())
            print(m, round(times[m][-1], 2), flush=True)
    for m, v in times.items():
        print(f"{m}: median {statistics.median(v):.2f} s, all {[round(x, 2) for x in v]}")


if __name__ == "__main__":
    main()
