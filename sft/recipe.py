"""The fine-tuning run, top to bottom: config -> data -> model -> trainer -> outputs.

The loop itself is transformers' ``Trainer`` (checkpointing, resume, logging integrations, DDP / DeepSpeed / FSDP
through accelerate). What sft brings is each step's room: the data path (sft.data: a rank's shard streamed from
Deep Lake, formatted and packed), the model preparation (sft.models), the Trainer's checkpoints and evaluation
(sft.trainer), distributed state (sft.distributed) and the rank-0 merge (sft.merging, sft.outputs). TRL's ``SFTTrainer`` is
not used: it wants a ``datasets`` dataset it can map over and packs without per-document position ids on CPU; the
plain ``Trainer`` takes sft's packed ``IterableDataset`` as it is.
"""

from __future__ import annotations

import copy
import gc
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from sft import distributed as dist, outputs, stages
from sft.config import RunConfig
from sft.data.inputs import rows_dataset
from sft.hooks import RunHooks
from sft.allocator import check_in_process
from sft.metrics import StepTimer, peak_rss_bytes
from sft.models import count_parameters, load_tokenizer, prepare_weights
from sft.summary import RunSummary
from sft.trainer.adapter import save_adapter
from sft.trainer.arguments import check_extra, leave_sharded_mode
from sft.trainer.build import build_trainer, fit
from sft.trainer import preemption
from sft.trainer.callbacks import ThroughputCallback, TrackerMetrics
from sft.trainer.resume import resolve_resume, resume_meta
from sft.trainer.strategy import strategy


def train(cfg: RunConfig, model=None, dataset: str | Iterable[dict] | None = None, callbacks: Sequence = (),
          training_args: dict[str, Any] | None = None) -> RunSummary:
    """Fine-tune as ``cfg`` says and return the run's summary; ``cfg`` itself is never changed.

    ``model``: a base model already loaded (LoRA is added here); ``cfg.model.name`` must still name where it came
    from (the tokenizer, and the merge rebuilds the base from it). ``dataset``: a Deep Lake path, or an iterable of
    ``{"question", "answer"}`` rows (written once under output_dir/data). ``callbacks``: ``TrainerCallback``
    objects for the Trainer and :class:`sft.hooks.RunHooks` for evaluations around it. ``training_args``: extra
    ``TrainingArguments`` fields (``optim``, ``adam_beta2``, ...)."""
    t_start = time.perf_counter()
    check_extra(training_args)
    run = _resolved(cfg, dataset)
    hooks = [c for c in callbacks if isinstance(c, RunHooks)]
    dist.check_launch(dist.dist_info())  # a launch that asked for N ranks and started one stops here
    dist.resolve_deepspeed_config_file()  # a relative deepspeed_config_file works from any directory, or stops here
    preemption.install()  # from here SIGTERM / SIGUSR1 mean: checkpoint at the next step end, then stop
    dist.init_process_group_if_needed(timeout_s=run.training.dist_timeout_s, device=dist.device().type)
    dist.start_watchdog()
    info = dist.dist_info()
    crowded = dist.oversubscription(info)
    if crowded and info.local_rank == 0:
        import logging

        logging.getLogger(__name__).warning(crowded)
    if dataset is not None and not isinstance(dataset, str):
        run = rows_dataset(run, dataset)
    out = Path(run.training.output_dir)
    summary = RunSummary(world_size=info.world_size, backend=info.backend or "none")
    summary.allocator = check_in_process(run.training.allocator)
    data = stages.open_checked(run, info.rank, info.world_size, check_model=model is None)
    # which checkpoint to resume from, checked against this run's settings before the model is loaded
    meta = resume_meta(run, info.world_size, data.train.total_rows)
    resume_point = resolve_resume(run, out / "checkpoints", info.rank, info.world_size, data.train.total_rows)
    if resume_point is not None:
        summary.resumed_from, summary.resumed_step = str(resume_point.path), resume_point.step
    elif run.training.overwrite and dist.is_main_process():
        outputs.clear_earlier_run(out)  # its checkpoints must not be mixed with (or resumed instead of) this run's

    tokenizer = load_tokenizer(run.model)
    if model is None and dist.is_main_process():  # random arch: models that load from disk are written once
        prepare_weights(run.model, run.quantization, run.training.seed, zero3=dist.sharded_launch() == "DeepSpeed ZeRO-3")
    dist.barrier()
    per_step, max_steps, plan, train_ds, eval_ds = stages.data_plan(run, data, tokenizer, info.world_size)
    summary.data_counting = plan.counting
    args, trackers_env = stages.arguments(run, out, max_steps, plan.steps_per_epoch or 0, eval_ds is not None,
                                          training_args)
    model = stages.model(run, model, tokenizer)
    summary.trainable_params, summary.total_params = count_parameters(model)
    if dist.is_main_process():
        for h in hooks:
            h.before_training(model, tokenizer, summary)

    timer = StepTimer(tokens_per_step=per_step * run.data.seq_length * info.world_size)
    losses: list[float] = []
    metrics_cb = TrackerMetrics(timer, run.training.report_to, run.data.seq_length, summary.accuracy_before)
    stop_cb = preemption.StopOnSignal()
    theirs = [c for c in callbacks if not isinstance(c, RunHooks) or isinstance(c, TrainerCallback)]
    trainer = build_trainer(model, args, train_ds, eval_ds, run.data.position_ids,
                            [ThroughputCallback(timer, losses), metrics_cb, stop_cb, *theirs],
                            stages.checkpoint_extras(run, meta), resume_point)
    metrics_cb.bind(trainer)
    summary.strategy = strategy(trainer)
    if dist.is_main_process():
        print(f"strategy: {summary.strategy} ({info.world_size} rank(s))")
    t_train = time.perf_counter()
    result = fit(trainer, resume_point, max_steps)
    summary.train_seconds = time.perf_counter() - t_train
    if stop_cb.stopped_at is not None and stop_cb.stopped_at < max_steps:  # at the last step: just finish
        _stop_preempted(stop_cb, out, max_steps)
    timing = stages.record_training(summary, trainer, result, timer, losses, train_ds, eval_ds, run.data.seq_length)

    save_adapter(trainer, tokenizer, out / "adapter", run)
    if dist.is_main_process():
        summary.paths["adapter"] = str(out / "adapter")
        for h in hooks:
            h.after_training(trainer.model, tokenizer, summary)
    metrics_cb.detach()
    del trainer, model, args
    gc.collect()
    # From here rank 0 works alone (merge, reload, generation): a live ZeRO-3 config would make transformers load
    # those models partitioned (zero.Init) and every forward a collective that the other ranks never join.
    leave_sharded_mode()
    if run.training.merge:
        outputs.merge(run, out, summary, hooks)
    dist.stop_watchdog()

    summary.peak_rss_gb = peak_rss_bytes() / 2**30
    summary.wall_seconds = time.perf_counter() - t_start
    metrics_cb.finish({"eval_accuracy_after": summary.accuracy_after, "eval_accuracy_merged": summary.accuracy_merged,
                       "eval_merge_max_abs_diff": summary.merge_max_abs_diff})
    trackers_env.close()
    outputs.write(run, out, summary, metrics_cb.history, timing)
    preemption.uninstall()
    return summary


# ----------------------------------------------------------------------------------------------- the steps


def _stop_preempted(stop_cb: preemption.StopOnSignal, out: Path, max_steps: int) -> None:
    """Training stopped on a signal after its checkpoint: leave the run (no adapter, no merge) with
    :class:`Preempted`, which ``sft train`` turns into exit status 75."""
    from sft.errors import Preempted

    r = stop_cb.report()
    dist.stop_watchdog()
    preemption.uninstall()
    ckpt = out / "checkpoints" / f"checkpoint-{r['step']}"
    why = f"received {r['signal']}" if r["signal"] else "a peer rank received a stop signal"
    took = (f" in {r['checkpoint_seconds']:.2f} s" if r["checkpoint_seconds"] is not None else "")
    since = (f" ({r['signal_to_saved_seconds']:.1f} s after the signal)" if r["signal_to_saved_seconds"] is not None
             else "")
    raise Preempted(f"rank {dist.dist_info().rank}: {why}: stopped at step {r['step']} of {max_steps}, "
                    f"{ckpt.name} written{took}{since} in {ckpt.parent}; rerun with training.resume=auto to "
                    "continue (a requeued Slurm job does so by itself)", checkpoint=str(ckpt), step=r["step"])


def _resolved(cfg: RunConfig, dataset) -> RunConfig:
    """A copy of ``cfg`` with ``auto`` resolved for this machine (what summary.json records)."""
    from sft.models.precision import resolve_dtype_policy

    run = copy.deepcopy(cfg)
    run.model.dtype = resolve_dtype_policy(run.model.dtype)
    if isinstance(dataset, str):
        run.data.path = dataset
    return run
