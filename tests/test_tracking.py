"""Trackers, the training plot and training.export_gguf, from one real `sft train` run on a tiny Llama.

The run reports to TensorBoard, MLflow (its default file store under output_dir/logs) and W&B (offline); each
tracker's own reader then reads the numbers back: TensorBoard's EventAccumulator, MLflow's MlflowClient, and the
W&B offline run folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sft.config import from_dict
from sft.errors import ConfigError

pytestmark = pytest.mark.slow

STEPS, LOG_EVERY, EVAL_EVERY = 6, 2, 3
SFT_SERIES = ["tokens_per_s", "mfu", "peak_memory_gib_rank0", "data_wait_share"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("tracked")
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true",
               TOKENIZERS_PARALLELISM="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([
        sys.executable, "-m", "sft.cli", "train", "--config", "demo",
        "model.name=arch:tiny-llama", "model.dtype=fp32", f"data.path={work / 'train'}",
        f"data.eval_path={work / 'test'}", "demo.generate=true", "demo.train_rows=80", "demo.test_rows=24",
        "data.seq_length=64",
        f"training.max_steps={STEPS}", f"training.logging_steps={LOG_EVERY}", "training.eval_strategy=steps",
        f"training.eval_steps={EVAL_EVERY}", "demo.accuracy_samples=4", "demo.max_new_tokens=4",
        "training.report_to=[tensorboard,mlflow,wandb]", "training.export_gguf=q8_0", "training.progress=false",
        f"training.output_dir={work / 'out'}",
    ], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    summary = json.loads((work / "out" / "summary.json").read_text())["summary"]
    return work / "out", summary, proc


def _run_dir(out: Path) -> Path:
    runs = [p for p in (out / "logs").iterdir() if p.name.startswith("run-")]
    assert len(runs) == 1, runs
    return runs[0]


def test_tensorboard_series_and_steps(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, summary, _ = run
    logs = _run_dir(out)
    assert not list((out / "checkpoints").rglob("events.out.tfevents*")), "no logs inside checkpoints/"
    acc = EventAccumulator(str(logs))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    steps = lambda tag: [e.step for e in acc.Scalars(tag)]  # noqa: E731
    logged = [1] + list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert steps("train/loss") == logged
    for name in SFT_SERIES:
        assert steps(f"train/{name}") == logged, (name, sorted(tags))
    assert steps("eval/loss") == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    assert steps("eval/accuracy_before") == [0]
    for name in ("accuracy_after", "accuracy_merged", "merge_max_abs_diff"):
        assert steps(f"eval/{name}") == [STEPS], name
    assert acc.Scalars("eval/merge_max_abs_diff")[0].value == pytest.approx(summary["merge_max_abs_diff"], rel=1e-5)
    values = {t: [e.value for e in acc.Scalars(f"train/{t}")] for t in SFT_SERIES}
    assert all(v > 0 for v in values["tokens_per_s"]), values
    # MFU against a 1-second GEMM peak measured at train start: on a shared machine a disturbed peak can put a
    # step a little above it, so this bounds it loosely
    assert all(0 < v < 1.5 for v in values["mfu"]), values
    assert all(0 <= v <= 1 for v in values["data_wait_share"]), values
    assert all(0.05 < v < 64 for v in values["peak_memory_gib_rank0"]), values


def test_mlflow_file_store_read_back(run):
    from mlflow.tracking import MlflowClient

    out, summary, _ = run
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only with this
    client = MlflowClient(tracking_uri=(out / "logs" / "mlruns").resolve().as_uri())
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1
    r = runs[0]
    assert r.info.run_name == _run_dir(out).name and r.info.status == "FINISHED"
    history = lambda key: [m.step for m in client.get_metric_history(r.info.run_id, key)]  # noqa: E731
    assert history("loss") == [1] + list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    for name in SFT_SERIES:
        assert history(name) == history("loss"), name
    assert history("eval_loss") == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    assert r.data.metrics["eval_accuracy_after"] == pytest.approx(summary["accuracy_after"])
    assert r.data.metrics["eval_merge_max_abs_diff"] == pytest.approx(summary["merge_max_abs_diff"], rel=1e-6)


def _wandb_history(path: Path) -> list[dict]:
    """The history rows of a W&B offline run file. wandb 0.31's Python package has no reader for it (its core is
    Go); the file is LevelDB's log format -- a 7-byte ":W&B" header, then 32 KiB blocks of chunks, each with a
    7-byte header (CRC32C, length, type: 1 full, 2 first, 3 middle, 4 last) -- holding wandb's protobuf Records."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:7]
    pos, buf, rows = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_wandb_offline_run_has_the_metrics(run):
    out, summary, _ = run
    runs = list((_run_dir(out) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    data = list(runs[0].glob("*.wandb"))
    assert len(data) == 1, list(runs[0].iterdir())
    history = _wandb_history(data[0])
    keys = {k for h in history for k in h}
    for name in SFT_SERIES + ["loss"]:
        assert f"train/{name}" in keys, (name, sorted(keys))
    assert "eval/loss" in keys and "eval/accuracy_merged" in keys
    assert [h["train/global_step"] for h in history if "train/tokens_per_s" in h] == \
        [1] + list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))


def test_training_plot_and_gguf_in_summary(run):
    import matplotlib.image as mpimg

    out, summary, proc = run
    png = Path(summary["paths"]["plot"])
    assert png == out / "training.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert mpimg.imread(png).shape[0] > 300
    gguf = Path(summary["paths"]["gguf"])
    assert gguf == out / "model-q8_0.gguf" and gguf.stat().st_size > 1e6
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-q8_0.gguf\nTEMPLATE \"\"\"") and "{{ .Prompt }}" in modelfile
    assert f"llama-cli -m {gguf}" in proc.stdout.replace("\n", "") or "llama-cli -m" in proc.stdout


def test_training_figure_panels():
    from sft.plots import training_figure

    history = [
        {"step": 1, "loss": 3.0, "learning_rate": 1e-3, "tokens_per_s": 100.0, "peak_memory_gib_rank0": 1.0},
        {"step": 2, "loss": 2.0, "learning_rate": 5e-4, "tokens_per_s": 120.0, "peak_memory_gib_rank0": 1.1},
        {"step": 2, "eval_loss": 2.5}]
    fig = training_figure(history, "t", caption="machine")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["loss", "learning rate", "throughput", "peak memory"]
    assert all(ax.lines for ax in fig.axes), "every panel has data"
    assert fig.axes[2].get_ylabel().startswith("tokens/s") and "GiB" in fig.axes[3].get_ylabel()


def test_report_to_checked_with_the_config():
    with pytest.raises(ConfigError, match="unknown tracker 'comet'"):
        from_dict({"training": {"report_to": ["comet"]}})
    with pytest.raises(ConfigError, match="'none' cannot be combined"):
        from_dict({"training": {"report_to": ["none", "tensorboard"]}})
    with pytest.raises(ConfigError, match="export_gguf: needs training.merge"):
        from_dict({"training": {"export_gguf": "q8_0", "merge": False}})
    assert from_dict({"training": {"report_to": ["tensorboard", "mlflow", "wandb"]}}).training.report_to


def test_missing_tracker_package_named_before_any_work(tmp_path):
    # sys.modules[name] = None is how Python marks a module as not importable (find_spec answers None)
    code = ("import sys\n"
            "sys.modules['tensorboard'] = None\n"
            "from sft.cli import main\n"
            "sys.exit(main(['train', 'training.report_to=[tensorboard]', 'model.name=arch:tiny-llama']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "training.report_to: tensorboard is not installed; pip install tensorboard" in proc.stderr
    assert not (tmp_path / "outputs").exists(), "nothing was written: the config failed first"
