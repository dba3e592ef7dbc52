"""Run-level hooks: evaluations of the model outside the Trainer loop (before training, after it, and on the merged
model reloaded from disk), called on the main process only. Pass instances in ``sft.train(cfg, callbacks=[...])``
beside ordinary ``transformers.TrainerCallback`` objects; the demo's exact-match accuracy (sft/demo) is one."""

from __future__ import annotations

from pathlib import Path


class RunHooks:
    """Override what you need; every method does nothing by default. ``summary`` is the run's RunSummary: a hook
    records its numbers as fields of its own with ``summary.add(name, value, track=...)`` (summary.json shows them
    beside the library's; ``track``: the report_to trackers get them too)."""

    def before_training(self, model, tokenizer, summary) -> None:
        """The prepared model (LoRA added, not yet trained), before the Trainer exists."""

    def after_training(self, model, tokenizer, summary) -> None:
        """The trained model, after the adapter was written."""

    def after_merge(self, merged_dir: Path, summary) -> None:
        """The merged model's folder, after the merge and its logits check."""
