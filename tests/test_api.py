"""The public Python API (``import sft``): the README's example runs as written, a library caller's model, rows,
callbacks and TrainingArguments are used, the caller's config is never changed, and bad extra arguments fail
before any work."""

from __future__ import annotations

import copy
import json
import runpy
import sys

import pytest

import sft
from sft.errors import ConfigError

pytestmark = pytest.mark.slow

BASE = ["model.name=arch:tiny-llama", "model.dtype=fp32", "demo.generate=false", "demo.accuracy_samples=0",
        "data.eval_path=null", "data.seq_length=64", "training.progress=false", "training.logging_steps=1"]


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["python_api.py", str(tmp_path / "api")])
    runpy.run_path(str(__import__("pathlib").Path(__file__).parents[1] / "examples" / "python_api.py"),
                   run_name="__main__")
    out = capsys.readouterr().out
    assert "merged model in" in out and (tmp_path / "api" / "merged" / "config.json").is_file()


def test_callers_model_rows_callbacks_and_arguments(tmp_path):
    from transformers import TrainerCallback

    from sft.models import build_random

    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{2 * i}."} for i in range(120)]
    cfg = sft.load_config("demo", BASE + ["training.max_steps=6", "training.learning_rate=5e-3",
                                          f"training.output_dir={tmp_path / 'run'}"])
    before = copy.deepcopy(cfg)
    seen: dict = {"steps": []}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            seen["optim"], seen["beta2"], seen["eps"] = args.optim, args.adam_beta2, args.adam_epsilon

        def on_step_end(self, args, state, control, **kw):
            seen["steps"].append(state.global_step)

    summary = sft.train(cfg, model=build_random("tiny-llama", seed=cfg.training.seed), dataset=rows,
                        callbacks=[Probe()], training_args={"optim": "adamw_torch", "adam_beta2": 0.98,
                                                            "adam_epsilon": 1e-6})
    assert seen["steps"] == [1, 2, 3, 4, 5, 6]
    assert (getattr(seen["optim"], "value", seen["optim"]), seen["beta2"], seen["eps"]) == ("adamw_torch", 0.98, 1e-6)
    assert summary.loss_last < summary.loss_first  # it learned from the caller's rows
    assert cfg == before  # the caller's config is never changed
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["config"]["data"]["path"] == str(tmp_path / "run" / "data" / "train")  # the rows, in Deep Lake
    assert written["config"]["model"]["gradient_checkpointing"] in (True, False)  # resolved in the copy
    # the merged model reloads as a standalone transformers model and answers
    assert summary.merge_max_abs_diff is not None and summary.merge_max_abs_diff < 1e-3
    assert len(sft.generate(summary.paths["merged"], ["What is 3 plus 3?"], max_new_tokens=3)) == 1


@pytest.mark.parametrize("extra, message", [
    ({"max_steps": 3}, "max_steps cannot be set"),
    ({"remove_unused_columns": True}, "remove_unused_columns cannot be set"),
    ({"optimm": "sgd"}, "no TrainingArguments field named optimm"),
])
def test_bad_training_args_fail_before_any_work(tmp_path, extra, message):
    cfg = sft.load_config("demo", BASE + [f"training.output_dir={tmp_path / 'run'}", "data.path=/nonexistent"])
    with pytest.raises(ConfigError, match=message):
        sft.train(cfg, training_args=extra)
    assert not (tmp_path / "run").exists()
