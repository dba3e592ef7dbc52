"""Crash-safe, pickle-free checkpoints for the Trainer (the format itself: sft/trainer/checkpoint_format.py).

Every rank writes into ``checkpoint-N.partial``; the main process marks it ``COMPLETE`` and renames it into place.
The optimizer, scheduler, scaler and RNG states go to safetensors + JSON, each rank adds its data cursor, and
``training_args.bin`` (a pickle) is never written. ``checkpoint_extras(dir)`` (main process) adds files of ours
(sft_base.json, sft_resume.json) before the checkpoint is marked complete. DeepSpeed and FSDP keep their own
optimizer formats (their engines write them). Each overridden private Trainer method is a registered patch
(``@override``, sft/patches/transformers.py: TRAINER_OVERRIDES), listed in summary.json when it ran.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from sft import distributed as dist, faults
from sft.patches.registry import override
from sft.errors import SftError
from sft.io import atomic_write_json
from sft.trainer import checkpoint_format as ck

log = logging.getLogger(__name__)


class CheckpointIO:
    """Mixin for a ``transformers.Trainer``: the checkpoint writing and reading methods it overrides."""

    def _own_optimizer_format(self) -> bool:
        from transformers.utils import is_sagemaker_mp_enabled, is_torch_xla_available

        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled or is_torch_xla_available()
                    or is_sagemaker_mp_enabled())

    @override("transformers.Trainer._save_checkpoint")
    def _save_checkpoint(self, model, trial):

        step = self.state.global_step
        dist.set_phase("save", step)
        run_dir = Path(self._get_output_dir(trial=trial))
        final = run_dir / f"checkpoint-{step}"
        tmp = run_dir / f"checkpoint-{step}{ck.PARTIAL_SUFFIX}"
        main = self.args.should_save
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        self.save_model(str(tmp), _internal_call=True)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(str(tmp))
            faults.kill_at_step(faults.KILL_SAVE, self.args.process_index, step)  # half a checkpoint written
            self._save_scaler(str(tmp))
            self._save_rng_state(str(tmp))
        ds = self.train_dataset
        if hasattr(ds, "state_dict"):
            # The DataLoader may have fetched ahead: the cursor is taken at the blocks actually trained on.
            blocks = step * self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
            atomic_write_json(tmp / ck.cursor_name(self.args.process_index),
                          {"global_step": step, "cursor": ds.state_dict(blocks=blocks)})
        if main:
            if self.state.best_global_step:
                best = run_dir / f"checkpoint-{self.state.best_global_step}"
                if best == final or best.is_dir():
                    self.state.best_model_checkpoint = str(best)
            from transformers.trainer_callback import ExportableState

            for cb in [c for c in self.callback_handler.callbacks + [self.control] if isinstance(c, ExportableState)]:
                name = cb.__class__.__name__
                if isinstance(self.state.stateful_callbacks.get(name), list):
                    self.state.stateful_callbacks[name].append(cb.state())
                else:
                    self.state.stateful_callbacks[name] = cb.state()
            self.state.save_to_json(str(tmp / ck.TRAINER_STATE))
            if self.checkpoint_extras is not None:
                self.checkpoint_extras(tmp)
        self.accelerator.wait_for_everyone()  # every rank's files are in tmp
        if main:
            ck.mark_complete(tmp, step)
            ck.publish(tmp, final)
            ck.rotate(run_dir, self.args.save_total_limit, final, protect=(self.state.best_model_checkpoint,))
        self.accelerator.wait_for_everyone()

    @override("transformers.Trainer._save")
    def _save(self, output_dir=None, state_dict=None):
        """transformers' ``_save`` without ``torch.save(self.args, "training_args.bin")`` (a pickle)."""
        from peft import PeftModel
        from transformers import PreTrainedModel

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save and not getattr(self, "is_distributed_loading_by_transformers", False):
            return
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
        supported = (PreTrainedModel, PeftModel)
        if isinstance(self.model, supported):
            self.model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
        else:
            if state_dict is None:
                state_dict = self.model.state_dict()
            unwrapped = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            if isinstance(unwrapped, supported):
                unwrapped.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
            elif self.args.should_save:
                from safetensors.torch import save_file

                save_file(state_dict, os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
        if self.args.should_save and self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    @override("transformers.Trainer._save_optimizer_and_scheduler")
    def _save_optimizer_and_scheduler(self, output_dir):
        if not self._own_optimizer_format():
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:  # DDP: every rank's optimizer state is the same
            ck.save_optimizer(self.optimizer, output_dir)
            ck.save_state(self.lr_scheduler.state_dict(), output_dir, ck.SCHEDULER)

    @override("transformers.Trainer._save_scaler")
    def _save_scaler(self, output_dir):
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and self.args.should_save:
            ck.save_state(scaler.state_dict(), output_dir, ck.SCALER)

    @override("transformers.Trainer._save_rng_state")
    def _save_rng_state(self, output_dir):
        ck.save_state(ck.capture_rng(), output_dir, ck.rng_name(self.args.process_index))

    @override("transformers.Trainer._load_optimizer_and_scheduler")
    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None:
            return
        if not self._own_optimizer_format():
            return super()._load_optimizer_and_scheduler(checkpoint)
        for name in (ck.OPTIMIZER, ck.SCHEDULER):
            if not ck.has_state(checkpoint, name):
                raise SftError(f"training.resume: {checkpoint} has no {name}.json; it cannot be resumed from")
        ck.load_optimizer(self.optimizer, checkpoint)
        self.lr_scheduler.load_state_dict(ck.load_state(checkpoint, ck.SCHEDULER))

    @override("transformers.Trainer._load_scaler")
    def _load_scaler(self, checkpoint):
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint is not None and scaler is not None and ck.has_state(checkpoint, ck.SCALER):
            scaler.load_state_dict(ck.load_state(checkpoint, ck.SCALER))

    @override("transformers.Trainer._load_rng_state")
    def _load_rng_state(self, checkpoint):
        if checkpoint is None:
            return
        name = ck.rng_name(self.args.process_index)
        if not ck.has_state(checkpoint, name):
            log.warning("resume: %s has no %s.json; the RNG streams (dropout) will differ from an "
                        "uninterrupted run", checkpoint, name)
            return
        ck.restore_rng(ck.load_state(checkpoint, name))
