"""`sft` command line: thin wrappers that parse arguments and call the library.

    sft train [--config demo|PATH] [section.key=value ...]
    sft ingest FILE [FILE ...] --out PATH [--map question=instruction answer=output]
    sft merge --adapter DIR --out DIR
    sft generate --model DIR|NAME --prompt TEXT
    sft export --model DIR --gguf OUT.gguf [--type f32|f16|bf16|q8_0]
    sft plan / sft launch      (launch topology, see launch/)
    sft bench                  (benchmarks, see benchmarks/)

Errors in the user's input (sft.errors.SftError) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _quiet_environment() -> None:
    """No telemetry, no surprise network calls, no tokenizer fork warnings, no deprecation noise from the
    libraries' own internals (peft still calls transformers' deprecated checkpointing helpers)."""
    import warnings

    for module in ("transformers", "peft", "accelerate", "torch"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # deeplake 4.7 reads no telemetry variable (this one is for other versions): its telemetry client has no
    # endpoint unless one is configured, which tests/test_network.py checks.
    os.environ.setdefault("DEEPLAKE_TELEMETRY", "0")
    os.environ.setdefault("BNB_DISABLE_KERNELS_HUB", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in _KERNEL_HUB_LOGGERS:
        logging.getLogger(name).addFilter(_offline_kernel_hub_notes)
    logging.getLogger("DeepSpeed").addFilter(_deepspeed_cpu_note)


#: bitsandbytes 0.50 on a CPU with AVX512-BF16 asks the Hub for a CPU NF4 kernel (kernels-community) as it is
#: imported, which peft does in every run. In sft's offline mode that fails with two WARNING lines on every run
#: (the `kernels` package's and bitsandbytes'), about nothing the user asked for or can act on: bitsandbytes then
#: uses its own CPU kernels. BNB_DISABLE_KERNELS_HUB above is what older versions read; 0.50.2 reads no switch.
_KERNEL_HUB_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")


#: Set by ``sft train`` once its config is read: whether the run loads a 4-bit base (bitsandbytes' kernels matter).
_RUN_USES_BNB = True


def _offline_kernel_hub_notes(record: logging.LogRecord) -> bool:
    """Logging filter: drop the kernels-community notes while the Hub is offline, and on runs that load no 4-bit
    base (bitsandbytes is only imported there because peft imports it); a QLoRA run online keeps them."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("", "0", "false", "no")
    return not ((offline or not _RUN_USES_BNB) and "kernels-community" in record.getMessage())


def _deepspeed_cpu_note(record: logging.LogRecord) -> bool:
    """Logging filter: DeepSpeed, imported by transformers / accelerate in every run where it is installed, warns
    "Setting accelerator to CPU" on CPU machines; that concerns DeepSpeed launches only (ACCELERATE_USE_DEEPSPEED)."""
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").strip().lower() in ("1", "true", "yes")
    return deepspeed or "Setting accelerator to CPU" not in record.getMessage()


def _offline_unless_hub(*names: str | None) -> None:
    """No surprise network: the Hugging Face libraries run offline (HF_HUB_OFFLINE=1) unless one of ``names`` is a
    hub id, i.e. unless the config asks for a remote model. Called before they are imported (they read the variable
    at import). A user's own HF_HUB_OFFLINE wins."""
    from sft.models.sources import is_hub_id

    if not any(is_hub_id(n) for n in names):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _clip(text: str | None, limit: int = 300) -> str:
    """A user's question or answer can be pages long: the summary shows its start."""
    text = text or ""
    return text if len(text) <= limit else text[:limit].rstrip() + " ..."


def print_summary(s) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="sft train: summary", show_header=False)
    t.add_column("metric", style="bold")
    t.add_column("value")
    t.add_row("steps", str(s.steps))
    t.add_row("tokens", f"{s.tokens:,}")
    t.add_row("tokens/s", f"{s.tokens_per_s:,.0f}  ({s.world_size} rank(s), backend {s.backend})")
    t.add_row("model TFLOP/s", f"{s.model_tflops_per_s:.3f}")
    t.add_row("train time", f"{s.train_seconds:.1f} s (first step {s.first_step_s:.1f} s)")
    if len(s.loss_history) > 1:
        t.add_row("loss", f"{s.loss_first:.4f} -> {s.loss_last:.4f}  ({len(s.loss_history)} logged steps)")
    elif s.loss_history:
        t.add_row("loss", f"{s.loss_first:.4f}  (one logged step)")
    if s.eval_loss is not None:
        t.add_row("eval loss", f"{s.eval_loss:.4f}  (perplexity {s.eval_perplexity:,.2f})")
    t.add_row("peak RSS", f"{s.peak_rss_gb:.2f} GiB (rank 0, {s.allocator} malloc)")
    t.add_row("trainable params", f"{s.trainable_params:,} of {s.total_params:,} ({s.trainable_percent:.3f}%)")
    hook = s.extra.get  # the run hooks' fields: the demo's accuracy (sft.demo), the first answer (FirstAnswer)
    before, after, merged = hook("accuracy_before"), hook("accuracy_after"), hook("accuracy_merged")
    if before is not None or after is not None:
        gain = ""
        if before is not None and after is not None:
            gain = f"  ({100 * (after - before):+.1f} points)"
        t.add_row("held-out accuracy", f"{_fmt_pct(before)} -> {_fmt_pct(after)}{gain}")
    if merged is not None:
        t.add_row("merged accuracy", f"{_fmt_pct(merged)}  (the merged model, reloaded from disk)")
    if s.merge_max_abs_diff is not None:
        t.add_row("merge check", f"max |logit diff| {s.merge_max_abs_diff:.2e}")
    if hook("sample_question"):
        who = "merged model" if "merged" in s.paths else "trained model"
        t.add_row(who, f"Q: {_clip(hook('sample_question'))}\nA: {_clip(hook('sample_answer'))}")
    for k, v in s.paths.items():
        t.add_row(f"{k}", v)
    if "gguf" in s.paths:
        from pathlib import Path

        from sft.gguf_export import run_lines

        t.add_row("run the GGUF", "\n".join(run_lines(Path(s.paths["gguf"]))))
    t.add_row("wall time", f"{s.wall_seconds:.1f} s")
    Console().print(t)


def cmd_train(args: argparse.Namespace) -> int:
    from sft.config import describe_fields, load_config

    if args.help_config:
        print(describe_fields())
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.process_entry:  # the whole process is ours: start it again on the configured allocator (sft.allocator)
        from sft.allocator import reexec_with

        reexec_with(cfg.training.allocator)
    _offline_unless_hub(cfg.model.name, cfg.model.tokenizer)
    global _RUN_USES_BNB
    _RUN_USES_BNB = cfg.quantization.mode != "none"
    if "wandb" not in cfg.training.report_to:
        os.environ.setdefault("WANDB_MODE", "disabled")  # off unless the config asks for it
    from sft import demo, distributed as dist
    from sft.generation import FirstAnswer
    from sft.recipe import train

    # launch problems stop here, before the demo writes anything: a launch that started 1 of N ranks, a
    # deepspeed_config_file that is not where the launch says
    dist.check_launch(dist.dist_info())
    dist.resolve_deepspeed_config_file()
    # the demo task plugs in through the public API: its data, and its exact-match accuracy as run hooks; any
    # other run with an eval set shows the trained model's answer to its first question
    if cfg.demo.generate:
        demo.prepare_data(cfg, users=_datasets_given(args.overrides))
    hooks = demo.hooks(cfg) or ([FirstAnswer(cfg)] if cfg.data.eval_path else [])
    try:
        summary = train(cfg, callbacks=hooks)
    except KeyboardInterrupt:
        if dist.is_main_process():
            print(interrupted_message(cfg.training.output_dir, args.overrides, args.config), file=sys.stderr)
        return 130
    if dist.is_main_process():
        print_summary(summary)
    return 0


def interrupted_message(output_dir: str, overrides: list[str], config: str | None) -> str:
    """What Ctrl-C leaves: the last complete checkpoint (or none), and the command that continues the run."""
    import shlex
    from pathlib import Path

    from sft.distributed import dist_info
    from sft.trainer.checkpoint_format import latest_complete

    ckpt = latest_complete(Path(output_dir) / "checkpoints", warn=False)
    kept = [o for o in overrides if o.split("=", 1)[0].strip() not in ("training.resume", "resume")]
    argv = ["sft", "train", *(["--config", config] if config else []), *kept, "training.resume=auto"]
    where = (f"the last complete checkpoint is {ckpt}" if ckpt is not None
             else "no checkpoint was complete yet, so a resumed run starts from step 0")
    launched = "" if dist_info().world_size <= 1 else " (under the same launcher: accelerate launch / sft launch ...)"
    return f"interrupted: {where}. Continue with{launched}:\n  {shlex.join(argv)}"


def _datasets_given(overrides: list[str]) -> set[str]:
    """The dataset fields (data.path, data.eval_path) set on the command line, unless demo.generate is set there
    too: those name the user's own data, which the demo config's demo.generate must not write the demo task into."""
    from sft.config.load import apply_overrides

    given = apply_overrides({}, overrides)
    if "generate" in given.get("demo", {}):
        return set()
    return {f"data.{k}" for k in ("path", "eval_path") if k in given.get("data", {})}


def _parse_map(items: list[str] | None) -> dict[str, str]:
    from sft.errors import ConfigError

    mapping: dict[str, str] = {}
    for item in items or []:
        target, sep, field_name = item.partition("=")
        if not sep or not target or not field_name:
            raise ConfigError(f"--map {item!r}: expected TARGET=FIELD, e.g. --map question=instruction answer=output")
        if target not in ("question", "answer", "source", "messages"):
            raise ConfigError(f"--map {item!r}: target must be question, answer, source or messages")
        mapping[target] = field_name
    return mapping


def cmd_ingest(args: argparse.Namespace) -> int:
    _offline_unless_hub()  # ingest never needs the hub (a saved HF dataset is read from disk)
    from sft.data.ingest import RECORD_FORMATS, ingest

    file_fmt = record_fmt = None
    for f in args.format or []:  # --format names a file format, a record format, or one of each
        if f in RECORD_FORMATS:
            record_fmt = f
        else:
            file_fmt = f
    report = ingest(args.inputs, args.out, mapping=_parse_map(args.map), fmt=file_fmt, split=args.split,
                    overwrite=args.overwrite, record_format=record_fmt, on_bad_row=args.on_bad_row, creds=args.creds)
    print(report.summary())  # rows per input, and notes: ignored fields, truncated conversations
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from sft.merging import merge_adapter, recorded_base

    _offline_unless_hub(args.base or recorded_base(args.adapter))
    r = merge_adapter(args.adapter, args.out, overwrite=args.overwrite, base_override=args.base,
                      check=False if args.no_check else "auto", method=args.method)
    check = (f"logits check: max |diff| {r.max_abs_diff:.2e} (max |logit| {r.max_abs_logit:.1f})" if r.checked
             else "logits check skipped")
    print(f"merged {args.adapter} into {r.out} ({r.dtype}, {r.seconds:.1f} s); {check}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    p = Path(args.model).expanduser()
    if (p / "adapter_config.json").is_file():
        from sft.merging import recorded_base

        _offline_unless_hub(recorded_base(p))
    else:
        _offline_unless_hub(args.model)
    if p.is_dir() and (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        from sft.models import check_safetensors

        check_safetensors(p, "--model")  # a model dir is loaded directly: refuse pickled weights up front
    from sft.data.formatting import prompt_text
    from sft.generation import generate_texts, load_for_generation

    model, tokenizer, what = load_for_generation(args.model)
    prompts = args.prompt if args.raw else [prompt_text(tokenizer, p, args.template) for p in args.prompt]
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                           add_special_tokens=args.raw or args.template == "default")
    for p, text in zip(args.prompt, texts):
        print(f"[{what}] {p}\n{text.strip()}\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    _offline_unless_hub()  # a local model directory only
    from sft.gguf_export import export_gguf, run_lines, write_modelfile

    r = export_gguf(args.model, args.gguf, args.type, overwrite=args.overwrite)
    print(f"wrote {r.path} ({r.architecture}, {r.type}, {r.tensors} tensors, {r.bytes / 2**20:.1f} MiB, "
          f"{r.seconds:.1f} s)")
    modelfile, template = write_modelfile(Path(args.model), Path(r.path), args.template)
    print(f"wrote {modelfile} (Ollama; TEMPLATE: the {template} training prompt)")
    for line in run_lines(Path(r.path), modelfile):
        print(f"  {line}")
    return 0


#: Entry-point group through which tools built on sft add subcommands (launch/ adds plan and launch, benchmarks/
#: adds bench; see pyproject.toml). The library never imports them: they depend on sft, not the reverse.
COMMANDS_GROUP = "sft.commands"


def _add_plugin_commands(sub) -> None:
    """Register each ``sft.commands`` entry point: a function ``register(subparsers)`` that adds its subcommands.
    One that cannot be imported (a trimmed install) is left out, with a debug line."""
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as e:
            logging.getLogger(__name__).debug("sft: subcommands %s not available: %s", ep.name, e)
            continue
        register(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sft", description="LoRA / QLoRA fine-tuning on Xeon CPUs and NVIDIA GPUs")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune (default: the embedded demo)")
    p.add_argument("--config", "-c", default=None, help="train YAML or a shipped name (demo, opt-1.3b-lima, ...)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its documentation")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. training.max_steps=20")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("ingest", help="JSONL / CSV / Parquet / HF dataset -> Deep Lake (question, answer, source)")
    p.add_argument("inputs", nargs="+", help="input files (or a datasets.save_to_disk directory)")
    p.add_argument("--out", required=True, help="Deep Lake dataset path to create")
    p.add_argument("--map", nargs="*", metavar="TARGET=FIELD",
                   help="field mapping, e.g. question=instruction answer=output; a+b joins fields: "
                        "question=instruction+input")
    p.add_argument("--format", action="append", metavar="FORMAT",
                   choices=["jsonl", "json", "csv", "tsv", "parquet", "hf", "qa", "alpaca", "chat", "sharegpt",
                            "lima"],
                   help="override detection: a file format (jsonl, json, csv, tsv, parquet, hf) and/or a record "
                        "format (qa, alpaca, chat, sharegpt, lima); repeat for both")
    p.add_argument("--creds", metavar="JSON_FILE",
                   help="credentials for an s3:// --out (aws_access_key_id, aws_secret_access_key, endpoint_url, "
                        "aws_region); default: the AWS_* environment variables")
    p.add_argument("--on-bad-row", choices=["fail", "skip"], default="fail",
                   help="fail: report every bad row and write nothing (default); skip: write the good rows")
    p.add_argument("--split", help="split of a saved DatasetDict (default: train)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("merge", help="merge a LoRA adapter into its base -> a standalone model")
    p.add_argument("--adapter", required=True, help="adapter directory (output_dir/adapter or a checkpoint)")
    p.add_argument("--out", required=True, help="directory for the merged model")
    p.add_argument("--base", help="base model to use instead of the one recorded with the adapter")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-check", action="store_true", help="skip the reload-and-compare-logits self-check")
    p.add_argument("--method", choices=["auto", "shards", "model"], default="auto",
                   help="shards: stream the base's safetensors shard by shard (small memory); model: whole model")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("generate", help="generate from a merged model, an adapter dir or any model source")
    p.add_argument("--model", required=True, help="merged model dir, adapter dir, or a model.name value")
    p.add_argument("--prompt", required=True, nargs="+", help="question(s)")
    p.add_argument("--template", default="default", choices=["default", "chat"], help="prompt template")
    p.add_argument("--raw", action="store_true", help="feed the prompt as is, without the template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="write a merged Llama / Mistral / Qwen2 model as one GGUF (llama.cpp, Ollama)")
    p.add_argument("--model", required=True, help="merged model directory (output_dir/merged)")
    p.add_argument("--gguf", required=True, help="the .gguf file to write")
    p.add_argument("--type", default="f16", choices=["f32", "f16", "bf16", "q8_0"],
                   help="weight type of the matrices (norms stay f32); q8_0: 8-bit blocks, ~1.06 bytes per weight")
    p.add_argument("--template", choices=["default", "chat"],
                   help="prompt format the model was trained on, for the Modelfile's TEMPLATE (default: the run's "
                        "data.template from summary.json beside the merged model, else default)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --gguf file")
    p.set_defaults(func=cmd_export)

    _add_plugin_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_environment()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.process_entry = argv is None  # run as a program (sft ..., python -m sft.cli), not called from Python
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from sft.errors import EXIT_PREEMPTED, Preempted, SftError

    try:
        return args.func(args)
    except Preempted as e:  # SIGTERM / SIGUSR1 (sft.trainer.preemption): checkpoint written, rerun to continue
        print(f"preempted: {e}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except SftError as e:
        print(f"error: {e}", file=sys.stderr)
        from sft.data.creds import abandoned_calls

        if abandoned_calls():  # a Deep Lake call still in flight crashes a normal shutdown (sft.data.creds)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
