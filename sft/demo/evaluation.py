"""The demo's evaluation, plugged into a run as a :class:`sft.hooks.RunHooks`: held-out exact-match accuracy of
greedy answers (prompted exactly as in training) before training, after it, and on the merged model reloaded from
disk as a user would, plus one sample answer of the merged model. Works for any question/answer eval set.
Its numbers are its own fields of the run's summary (:data:`FIELDS`, RunSummary.add): the library declares none."""

from __future__ import annotations

from pathlib import Path

import torch

from sft import distributed as dist
from sft.config import RunConfig
from sft.hooks import RunHooks

#: The fields the demo adds to the run's summary (RunSummary.add); the accuracies also go to the trackers
FIELDS = ("accuracy_before", "accuracy_after", "accuracy_merged", "sample_question", "sample_answer")


class ExactMatch(RunHooks):
    """``demo.accuracy_samples`` rows of ``data.eval_path`` (read once, on the main process)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.rows: list[dict[str, str]] = []

    def before_training(self, model, tokenizer, summary) -> None:
        from sft.data.inputs import first_rows

        cfg = self.cfg
        for name in FIELDS:  # summary.json shows the demo's fields, null where not measured (sharded runs)
            summary.add(name, track=name.startswith("accuracy"))
        self.rows = first_rows(cfg, cfg.data.eval_path, cfg.demo.accuracy_samples)
        sharded = dist.sharded_launch()
        if sharded is not None:
            print(f"{sharded}: the model is sharded across ranks, so held-out accuracy is measured once, on the "
                  "merged model after training")
            return
        model.to(dist.device())
        summary.add("accuracy_before", self.accuracy(model, tokenizer, "accuracy before"))
        print(f"held-out accuracy before training: {100 * summary.accuracy_before:.1f}% ({len(self.rows)} rows)")

    def after_training(self, model, tokenizer, summary) -> None:
        if self.rows and dist.sharded_launch() is None:
            summary.add("accuracy_after", self.accuracy(model, tokenizer, "accuracy after"))
            print(f"held-out accuracy after training: {100 * summary.accuracy_after:.1f}%")

    def after_merge(self, merged_dir: Path, summary) -> None:
        """Reload the merged model the way a user would: answer one held-out question, and measure accuracy on the
        same rows as before training."""
        from sft.generation import answer_as_trained, load_merged

        if not self.rows:
            return
        cfg = self.cfg
        model, tokenizer = load_merged(merged_dir)
        question = self.rows[0]["question"]
        summary.add("sample_question", question)
        summary.add("sample_answer", answer_as_trained(model, tokenizer, question, cfg.data.template,
                                                       cfg.demo.max_new_tokens))
        summary.add("accuracy_merged", self.accuracy(model, tokenizer, "accuracy merged", merged=True))
        print(f"held-out accuracy of the reloaded merged model: {100 * summary.accuracy_merged:.1f}%")

    def accuracy(self, model, tokenizer, desc: str, merged: bool = False) -> float:
        """Exact match on the held-out rows (a merged model, reloaded in fp32, runs without autocast)."""
        from sft.data.formatting import prompt_text
        from sft.demo.task import evaluate_accuracy
        from sft.models.precision import resolve_dtype_policy, uses_bf16

        cfg = self.cfg
        dtype = resolve_dtype_policy(cfg.model.dtype)  # what the run trains in ("auto" resolved for this machine)
        bf16 = not merged and uses_bf16(dtype, cfg.quantization.mode, cfg.quantization.compute_dtype)
        acc, _ = evaluate_accuracy(
            model, tokenizer, self.rows, lambda q: prompt_text(tokenizer, q, cfg.data.template),
            batch_size=cfg.training.per_device_eval_batch_size * 4, max_new_tokens=cfg.demo.max_new_tokens,
            progress=cfg.training.progress, autocast_dtype=torch.bfloat16 if bf16 else None,
            add_special_tokens=cfg.data.template == "default", desc=desc,
        )
        return acc
