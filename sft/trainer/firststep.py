"""The first optimizer step is checked, under every strategy: a loss that is not finite or exactly 0, or a
gradient norm that is not finite, stops every rank with a message naming the strategy and the step.

Why: a QLoRA run that is wrong from the start can train on silently. With 4-bit weights stored as uint8 under FSDP
or ZeRO-3, loss reads 0.0 and grad_norm NaN from the first step (accelerate#3983; FSDP2 also unshards Params4bit
and drops its quant_state, axolotl#2992), and transformers' ``logging_nan_inf_filter`` logs a NaN loss as the
previous average (0.0 at step 1). sft.models.quantization refuses the storage dtype before the model loads; this
catches what gets past it (a NaN from overflow, a broken kernel, poisoned data).

How: :class:`FirstStepCheck` (a Trainer mixin) keeps the micro-step losses ``training_step`` returns until the
first optimizer step ends, then, in ``_maybe_log_save_evaluate`` (which receives that step's gradient norm, and runs
before the step's log, evaluation and checkpoint), each rank judges its own values and the verdicts are summed over
the ranks (one all-reduce of world-size floats, once per run), so every rank stops together or none does; nothing
of the step is saved. The first step of a resumed run is checked too. ``compute_loss`` also carries the
``SFT_FAULT_LOSS`` failure point (sft.faults) the tests use.
"""

from __future__ import annotations

import math

import torch

from sft import distributed as dist, faults
from sft.patches.registry import override
from sft.errors import TrainingError


def first_step_problem(losses: list[float], grad_norm) -> str | None:
    """What is wrong with one rank's first optimizer step (its micro-step losses and the gradient norm), or None."""
    problems = []
    bad = [v for v in losses if not math.isfinite(v)]
    if bad:
        problems.append(f"loss {bad[0]}")
    elif losses and all(v == 0.0 for v in losses):
        problems.append("loss 0.0 exactly")
    if grad_norm is not None:
        g = float(grad_norm.item() if isinstance(grad_norm, torch.Tensor) else grad_norm)
        if not math.isfinite(g):
            problems.append(f"gradient norm {g}")
    return "; ".join(problems) or None


def check_first_step(strategy: str, step: int, losses: list[float], grad_norm) -> None:
    """Raise :class:`TrainingError` on every rank if the first optimizer step was bad on any rank (a collective)."""
    info = dist.dist_info()
    mine = first_step_problem(losses, grad_norm)
    flags = torch.zeros(max(1, info.world_size), dtype=torch.float64)
    flags[info.rank] = 1.0 if mine else 0.0
    flags = dist.all_reduce_sum(flags)
    bad_ranks = [r for r, f in enumerate(flags.tolist()) if f]
    if not bad_ranks:
        return
    raise TrainingError(
        f"first optimizer step (step {step}) under {strategy}: {mine or 'fine'} on rank {info.rank}; bad on "
        f"rank(s) {', '.join(map(str, bad_ranks))} of {info.world_size}. Training would go on without learning, "
        f"so every rank stopped before this step was logged or saved. Check, in this order: under FSDP / ZeRO-3 "
        f"QLoRA, quantization.quant_storage equal to quantization.compute_dtype; a lower training.learning_rate; "
        f"model.dtype=fp32 (bf16 overflow); the data (a row without answer tokens under data.answer_only)."
    )


class FirstStepCheck:
    """Trainer mixin: see the module docstring."""

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if faults.armed(faults.LOSS) and model.training:
            rank, step = dist.dist_info().rank, self.state.global_step + 1
            out = ((faults.poison_loss(out[0], rank, step), *out[1:]) if return_outputs
                   else faults.poison_loss(out, rank, step))
        return out

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if not getattr(self, "_first_step_checked", False):
            if not hasattr(self, "_first_step_losses"):
                self._first_step_losses = []
            self._first_step_losses.append(float(loss.detach().float().sum()))
        return loss

    @override("transformers.Trainer._maybe_log_save_evaluate")
    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        if not getattr(self, "_first_step_checked", False):
            from sft.trainer.strategy import strategy

            self._first_step_checked = True
            losses, self._first_step_losses = getattr(self, "_first_step_losses", []), []
            check_first_step(strategy(self), self.state.global_step, losses, grad_norm)
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)
