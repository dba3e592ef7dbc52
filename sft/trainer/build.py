"""Assembling the Trainer of a run and running it: sft's callbacks and the caller's, the checkpoint extras,
leftover partial checkpoints, the data cursor of a resumed run, and the fit itself."""

from __future__ import annotations

import logging
from pathlib import Path

from sft import distributed as dist
from sft.trainer import checkpoint_format as ck
from sft.trainer.resume import ResumePoint
from sft.trainer.trainer import Collator, ShardAwareTrainer

log = logging.getLogger(__name__)


def build_trainer(model, args, train_dataset, eval_dataset, position_ids: bool, callbacks: list,
                  checkpoint_extras, resume_point: ResumePoint | None) -> ShardAwareTrainer:
    trainer = ShardAwareTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                                data_collator=Collator(position_ids), callbacks=callbacks,
                                checkpoint_extras=checkpoint_extras)
    if dist.is_main_process():
        for p in ck.remove_partials(Path(args.output_dir)):
            log.warning("removed %s: a checkpoint whose writing was interrupted", p)
    dist.barrier()
    if resume_point is not None:
        if resume_point.cursor is not None:
            train_dataset.load_state_dict(resume_point.cursor)
        else:
            log.warning("resume: %s has no data cursor for rank %d; the data restarts from the beginning",
                        resume_point.path, dist.dist_info().rank)
    return trainer


def fit(trainer: ShardAwareTrainer, resume_point: ResumePoint | None, max_steps: int):
    """``trainer.train()``, resumed from ``resume_point``; a checkpoint already at max_steps loads and trains
    nothing (transformers would train one step past it). On a multi-rank failure, names the peer that died."""
    from transformers.trainer_utils import TrainOutput

    resume = str(resume_point.path) if resume_point is not None else None
    if resume and dist.is_main_process():
        print(f"resuming from {resume} (step {resume_point.step} of {max_steps})")
    try:
        if resume_point is not None and resume_point.step >= max_steps:
            if dist.is_main_process():
                print(f"{resume} is at step {resume_point.step} >= max_steps {max_steps}: nothing left to train")
            trainer._load_from_checkpoint(resume)
            return TrainOutput(resume_point.step, float("nan"), {})
        if resume_point is not None:
            trainer.add_callback(_restore_rng_at_first_step(trainer, resume))
        return trainer.train(resume_from_checkpoint=resume)
    except Exception as e:
        if trainer.args.world_size > 1:
            dist.explain_failure(e)  # names the dead peer and exits, if that is what happened
        raise


def _restore_rng_at_first_step(trainer, checkpoint: str):
    """A callback that restores the checkpoint's RNG states just before the first step after a resume.

    transformers restores them only when it skips the trained batches itself; sft resumes the data from its cursor
    (``ignore_data_skip=True``), and then transformers never restores them: the LoRA dropout masks after a resume
    differed from an uninterrupted run's (a 2-node resume with lora.dropout 0.05 ended with another adapter). At
    ``on_step_begin`` the next batch is already fetched, as at transformers' own restore point."""
    from transformers import TrainerCallback

    class RestoreRng(TrainerCallback):
        pending = True

        def on_step_begin(self, args, state, control, **kwargs):
            if self.pending:
                self.pending = False
                trainer._load_rng_state(checkpoint)

    return RestoreRng()
