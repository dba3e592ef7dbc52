"""The fine-tuning run, top to bottom: setup -> data -> model -> fit -> save -> merge -> report.

:func:`train` tells the story in a dozen calls, one per step; each step below is a function at the same level of
abstraction that hands the next what it made as a named dataclass (:class:`Setup`, :class:`Inputs`,
:class:`DataPlan`, :class:`Arguments`, :class:`Fitted`), never a tuple. Stage helpers that stood in a separate
``sft/stages.py`` are folded in here, so that the recipe reads in one file as litgpt's ``finetune/lora.py`` does;
each step's own work lives in its room (sft.data, sft.models, sft.trainer, sft.distributed, sft.merging,
sft.outputs) and a step is a short call into it.

The loop itself is transformers' ``Trainer`` (checkpointing, resume, logging integrations, DDP / DeepSpeed / FSDP
through accelerate). TRL's ``SFTTrainer`` is not used: it wants a ``datasets`` dataset it can map over and packs
without per-document position ids on CPU; the plain ``Trainer`` takes sft's packed ``IterableDataset`` as it is.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from sft import distributed as dist, outputs
from sft.allocator import check_in_process
from sft.config import RunConfig
from sft.data.inputs import RunData, open_data, rows_dataset
from sft.errors import DataError, SftError
from sft.hooks import RunHooks
from sft.metrics import StepTimer, checkpointing_fraction, flops_per_token, peak_rss_bytes
from sft.models import count_parameters, load_tokenizer, prepare_weights
from sft.summary import RunSummary
from sft.trainer import preemption
from sft.trainer.adapter import save_adapter
from sft.trainer.arguments import check_extra, leave_sharded_mode
from sft.trainer.build import build_trainer, fit as run_trainer
from sft.trainer.callbacks import ThroughputCallback, TrackerMetrics
from sft.trainer.resume import ResumePoint, resolve_resume, resume_meta
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
    run = setup(cfg, dataset, training_args)
    hooks = [c for c in callbacks if isinstance(c, RunHooks)]
    inputs = open_inputs(run, check_model=model is None)
    tokenizer = prepare_base(run, given=model)
    plan = data_plan(run, inputs.data, tokenizer)
    arguments = training_arguments(run, plan, training_args)
    model = prepare_model(run, model, tokenizer, hooks)
    fitted = fit(run, model, arguments, plan, inputs, callbacks)
    del model  # the Trainer holds it; save() frees both before the merge loads models
    save(run, fitted, arguments, tokenizer, hooks)
    merge(run, hooks)
    report(run, fitted, arguments, t_start)
    return run.summary


# ----------------------------------------------------------------------------------------------- the steps


@dataclass
class Setup:
    """What every step works in: the resolved config (``auto`` values resolved; what summary.json records), this
    rank's place, the output directory and the summary the steps fill in."""

    cfg: RunConfig
    info: dist.DistInfo
    out: Path
    summary: RunSummary


def setup(cfg: RunConfig, dataset, training_args: dict[str, Any] | None) -> Setup:
    """Check the launch, join the process group, resolve the config and start the summary."""
    check_extra(training_args)
    run = _resolved(cfg, dataset)
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
    summary = RunSummary(world_size=info.world_size, backend=info.backend or "none")
    summary.allocator = check_in_process(run.training.allocator)
    return Setup(run, info, Path(run.training.output_dir), summary)


@dataclass
class Inputs:
    """The opened (validated) data, and where training starts: a checkpoint to resume from or none, and the facts
    every checkpoint records so that a resumed run can be checked against them."""

    data: RunData
    resume_point: ResumePoint | None
    resume_meta: dict


def open_inputs(run: Setup, check_model: bool) -> Inputs:
    """Open the data and find the checkpoint to resume from, checked against this run's settings before the model
    is loaded; a run that does not resume clears an earlier run's output when ``training.overwrite`` says so."""
    cfg, info, out = run.cfg, run.info, run.out
    data = open_checked(cfg, info.rank, info.world_size, check_model=check_model)
    meta = resume_meta(cfg, info.world_size, data.train.total_rows)
    resume_point = resolve_resume(cfg, out / "checkpoints", info.rank, info.world_size, data.train.total_rows)
    if resume_point is not None:
        run.summary.resumed_from, run.summary.resumed_step = str(resume_point.path), resume_point.step
    elif cfg.training.overwrite and dist.is_main_process():
        outputs.clear_earlier_run(out)  # its checkpoints must not be mixed with (or resumed instead of) this run's
    return Inputs(data, resume_point, meta)


def open_checked(cfg: RunConfig, rank: int, world: int, check_model: bool = True) -> RunData:
    """Resolve the model and open (validate) the data before loading anything: a bad path, an unreachable hub or a
    4-bit storage dtype that ZeRO-3 / FSDP would train silently wrong with (accelerate#3983, axolotl#2992) fails in
    a second, not after a minute, and the user learns about every problem at once."""
    from sft.models.sources import resolve_source
    from sft.preflight import check_output_dir

    problems: list[str] = []
    if check_model:
        try:
            resolve_source(cfg.model)
        except SftError as e:
            problems.append(str(e))
    data = None
    try:
        data = open_data(cfg, rank, world)
    except SftError as e:
        problems.append(str(e))
    problems += check_output_dir(cfg)  # training.output_dir writable
    if cfg.quantization.mode == "nf4":  # ZeRO-3 / FSDP need the 4-bit weights stored as the compute dtype
        from sft.models.quantization import resolve_quant_storage

        try:
            resolve_quant_storage(cfg.quantization)
        except SftError as e:
            problems.append(str(e))
    if problems:
        raise SftError("\n".join(problems) if len(problems) == 1 else "\n  " + "\n  ".join(problems))
    return data


def prepare_base(run: Setup, given) -> Any:
    """The tokenizer; and sft's base weights written once, by rank 0, for models that load from disk (a random
    ``arch:`` model), unless the caller gave a model. Returns the tokenizer."""
    cfg = run.cfg
    tokenizer = load_tokenizer(cfg.model)
    if given is None and dist.is_main_process():
        prepare_weights(cfg.model, cfg.quantization, cfg.training.seed,
                        zero3=dist.sharded_launch() == "DeepSpeed ZeRO-3")
    dist.barrier()
    return tokenizer


@dataclass
class DataPlan:
    """How long the run trains and on what: sequences per optimizer step (per rank), the step count, the step plan
    (steps per epoch, how they were counted) and the packed train / eval datasets."""

    per_step: int
    max_steps: int
    plan: Any  # sft.data.steps.StepPlan
    train: Any  # sft.data.packing.PackedDataset
    eval: Any  # PackedDataset or None


def data_plan(run: Setup, data: RunData, tokenizer) -> DataPlan:
    """Steps per epoch (from the rows' token lengths: cached, counted once, or not needed with max_steps), the
    step count, and the packed train / eval datasets."""
    from sft.data.packing import PackedDataset
    from sft.data.steps import plan_steps

    cfg, world = run.cfg, run.info.world_size
    per_step = cfg.training.per_device_train_batch_size * cfg.training.gradient_accumulation_steps
    plan = plan_steps(cfg, tokenizer, data.train, data.eval, per_step, world)
    steps_per_epoch = plan.steps_per_epoch or 0
    if plan.steps_per_epoch is not None and steps_per_epoch < 1 and cfg.training.max_steps <= 0:
        raise DataError(
            f"data.path: one epoch of the smallest rank's share packs into fewer blocks of {cfg.data.seq_length} "
            f"tokens than one optimizer step needs ({per_step}); lower data.seq_length or the batch size, or add data"
        )
    max_steps = cfg.training.max_steps if cfg.training.max_steps > 0 else \
        math.ceil(cfg.training.num_epochs * steps_per_epoch)
    eval_ds = None
    if plan.has_eval:
        eval_ds = PackedDataset.for_source(cfg.data, tokenizer, data.eval, infinite=False)
    elif data.eval is not None and cfg.training.eval_strategy != "no" and dist.is_main_process():
        import logging

        logging.getLogger(__name__).warning("data.eval_path holds less than one block of tokens: evaluation loss "
                                            "is skipped")
    train_ds = PackedDataset.for_source(cfg.data, tokenizer, data.train, infinite=True)
    train_ds.report_overlong = plan.counting == "skipped"  # else the counting pass reported them already
    run.summary.data_counting = plan.counting
    return DataPlan(per_step, max_steps, plan, train_ds, eval_ds)


@dataclass
class Arguments:
    """The Trainer's ``TrainingArguments``, and the trackers' environment (closed when the run reports)."""

    args: Any  # transformers.TrainingArguments
    trackers: contextlib.ExitStack


def training_arguments(run: Setup, plan: DataPlan, extra: dict[str, Any] | None) -> Arguments:
    """TrainingArguments (epoch intervals become step intervals) and the trackers' environment (a context the
    caller closes at the end)."""
    from sft.trainer import tracking
    from sft.trainer.arguments import training_arguments as build_arguments

    cfg, out, max_steps = run.cfg, run.out, plan.max_steps
    steps_per_epoch, has_eval = plan.plan.steps_per_epoch or 0, plan.eval is not None

    def interval(when: str, steps: int) -> tuple[str, int]:
        # "epoch" without a counted epoch (training.max_steps skips the counting pass): once, at the last step,
        # not every step (which wrote a checkpoint and ran the evaluation after each optimizer step)
        epoch = steps_per_epoch if steps_per_epoch > 0 else max_steps
        return ("steps", max(1, epoch)) if when == "epoch" else (when, steps)

    eval_strategy, eval_steps = interval(cfg.training.eval_strategy if has_eval else "no", cfg.training.eval_steps)
    save_strategy, save_steps = interval(cfg.training.save_strategy, cfg.training.save_steps)
    args = build_arguments(cfg, out / "checkpoints", max_steps, eval_strategy, eval_steps, save_strategy,
                           save_steps, dist.device(), extra)
    args.run_name = tracking.run_name(out)  # trackers log to output_dir/logs/<run> (sft/trainer/tracking.py)
    env = contextlib.ExitStack()
    env.enter_context(tracking.environment(out, args.run_name, cfg.training.report_to))
    return Arguments(args, env)


def prepare_model(run: Setup, given, tokenizer, hooks: list) -> Any:
    """sft's base (loaded after TrainingArguments exist: under a ZeRO-3 launch they make transformers load the
    weights partitioned, so no rank ever holds the whole model) or the caller's, prepared for training. The
    resolved checkpointing decision goes into ``cfg`` (the run's resolved copy). The run hooks see it before
    training (main process)."""
    from sft.models import load_model_and_tokenizer, prepare_model as prepare_given

    cfg = run.cfg

    tokens = cfg.training.per_device_train_batch_size * cfg.data.seq_length
    if given is None:
        m, _, _ = load_model_and_tokenizer(cfg.model, cfg.lora, cfg.quantization, seed=cfg.training.seed,
                                           tokenizer=tokenizer, tokens_per_micro_batch=tokens)
    else:
        m = prepare_given(given, tokenizer, cfg.model, cfg.lora, cfg.quantization, cfg.training.seed, tokens)
    if hasattr(m, "sft_checkpointing"):
        cfg.model.gradient_checkpointing = m.sft_checkpointing  # summary.json and HFU see what ran
    if cfg.training.export_gguf:  # an architecture the exporter refuses fails now, not after training
        from sft.gguf_export import check_supported

        check_supported(m.config, quantized_ok=True)
    run.summary.trainable_params, run.summary.total_params = count_parameters(m)
    if dist.is_main_process():
        for h in hooks:
            h.before_training(m, tokenizer, run.summary)
    return m


@dataclass
class Fitted:
    """The trained Trainer, what its steps measured, and the callback that reports to the trackers."""

    trainer: Any  # sft.trainer.trainer.ShardAwareTrainer
    timer: StepTimer
    timing: dict
    metrics: TrackerMetrics


def fit(run: Setup, model, arguments: Arguments, plan: DataPlan, inputs: Inputs, callbacks: Sequence) -> Fitted:
    """Build the Trainer and train ``plan.max_steps`` optimizer steps (resumed from ``inputs.resume_point``); a
    stop signal ends the run here with :class:`sft.errors.Preempted`. Steps, tokens, timing and losses go into the
    summary."""
    cfg, info, summary = run.cfg, run.info, run.summary
    timer = StepTimer(tokens_per_step=plan.per_step * cfg.data.seq_length * info.world_size)
    losses: list[float] = []
    metrics_cb = TrackerMetrics(timer, cfg.training.report_to, cfg.data.seq_length, summary.tracked_values())
    stop_cb = preemption.StopOnSignal()
    theirs = [c for c in callbacks if not isinstance(c, RunHooks) or isinstance(c, TrainerCallback)]
    trainer = build_trainer(model, arguments.args, plan.train, plan.eval, cfg.data.position_ids,
                            [ThroughputCallback(timer, losses), metrics_cb, stop_cb, *theirs],
                            checkpoint_extras(cfg, inputs.resume_meta), inputs.resume_point)
    metrics_cb.bind(trainer)
    summary.strategy = strategy(trainer)
    if dist.is_main_process():
        print(f"strategy: {summary.strategy} ({info.world_size} rank(s))")
    t_train = time.perf_counter()
    result = run_trainer(trainer, inputs.resume_point, plan.max_steps)
    summary.train_seconds = time.perf_counter() - t_train
    if stop_cb.stopped_at is not None and stop_cb.stopped_at < plan.max_steps:  # at the last step: just finish
        _stop_preempted(stop_cb, run.out, plan.max_steps)
    timing = record_training(summary, trainer, result, timer, losses, plan.train, plan.eval, cfg.data.seq_length)
    return Fitted(trainer, timer, timing, metrics_cb)


def checkpoint_extras(cfg: RunConfig, meta: dict):
    """Files every checkpoint-N carries besides the Trainer's: sft_base.json (so `sft merge --adapter
    .../checkpoint-N` works) and what a resumed run must share with it."""
    from sft.io import atomic_write_json
    from sft.models.base_meta import write_base_meta
    from sft.trainer.checkpoint_format import RESUME_META

    def extras(directory: Path) -> None:
        write_base_meta(directory, cfg.model, cfg.quantization, cfg.training.seed)
        atomic_write_json(directory / RESUME_META, meta, fsync=True)

    return extras


def record_training(summary, trainer, result, timer: StepTimer, losses: list[float], train_ds, eval_ds,
                    seq_length: int) -> dict:
    """Steps, tokens, timing, losses, the final evaluation loss and model TFLOP/s into ``summary``."""
    summary.steps = int(result.global_step)
    summary.packing = asdict(train_ds.stats)
    summary.tokens = summary.steps * timer.tokens_per_step
    timing = timer.summary()
    summary.tokens_per_s = timing["tokens_per_s"]
    summary.first_step_s = timing["first_step_s"]
    summary.step_time_median_s = timing["step_time_median_s"]
    if losses:
        summary.loss_first, summary.loss_last, summary.loss_history = losses[0], losses[-1], losses
    if eval_ds is not None:
        last = trainer.state.log_history[-2:] if trainer.state.log_history else []
        evaluated = [h for h in last if "eval_loss" in h and h.get("step") == trainer.state.global_step]
        # the Trainer evaluated at the last step already (eval_steps divides max_steps): do not do it twice
        summary.eval_loss = evaluated[-1]["eval_loss"] if evaluated else trainer.evaluate().get("eval_loss")
        if summary.eval_loss is not None:
            summary.eval_perplexity = math.exp(min(summary.eval_loss, 700.0))  # exp overflows a float past ~709
    fpt = flops_per_token(trainer.model, seq_length, checkpointing_fraction(trainer.model))
    summary.model_tflops_per_s = fpt.model * summary.tokens_per_s / 1e12
    return timing


def save(run: Setup, fitted: Fitted, arguments: Arguments, tokenizer, hooks: list) -> None:
    """Write the adapter (output_dir/adapter) and let the run hooks see the trained model; then free the Trainer
    and leave the sharded mode, so that rank 0 can work alone."""
    out, summary = run.out, run.summary
    save_adapter(fitted.trainer, tokenizer, out / "adapter", run.cfg)
    if dist.is_main_process():
        summary.paths["adapter"] = str(out / "adapter")
        for h in hooks:
            h.after_training(fitted.trainer.model, tokenizer, summary)
    fitted.metrics.detach()
    fitted.trainer = arguments.args = None  # the Trainer, its model and arguments: freed before the merge
    gc.collect()
    # From here rank 0 works alone (merge, reload, generation): a live ZeRO-3 config would make transformers load
    # those models partitioned (zero.Init) and every forward a collective that the other ranks never join.
    leave_sharded_mode()


def merge(run: Setup, hooks: list) -> None:
    """``training.merge``: rank 0 merges the adapter into output_dir/merged (checked, reloaded by the hooks, and
    exported to GGUF when asked); the other ranks wait."""
    if run.cfg.training.merge:
        outputs.merge(run.cfg, run.out, run.summary, hooks)


def report(run: Setup, fitted: Fitted, arguments: Arguments, t_start: float) -> None:
    """The rank watchdog stops; last numbers to the trackers (then closed), training.png and summary.json; the
    stop signals are the system's again."""
    dist.stop_watchdog()
    summary = run.summary
    summary.peak_rss_gb = peak_rss_bytes() / 2**30
    summary.wall_seconds = time.perf_counter() - t_start
    after = {k: v for k, v in summary.tracked_values().items() if k not in fitted.metrics.at_start}
    fitted.metrics.finish({**after, "eval_merge_max_abs_diff": summary.merge_max_abs_diff})
    arguments.trackers.close()
    outputs.write(run.cfg, run.out, summary, fitted.metrics.history, fitted.timing)
    preemption.uninstall()


# ----------------------------------------------------------------------------------------------- helpers


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
