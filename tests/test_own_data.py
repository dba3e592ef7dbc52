"""A user on their own data (issue 36): no demo setting leaks into a run on the user's data, LIMA's JSONL ingests
as it is, launches start the ranks they ask for, nothing is overwritten or written before an input error, and the
messages a user reads say what happened and what to type next.

Each test runs what a user runs (the CLI in a subprocess, in a fresh working directory) or the function that decides
the behaviour, and asserts on files, numbers and messages."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sft.config import from_dict, load_config
from sft.data.ingest import ingest, write_dataset

REPO = Path(__file__).resolve().parent.parent
SFT = [sys.executable, "-m", "sft.cli"]
TINY = ["model.name=arch:tiny-llama", "model.dtype=fp32", "data.seq_length=64",
        "training.per_device_train_batch_size=2", "training.progress=false"]


def env(**extra: str) -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
             PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.pop("ACCELERATE_USE_DEEPSPEED", None)
    e.update(extra)
    return e


def sft(*args: str, cwd: Path, timeout: int = 600, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SFT, *map(str, args)], cwd=cwd, env=env(**extra), capture_output=True, text=True,
                          timeout=timeout)


def rows(n: int, seed: int) -> list[dict]:
    import random

    r = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    return [{"question": f"q{seed}-{i} " + " ".join(r.choice(words) for _ in range(6)),
             "answer": " ".join(r.choice(words) for _ in range(12)), "source": "mine"} for i in range(n)]


@pytest.fixture(scope="module")
def user_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("user-data")
    write_dataset(str(d / "train"), rows(48, 1), progress=False)
    write_dataset(str(d / "eval"), rows(8, 2), progress=False)
    return d


# ------------------------------------------------------------------------------ 1. no demo in a user's run


def test_naming_own_data_starts_from_the_library_defaults():
    own = load_config(None, ["data.path=mine/train"])
    assert own == from_dict({"data": {"path": "mine/train"}})  # every other setting: the documented default
    assert own.training.output_dir == "outputs/run" and own.demo.accuracy_samples == 0 and not own.demo.generate
    assert own.data.eval_path is None and own.data.seq_length == 1024
    # no data named: the embedded demo, as `sft train` with no arguments has always run
    demo = load_config(None, [])
    assert demo.training.output_dir == "outputs/demo" and demo.demo.generate and demo.demo.accuracy_samples > 0
    # an explicit config is that config, with the user's data
    assert load_config("demo", ["data.path=mine/train"]).training.output_dir == "outputs/demo"


@pytest.mark.slow
def test_user_data_run_reports_the_users_eval_and_never_the_demo(tmp_path, user_data):
    first_question = rows(8, 2)[0]["question"]
    p = sft("train", *TINY, f"data.path={user_data / 'train'}", f"data.eval_path={user_data / 'eval'}",
            "training.max_steps=3", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout + p.stderr
    assert not (tmp_path / "outputs" / "demo").exists()  # nothing of the demo's
    assert "held-out accuracy" not in out and "ledger" not in out
    s = json.loads((tmp_path / "outputs" / "run" / "summary.json").read_text())["summary"]
    assert s["eval_loss"] is not None and s["eval_perplexity"] == pytest.approx(math.exp(s["eval_loss"]))
    assert s["sample_question"] == first_question and s["sample_answer"] is not None
    assert f"perplexity {s['eval_perplexity']:,.2f}" in out and "eval loss" in out
    assert "(one logged step)" in out and "->" not in out.split("loss", 1)[1].split("\n", 1)[0]
    # training.save_strategy's default (epoch) without a counted epoch: one checkpoint at the end, not one a step
    assert sorted(x.name for x in (tmp_path / "outputs" / "run" / "checkpoints").iterdir()) == ["checkpoint-3"]
    # no DeepSpeed note on a run that is not a DeepSpeed launch
    assert "Setting accelerator to CPU" not in out

    # 5. the finished run is not replaced: refused before the model loads, naming both ways on
    before = (tmp_path / "outputs" / "run" / "summary.json").stat().st_mtime_ns
    again = sft("train", *TINY, f"data.path={user_data / 'train'}", "training.max_steps=3", cwd=tmp_path)
    assert again.returncode == 2
    assert "holds a finished run" in again.stderr and "training.resume=auto" in again.stderr
    assert "training.overwrite=true" in again.stderr and "Traceback" not in again.stderr
    assert (tmp_path / "outputs" / "run" / "summary.json").stat().st_mtime_ns == before


def test_output_dir_with_an_earlier_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    from sft.preflight import check_output_dir

    out = tmp_path / "run"
    cfg = from_dict({"data": {"path": "x"}, "training": {"output_dir": str(out)}})
    assert check_output_dir(cfg) == []  # new directory
    (out / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    assert "an unfinished run (checkpoints)" in check_output_dir(cfg)[0]
    (out / "summary.json").write_text("{}")
    assert "a finished run" in check_output_dir(cfg)[0]
    for switch in ({"resume": "auto"}, {"overwrite": True}):
        ok = from_dict({"data": {"path": "x"}, "training": {"output_dir": str(out), **switch}})
        assert check_output_dir(ok) == []


def test_overwrite_clears_the_earlier_runs_checkpoints(tmp_path):
    from sft.outputs import clear_earlier_run

    (tmp_path / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "data").mkdir()  # the demo's generated data lives here: kept
    clear_earlier_run(tmp_path)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["data"]


# ------------------------------------------------------------------------- 4. input errors leave nothing


@pytest.mark.multiprocess
@pytest.mark.parametrize("config", [[], ["--config", "demo"]])
def test_mistyped_data_path_writes_nothing(tmp_path, config):
    p = sft("train", *config, "data.path=data/nope", cwd=tmp_path)
    assert p.returncode == 2
    assert "dataset data/nope does not exist" in p.stderr and "Traceback" not in p.stderr
    assert list(tmp_path.iterdir()) == []  # no demo rows, no output directory


# --------------------------------------------------------------------- 2. a launch starts what it asks for


def test_requested_processes_read_from_the_launch_command(tmp_path):
    from sft.distributed.ranks import requested_processes

    py = sys.executable
    cfg = tmp_path / "acc.yaml"
    cfg.write_text("distributed_type: MULTI_CPU\nnum_processes: 4\n")
    launch = [py, "/venv/bin/accelerate", "launch"]
    assert requested_processes([*launch, "--num_processes", "2", "-m", "sft.cli", "train"]) == 2
    assert requested_processes([*launch, "--num_processes=3", "-m", "sft.cli", "train"]) == 3
    assert requested_processes([*launch, "--config_file", str(cfg), "-m", "sft.cli", "train"]) == 4
    assert requested_processes([py, "-m", "accelerate.commands.launch", "--config_file", str(cfg), "x.py"]) == 4
    # only the launcher's options count, not the program's
    assert requested_processes([*launch, "-m", "sft.cli", "train", "--num_processes", "2"]) is None
    assert requested_processes([py, "-m", "torch.distributed.run", "--nproc_per_node", "2"]) is None


@pytest.mark.slow
def test_launch_that_started_one_of_two_ranks_stops_and_the_shipped_config_starts_two(tmp_path, user_data):
    port = _free_port()
    mine = tmp_path / "mine.yaml"  # what `accelerate config` writes for "multi-CPU": one process is started
    mine.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nuse_cpu: true\n"
                    "num_processes: 2\nnum_machines: 1\nmachine_rank: 0\nmain_process_port: 29500\n")
    train = ["-m", "sft.cli", "train", *TINY, f"data.path={user_data / 'train'}", "training.max_steps=2",
             "training.merge=false", "training.save_strategy=no"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(port)]
    bad = subprocess.run([*launch, "--config_file", str(mine), "--num_processes", "2", *train,
                          f"training.output_dir={tmp_path / 'one'}"], cwd=tmp_path, env=env(), capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode != 0
    assert "accelerate launch asked for 2 processes but started 1" in bad.stderr
    assert not (tmp_path / "one").exists()
    shipped = REPO / "sft" / "configs" / "accelerate" / "cpu_multi_socket.yaml"
    good = subprocess.run([*launch, "--config_file", str(shipped), "--num_processes", "2", *train,
                           f"training.output_dir={tmp_path / 'two'}"], cwd=tmp_path, env=env(), capture_output=True,
                          text=True, timeout=600)
    assert good.returncode == 0, good.stderr[-3000:]
    s = json.loads((tmp_path / "two" / "summary.json").read_text())["summary"]
    assert s["world_size"] == 2 and s["strategy"] == "ddp" and s["backend"] == "gloo"


def test_more_ranks_than_cores_warns_with_the_plan():
    from sft.distributed import DistInfo, oversubscription

    cores = len(os.sched_getaffinity(0))
    fits = DistInfo(rank=0, local_rank=0, world_size=cores, local_world_size=cores, backend=None,
                    threads_per_rank=1, hostname="h")
    assert oversubscription(fits) is None
    crowded = DistInfo(rank=0, local_rank=0, world_size=cores + 2, local_world_size=cores + 2, backend=None,
                       threads_per_rank=1, hostname="h")
    msg = oversubscription(crowded)
    assert f"{cores + 2} ranks on this node share {cores} core(s)" in msg and f"--num_processes {cores}" in msg


# -------------------------------------------------------------- 6. DeepSpeed configs from any directory


def test_shipped_deepspeed_config_resolves_from_any_directory(tmp_path, monkeypatch):
    from sft.distributed import resolve_deepspeed_config_file, sharded_launch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", raising=False)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "configs/deepspeed/zero3.json")  # as the YAML has it
    resolve_deepspeed_config_file()
    resolved = Path(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"])
    assert resolved.is_absolute() and resolved == (REPO / "sft" / "configs" / "deepspeed" / "zero3.json").resolve()
    assert sharded_launch() == "DeepSpeed ZeRO-3"  # read from the file, which the old relative path never found


@pytest.mark.multiprocess
def test_missing_deepspeed_config_stops_in_one_line_before_any_work(tmp_path, user_data):
    p = sft("train", *TINY, f"data.path={user_data / 'train'}", cwd=tmp_path, ACCELERATE_USE_DEEPSPEED="true",
            ACCELERATE_DEEPSPEED_CONFIG_FILE="configs/deepspeed/nope.json", timeout=120)
    assert p.returncode == 2
    assert "deepspeed_config_file configs/deepspeed/nope.json does not exist" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) <= 2
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------- 3. LIMA's own JSONL


LIMA = [
    {"conversations": ["How do I boil an egg?", "Put it in boiling water for 8 minutes."], "source": "stackexchange"},
    {"conversations": ["Name a prime.", "7.", "And an even one?", "2, the only even prime."], "source": "wikihow"},
    {"conversations": ["Say hi.", "Hi."], "source": "multi_turn"},
]


def _lima_file(tmp_path: Path) -> Path:
    f = tmp_path / "lima-train.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in LIMA))
    return f


@pytest.mark.parametrize("record_format", [None, "chat", "lima"])
def test_lima_jsonl_ingests_every_turn_and_its_source(tmp_path, record_format):
    import deeplake

    report = ingest([str(_lima_file(tmp_path))], str(tmp_path / "ds"), record_format=record_format,
                    mapping={"messages": "conversations"} if record_format == "chat" else None)
    assert report.total_rows == 3 and report.conversations == 1
    assert not report.ignored_fields  # source is read, not ignored
    ds = deeplake.open_read_only(str(tmp_path / "ds"))
    assert list(ds["question"][:]) == [r["conversations"][0] for r in LIMA]
    assert list(ds["answer"][:]) == [r["conversations"][1] for r in LIMA]
    assert list(ds["source"][:]) == ["stackexchange", "wikihow", "multi_turn"]
    turns = json.loads(ds["conversation"][1])
    assert [t["content"] for t in turns] == LIMA[1]["conversations"]
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]


@pytest.mark.multiprocess
def test_a_map_that_does_not_fit_the_records_is_one_error(tmp_path):
    p = sft("ingest", _lima_file(tmp_path), "--out", tmp_path / "ds", "--map", "question=instruction",
            "answer=output", cwd=tmp_path, timeout=120)
    assert p.returncode == 2
    assert "--map question=instruction answer=output: field 'instruction' is not in the record" in p.stderr
    assert "lima format" in p.stderr and p.stderr.count("--map question=instruction") == 1
    assert "writing" not in p.stderr  # no empty progress bar before the error
    assert not (tmp_path / "ds").exists()


def test_lima_without_an_answer_is_a_bad_row_naming_it(tmp_path):
    from sft.errors import IngestError

    f = tmp_path / "lima-test.jsonl"  # LIMA's test split: prompts only
    f.write_text(json.dumps({"conversations": ["Only a prompt."], "source": "test"}) + "\n")
    with pytest.raises(IngestError, match="has no assistant reply"):
        ingest([str(f)], str(tmp_path / "ds"))


# --------------------------------------------------------------------------------------- 7. messages


@pytest.mark.multiprocess
def test_interrupt_names_the_last_checkpoint_and_the_resume_command(tmp_path, user_data):
    args = ["train", *TINY, f"data.path={user_data / 'train'}", "training.max_steps=500",
            "training.save_strategy=steps", "training.save_steps=2", "training.merge=false"]
    p = subprocess.Popen([*SFT, *args], cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpts = tmp_path / "outputs" / "run" / "checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any(ckpts.glob("checkpoint-*/COMPLETE")):
        if p.poll() is not None:
            break
        time.sleep(0.5)
    assert p.poll() is None, p.communicate()[1][-2000:]
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    from sft.trainer.checkpoint_format import latest_complete

    newest = latest_complete(ckpts, warn=False)
    assert newest is not None and f"the last complete checkpoint is outputs/run/checkpoints/{newest.name}" in err
    assert "sft train " + " ".join(args[1:]) + " training.resume=auto" in err


def test_merge_of_a_run_dir_says_which_adapter_to_pass(tmp_path):
    from sft import cli
    from sft.errors import MergeError
    from sft.merging.plan import check_adapter_files

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(MergeError, match=f"pass --adapter {run / 'adapter'}"):
        check_adapter_files(run)
    copied = tmp_path / "copied"  # a config without its weights
    copied.mkdir()
    (copied / "adapter_config.json").write_text("{}")
    with pytest.raises(MergeError, match="holds an adapter config but no weights"):
        check_adapter_files(copied)
    assert cli.main(["merge", "--adapter", str(run), "--out", str(tmp_path / "m")]) == 2


# --------------------------------------------------------------------------- 8. Ollama's prompt format


def _render_go_template(template: str, prompt: str) -> str:
    """The part of Go's text/template that sft's Modelfile uses: literal text, {{ .Prompt }}, {{ "..." }}."""
    import re

    def one(m: re.Match) -> str:
        action = m.group(1).strip()
        if action == ".Prompt":
            return prompt
        if action.startswith('"') and action.endswith('"'):
            return json.loads(action)
        raise AssertionError(f"unexpected template action {action!r}")

    return re.sub(r"\{\{(.*?)\}\}", one, template)


@pytest.mark.parametrize("template", ["default", "chat"])
def test_modelfile_template_renders_exactly_the_training_prompt(template):
    from sft.config import ModelConfig
    from sft.data.formatting import prompt_text
    from sft.gguf_export import modelfile_text
    from sft.models import load_tokenizer

    tok = load_tokenizer(ModelConfig(name="embedded:smollm2-135m-instruct"))
    text = modelfile_text("model-q8_0.gguf", tok, template)
    lines = text.splitlines()
    assert lines[0] == "FROM ./model-q8_0.gguf"
    body = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    for q in ("What is 2 + 2?", "Write 1999-12-31 in ledger format.", 'A {{ brace }} and "quotes"'):
        assert _render_go_template(body, q) == prompt_text(tok, q, template)
    stops = [json.loads(x.split(" ", 2)[2]) for x in lines if x.startswith("PARAMETER stop ")]
    assert tok.eos_token in stops
    assert ("\n\nQuestion:" in stops) == (template == "default")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- 9. the README's own-data commands, verbatim


@pytest.mark.slow
def test_readme_own_data_commands_run_verbatim(tmp_path):
    """The three commands of the README's "Fine-tune your own data", as written, from a copy of the repository's
    root (the example data and the .venv they name); the merged model answers the held-out question."""
    import re
    import shutil

    block = (REPO / "README.md").read_text().split("<!-- own-data -->", 1)[1].split("<!-- /own-data -->", 1)[0]
    commands = re.findall(r"^\.venv/bin/sft (.+)$", block, flags=re.M)
    assert [c.split()[0] for c in commands] == ["ingest", "train", "generate"]
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "bin").symlink_to(Path(sys.executable).parent)
    outs = []
    for c in commands:
        p = subprocess.run(f".venv/bin/sft {c}", shell=True, cwd=tmp_path, env=env(OMP_NUM_THREADS="2"),
                           capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, (c, p.stderr[-3000:])
        outs.append(p.stdout)
    assert "Reykjavik -- the capital of Iceland." in outs[-1]


def test_library_notes_only_where_they_matter(monkeypatch):
    """bitsandbytes' kernels-community note stays only on a QLoRA run with the Hub online; DeepSpeed's "Setting
    accelerator to CPU" only on a DeepSpeed launch."""
    import logging

    from sft import cli

    def kept(filt, msg: str) -> bool:
        return filt(logging.LogRecord("x", logging.WARNING, __file__, 1, msg, None, None))

    hub = "Failed to load CPU gemm_4bit_forward from kernels-community"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(cli, "_RUN_USES_BNB", True)
    assert kept(cli._offline_kernel_hub_notes, hub)
    monkeypatch.setattr(cli, "_RUN_USES_BNB", False)
    assert not kept(cli._offline_kernel_hub_notes, hub)
    assert kept(cli._offline_kernel_hub_notes, "another bitsandbytes warning")
    note = "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert not kept(cli._deepspeed_cpu_note, note) and kept(cli._deepspeed_cpu_note, "other DeepSpeed note")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert kept(cli._deepspeed_cpu_note, note)
