"""The GPU check's plan, its CPU dry run, and its run (benchmarks/gpu_check.sh is the entry point).

One command on one H100 / H200 with no network, in at most :data:`TOTAL_BUDGET_S` seconds (8 minutes), each step
under its own time limit (a step that hangs costs its budget, not the check):

  setup        CUDA visible, bitsandbytes' CUDA 13 library quantizes on the GPU, DeepSpeed imports; the Arrow data
  single-lora  gpu_single, LoRA on arch:llama-1b, train + merge (+ the merged-logits check)
  single-qlora gpu_single, QLoRA (NF4 + double quant) on arch:llama-1b, train + merge
  zero2-qlora  DeepSpeed ZeRO-2 + QLoRA, one process
  zero3-qlora  DeepSpeed ZeRO-3 + QLoRA (bf16 storage), one process
  fsdp-qlora   FSDP2 + QLoRA (bf16 storage), one process
  bench        sft bench --matrix gpu --only opt-1.3b: the seed recipe (baseline) and sft, bf16 and NF4, one run

A failed setup stops the check at once (the rest could not pass). Device time: the tool allows 15 minutes in all
and 10 a command; a machine takes 1-2 minutes to start. So the check runs as one call with ``timeout_s`` 510 (the
steps' 460 s, the wheel install and a margin), which leaves about 5 minutes for one rerun of the failed steps
(``--only a,b``; setup always runs again), each under its own limit. Results: at most :data:`MAX_RESULT_FILES` files
directly under OUTDIR (gpu.txt, gpu_check_plan.md, gpu_check.jsonl, gpu_check.md, logs.tar.gz with every log,
summary and the bench's results), what the device tool brings back (8 files, 2 folders deep).

The dry run (``gpu_check.sh --dry-run OUTDIR [CARRY]``, CPU, in CI) does everything but the CUDA launches: checks the
carry (size, wheels and their RECORDs, the tokenizer), builds the data with Deep Lake unimportable, resolves every
accelerate config with accelerate's own launch code into the environment each step's processes get, loads each
step's sft config under that environment (quant storage, strategy), and writes the plan with each step's budget.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: The whole check, setup included, must fit in this (the device tool allows 10 minutes a command, 15 in all).
TOTAL_BUDGET_S = 480
#: Files the check leaves directly under OUTDIR (the device tool brings back 8).
MAX_RESULT_FILES = 5
MODEL = "arch:llama-1b"
TRAIN_ROWS, EVAL_ROWS = 2000, 32

#: name: (accelerate config, seconds allowed, strategy the summary must report, extra overrides)
TRAIN_STEPS = {
    "single-lora": ("gpu_single.yaml", 60, "single", []),
    "single-qlora": ("gpu_single.yaml", 60, "single", ["quantization.mode=nf4"]),
    "zero2-qlora": ("gpu_deepspeed_zero2.yaml", 75, "deepspeed-zero2", ["quantization.mode=nf4"]),
    "zero3-qlora": ("gpu_deepspeed_zero3_qlora.yaml", 75, "deepspeed-zero3", ["quantization.mode=nf4"]),
    "fsdp-qlora": ("gpu_fsdp_qlora.yaml", 60, "fsdp2", ["quantization.mode=nf4"]),
}
SETUP_BUDGET_S, BENCH_BUDGET_S = 30, 100
BENCH_ARGS = ["--matrix", "gpu", "--only", "opt-1.3b", "--steps", "5", "--warmup", "2", "--repeat", "1",
              "--no-warmup-cell", "--no-progress", "--peak-seconds", "1", "--cell-timeout", "60"]

SETUP_CODE = """
import sys, torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
import bitsandbytes as bnb, bitsandbytes.functional as F
w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
p, s = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True, quant_storage=torch.bfloat16)
err = (F.dequantize_4bit(p, s) - w).abs().max().item()
assert err < 1.0, err
import deepspeed
print("setup: cuda", torch.version.cuda, torch.cuda.get_device_name(0), "bnb", bnb.__version__, "deepspeed",
      deepspeed.__version__, "nf4 max err", round(err, 4))
"""

DATA_CODE = """
import random, sys
sys.modules["deeplake"] = None  # the GPU machine has no deeplake: the check's data path must not need it
from sft.data.arrow import write_arrow_dataset
from sft.data.source import ShardedSource
words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
def rows(n, seed):
    r = random.Random(seed)
    return [{"question": " ".join(r.choice(words) for _ in range(r.randint(5, 60))),
             "answer": " ".join(r.choice(words) for _ in range(r.randint(5, 200))), "source": "gpu"} for _ in range(n)]
out, n_train, n_eval = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import os
for name, n, seed in (("train", n_train, 1), ("eval", n_eval, 2)):
    if not os.path.exists(f"{out}/{name}"):
        write_arrow_dataset(f"{out}/{name}", rows(n, seed))
    assert ShardedSource(f"{out}/{name}").total_rows == n
print("data:", out, n_train, "+", n_eval, "rows (Arrow)")
"""


@dataclass
class Step:
    name: str
    budget_s: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    config: str | None = None
    strategy: str | None = None
    overrides: list[str] = field(default_factory=list)


def train_overrides(data: Path, work: Path, name: str, extra: list[str]) -> list[str]:
    return [f"model.name={MODEL}", "model.dtype=bf16-mixed", "demo.generate=false", f"data.path={data / 'train'}",
            f"data.eval_path={data / 'eval'}", "data.seq_length=1024", "training.per_device_train_batch_size=4",
            "training.per_device_eval_batch_size=4", "training.max_steps=10", "training.eval_strategy=steps",
            "training.eval_steps=10", "training.save_strategy=no", "demo.accuracy_samples=0",
            "training.logging_steps=5", "training.progress=false", "training.allocator=system",
            f"training.output_dir={work / name}", *extra]


def plan(work: Path, python: str = "python3") -> list[Step]:
    """Every step of the check, with its command line and time limit."""
    data = work / "data"
    steps = [Step("setup", SETUP_BUDGET_S, [python, "-c", SETUP_CODE])]
    for name, (config, budget, strategy, extra) in TRAIN_STEPS.items():
        ov = train_overrides(data, work, name, extra)
        steps.append(Step(name, budget, [python, "-m", "accelerate.commands.launch", "--config_file",
                                         f"configs/accelerate/{config}", "--num_processes", "1",
                                         "-m", "sft.cli", "train", *ov], config=config, strategy=strategy,
                          overrides=ov))
    steps.append(Step("bench", BENCH_BUDGET_S, [python, "-m", "benchmarks.cli", *BENCH_ARGS, "--results-dir",
                                                str(work / "bench")]))
    return steps


def total_budget(steps: list[Step]) -> int:
    return sum(s.budget_s for s in steps)


def plan_markdown(steps: list[Step]) -> str:
    lines = [f"GPU check plan: {len(steps)} steps, {total_budget(steps)} s of {TOTAL_BUDGET_S} s allowed", "",
             "| step | seconds allowed | command |", "|---|---|---|"]
    for s in steps:
        cmd = " ".join(shlex.quote(a) for a in s.argv) if s.name != "setup" else "python3 -c SETUP_CODE (CUDA, bnb NF4, deepspeed)"
        lines.append(f"| {s.name} | {s.budget_s} | `{cmd}` |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- dry run


def resolve_launch(config: str, num_processes: int = 1) -> tuple[str, dict[str, str]]:
    """What ``accelerate launch --config_file CONFIG --num_processes N`` decides, with accelerate's own code: the
    launcher and the environment it gives the training processes (only what differs from this one)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import prepare_deepspeed_cmd_env, prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(REPO / "configs" / "accelerate" / config),
                                               "--num_processes", str(num_processes), "-m", "sft.cli", "train"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config.keys()) if defaults else []
        args.deepspeed_fields_from_accelerate_config = ",".join(fields + (["mixed_precision"] if mp_from_config else []))
        launcher, (_, env) = "deepspeed", prepare_deepspeed_cmd_env(args)
    elif args.use_fsdp or args.multi_gpu:
        launcher, env = ("fsdp" if args.use_fsdp else "multi_gpu"), prepare_multi_gpu_env(args)
    else:
        launcher, (_, env) = "simple", prepare_simple_launcher_cmd_env(args)
    return launcher, {k: str(v) for k, v in env.items() if os.environ.get(k) != str(v)}


@contextlib.contextmanager
def _environment(extra: dict[str, str]):
    saved = dict(os.environ)
    os.environ.update(extra)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def check_step_config(step: Step) -> tuple[str, list[str]]:
    """Resolve a training step's launch and load its sft config under that launch's environment: (one line, problems)."""
    from sft.config.load import load_config
    from sft.distributed import sharded_launch
    from sft.models.quantization import resolve_quant_storage

    problems = []
    launcher, env = resolve_launch(step.config)
    env = {k: (str(REPO / v) if k == "ACCELERATE_DEEPSPEED_CONFIG_FILE" and not os.path.isabs(v) else v)
           for k, v in env.items()}
    with _environment(env):
        cfg = load_config(None, step.overrides)
        sharded = sharded_launch()
        storage = resolve_quant_storage(cfg.quantization) if cfg.quantization.mode == "nf4" else None
    want_sharded = {"deepspeed-zero3": "DeepSpeed ZeRO-3", "fsdp2": "FSDP"}.get(step.strategy)
    if sharded != want_sharded:
        problems.append(f"{step.name}: {step.config} resolves to sharded launch {sharded!r}, expected {want_sharded!r}")
    if step.strategy == "fsdp2" and env.get("FSDP_VERSION") != "2":
        problems.append(f"{step.name}: {step.config} gives FSDP_VERSION={env.get('FSDP_VERSION')}, expected 2")
    if step.strategy.startswith("deepspeed"):
        ds_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
        stage = json.loads(Path(ds_file).read_text())["zero_optimization"]["stage"] if ds_file else None
        if f"deepspeed-zero{stage}" != step.strategy:
            problems.append(f"{step.name}: {step.config} -> DeepSpeed config {ds_file} stage {stage}")
    if sharded and storage not in (None, cfg.quantization.compute_dtype):
        problems.append(f"{step.name}: 4-bit storage {storage} under {sharded}")
    keys = sorted(k for k in env if k.startswith(("ACCELERATE_USE", "ACCELERATE_DEEPSPEED_CONFIG", "FSDP_VERSION")))
    line = (f"{step.name}: launcher {launcher}, {', '.join(f'{k}={env[k]}' for k in keys) or 'no distributed env'}; "
            f"sharded {sharded or 'no'}; quantization {cfg.quantization.mode}"
            + (f", storage {storage}" if storage else ""))
    return line, problems


def dry_run(out: Path, carry: Path) -> int:
    from benchmarks.gpu_carry import check_carry, verify_records
    from benchmarks.matrix import load_matrix

    work = Path(os.environ.get("SFT_GPU_WORK", "/tmp/sft-gpu"))
    out.mkdir(parents=True, exist_ok=True)
    steps = plan(work)
    problems: list[str] = []
    report: list[str] = []

    total, carry_problems = check_carry(carry)
    problems += carry_problems + verify_records(carry)
    report.append(f"carry: {carry}, tree + carry {total / 2**20:.1f} MiB")
    site = work / "site-dryrun"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index",
                          "--no-deps", "--no-compile", "--upgrade", "--target", str(site), "--only-binary=:all:",
                          "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_24_x86_64",
                          "--platform", "manylinux_2_17_x86_64", "--platform", "any",
                          *map(str, sorted(carry.glob("*.whl")))], capture_output=True, text=True)
    if pip.returncode:
        problems.append(f"the carried wheels do not install for Python 3.12: {pip.stderr[-1500:]}")
    else:
        report.append(f"wheels: {len(list(carry.glob('*.whl')))} install for cp312 into {site}")
        libs = sorted(p.name for p in (site / "bitsandbytes").glob("libbitsandbytes_*.so"))
        report.append(f"bitsandbytes libraries: {', '.join(libs)}")

    data = subprocess.run([sys.executable, "-c", DATA_CODE, str(work / "data"), str(TRAIN_ROWS), str(EVAL_ROWS)],
                          cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if data.returncode:
        problems.append(f"building the data failed: {data.stderr[-1500:]}")
    else:
        report.append(data.stdout.strip())

    from transformers import AutoTokenizer

    from sft.models.architectures import ARCHITECTURES

    tok = AutoTokenizer.from_pretrained(str(carry / "tokenizer"))
    for arch in ("llama-1b", "opt-1.3b"):
        if len(tok) > ARCHITECTURES[arch]["vocab_size"]:
            problems.append(f"the carried tokenizer ({len(tok)} ids) is larger than {arch}'s vocabulary")
    report.append(f"tokenizer: {len(tok)} ids, from {carry / 'tokenizer'} (SFT_ARCH_TOKENIZER)")

    for s in steps:
        if s.config:
            try:
                line, p = check_step_config(s)
            except Exception as e:  # accelerate or sft refused the config: that is the finding
                line, p = f"{s.name}: {type(e).__name__}: {e}", [f"{s.name}: {type(e).__name__}: {e}"]
            report.append(line)
            problems += p
    matrix = load_matrix("gpu", steps=5, warmup=2)
    cells = [c for c in matrix.cells if "opt-1.3b" in c.label()]
    report.append(f"bench: {len(cells)} cells: {'; '.join(c.label() for c in cells)}")
    if not cells:
        problems.append("bench: no opt-1.3b cell in the gpu matrix")

    if total_budget(steps) > TOTAL_BUDGET_S:
        problems.append(f"the steps' budgets sum to {total_budget(steps)} s, over {TOTAL_BUDGET_S} s")
    md = plan_markdown(steps)
    (out / "gpu_check_plan.md").write_text(md + "\n" + "\n".join(f"- {r}" for r in report) + "\n")
    print(md)
    print("\n".join(report))
    for p in problems:
        print("PROBLEM:", p, file=sys.stderr)
    print(f"dry run: {'FAILED, ' + str(len(problems)) + ' problem(s)' if problems else 'ok'}")
    return 1 if problems else 0


# ----------------------------------------------------------------------------------------------- the run


def _run_step(step: Step, log: Path, env: dict[str, str]) -> tuple[int, float]:
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(step.argv, cwd=REPO, env={**env, **step.env}, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=step.budget_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # accelerate's launcher and every rank under it
            proc.wait()
            rc = 124
            f.write(f"\ngpu_check: {step.name} stopped after its {step.budget_s} s\n")
    return rc, time.monotonic() - t0


def run(out: Path, only: list[str] | None = None) -> int:
    work = Path(os.environ.get("SFT_GPU_WORK", "/tmp/sft-gpu"))
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    steps = [s for s in plan(work) if not only or s.name in only or s.name == "setup"]
    (out / "gpu_check_plan.md").write_text(plan_markdown(steps))
    env = dict(os.environ)
    data = subprocess.run([sys.executable, "-c", DATA_CODE, str(work / "data"), str(TRAIN_ROWS), str(EVAL_ROWS)],
                          cwd=REPO, capture_output=True, text=True)
    rows = []
    failed = 0
    for s in steps:
        rc, secs = _run_step(s, logs / f"{s.name}.log", env)
        if s.name == "setup" and data.returncode:
            rc = rc or data.returncode
            (logs / "setup.log").open("a").write(data.stdout + data.stderr)
        row = {"run": s.name, "exit": rc, "seconds": round(secs, 1), "budget_s": s.budget_s}
        summary = work / s.name / "summary.json"
        if s.strategy and rc == 0 and summary.exists():
            sm = json.loads(summary.read_text())["summary"]
            row.update({k: sm.get(k) for k in ("strategy", "tokens_per_s", "peak_rss_gb", "eval_loss",
                                               "merge_max_abs_diff", "loss_first", "loss_last", "model_tflops_per_s")})
            if sm.get("strategy") != s.strategy:
                row["exit"] = rc = 3
                row["problem"] = f"ran {sm.get('strategy')}, expected {s.strategy}"
        if rc:
            failed += 1
            row["tail"] = (logs / f"{s.name}.log").read_text(errors="replace")[-1500:]
        rows.append(row)
        with open(out / "gpu_check.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "tail"}), flush=True)
        if s.name == "setup" and rc:
            print("gpu_check: setup failed; the other steps cannot pass, stopping", flush=True)
            break
    lines = ["| step | exit | strategy | tokens/s | eval loss | merge check | s (allowed) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda v, fmt: "" if v is None else format(v, fmt)  # noqa: E731
        lines.append(f"| {r['run']} | {r['exit']} | {r.get('strategy') or ''} | {f(r.get('tokens_per_s'), ',.0f')} | "
                     f"{f(r.get('eval_loss'), '.4f')} | {f(r.get('merge_max_abs_diff'), '.2e')} | "
                     f"{r['seconds']} ({r['budget_s']}) |")
    gpu = (out / "gpu.txt").read_text() if (out / "gpu.txt").exists() else ""
    (out / "gpu_check.md").write_text(gpu + "\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        tar.add(logs, arcname="logs")
        for s in steps:
            if (work / s.name / "summary.json").exists():
                tar.add(work / s.name / "summary.json", arcname=f"summaries/{s.name}.summary.json")
        if (work / "bench").exists():
            tar.add(work / "bench", arcname="bench")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check")
    p.add_argument("mode", choices=["plan", "dry-run", "run"])
    p.add_argument("out", type=Path)
    p.add_argument("carry", type=Path, nargs="?", default=REPO / ".whl")
    p.add_argument("--only", default="", help="comma-separated step names (a rerun of the failed ones)")
    a = p.parse_args(argv)
    if a.mode == "plan":
        print(plan_markdown(plan(Path("/tmp/sft-gpu"))))
        return 0
    if a.mode == "dry-run":
        return dry_run(a.out, a.carry)
    return run(a.out, [s for s in a.only.split(",") if s] or None)


if __name__ == "__main__":
    sys.exit(main())
