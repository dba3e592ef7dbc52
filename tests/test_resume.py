"""Exact, crash-safe resume.

Unit tests of the pickle-free checkpoint files (sft.trainer.checkpoint_format), then real runs through the CLI that are SIGKILLed
(the fault hooks SFT_FAULT_KILL, SFT_FAULT_KILL_SAVE, SFT_FAULT_KILL_MERGE) and resumed with resume=auto: the
resumed run repeats at most the steps since the last checkpoint and ends with the same adapter, bit for bit, as an
uninterrupted run with the same config (one reference run per module, shared by the trials).
"""

import math
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sft.trainer import checkpoint_format as ck
from sft.io import atomic_write_json
from sft.trainer import resume
from sft.errors import SftError
from tests.helpers import (
    COMMON,
    MAX_STEPS,
    ONE_RANK,
    SAVE_STEPS,
    adapter,
    assert_bit_exact,
    assert_pickle_free,
    complete_steps,
    killed,
    ok,
    sft,
    sft2,
    summary,
)

# --------------------------------------------------------------------------------------------- unit tests


def _model_opt_sched(seed: int = 0):
    from transformers import get_scheduler

    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    # two groups like the Trainer's (decay / no decay)
    opt = torch.optim.AdamW([{"params": [m[0].weight, m[2].weight], "weight_decay": 0.1},
                             {"params": [m[0].bias, m[2].bias], "weight_decay": 0.0}], lr=1e-2)
    sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=10)
    return m, opt, sched


def _step(m, opt, sched, x):
    m(x).pow(2).mean().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_adamw_and_scheduler_round_trip_give_the_identical_next_step(tmp_path, monkeypatch):
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(1))
    m, opt, sched = _model_opt_sched()
    for _ in range(3):
        _step(m, opt, sched, x)
    files = ck.save_optimizer(opt, tmp_path) + ck.save_state(sched.state_dict(), tmp_path, ck.SCHEDULER)
    assert sorted(p.name for p in files) == ["optimizer.json", "optimizer.safetensors", "scheduler.json"]
    weights = {k: v.clone() for k, v in m.state_dict().items()}
    for _ in range(2):
        _step(m, opt, sched, x)

    # a fresh model / optimizer / scheduler, loaded with nothing that unpickles
    def forbidden(*a, **k):
        raise AssertionError("unpickling while loading a checkpoint")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    m2, opt2, sched2 = _model_opt_sched(seed=5)
    m2.load_state_dict(weights)
    ck.load_optimizer(opt2, tmp_path)
    sched2.load_state_dict(ck.load_state(tmp_path, ck.SCHEDULER))
    for _ in range(2):
        _step(m2, opt2, sched2, x)
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    assert sched2.get_last_lr() == sched.get_last_lr()
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(s1["state"][i][k], s2["state"][i][k]), (i, k)


def test_state_encoding_keeps_types(tmp_path):
    state = {
        "t": torch.arange(6, dtype=torch.float32).reshape(2, 3), "scalar": torch.tensor(3.0), "u8": torch.zeros(4, dtype=torch.uint8),
        "tuple": (1, 2.5, "x", None, True), "int_keys": {0: "a", 7: {"b": [1, 2]}}, "nan": math.nan, "inf": -math.inf,
        "np": np.arange(5, dtype=np.uint32), "np_scalar": np.float64(0.25), "dtype": torch.bfloat16,
        "__weird": 1, "nested": [{"z": (torch.ones(2), 3)}],
    }
    ck.save_state(state, tmp_path, "s")
    back = ck.load_state(tmp_path, "s")
    assert torch.equal(back["t"], state["t"]) and back["scalar"].shape == () and back["u8"].dtype == torch.uint8
    assert back["tuple"] == state["tuple"] and isinstance(back["tuple"], tuple)
    assert back["int_keys"] == {0: "a", 7: {"b": [1, 2]}}
    assert math.isnan(back["nan"]) and back["inf"] == -math.inf
    assert back["np"].dtype == np.uint32 and back["np"].tolist() == [0, 1, 2, 3, 4]
    assert back["np_scalar"] == 0.25 and back["dtype"] is torch.bfloat16 and back["__weird"] == 1
    assert torch.equal(back["nested"][0]["z"][0], torch.ones(2)) and back["nested"][0]["z"][1] == 3
    assert {p.name for p in tmp_path.iterdir()} == {"s.json", "s.safetensors"}
    ck.save_state({"a": 1}, tmp_path, "plain")  # no tensors: no safetensors file
    assert not (tmp_path / "plain.safetensors").exists() and ck.load_state(tmp_path, "plain") == {"a": 1}


def test_state_encoding_refuses_what_it_cannot_store_without_pickle(tmp_path):
    with pytest.raises(TypeError, match="cannot be stored without pickle"):
        ck.save_state({"fn": lambda x: x}, tmp_path, "bad")
    with pytest.raises(TypeError, match="cannot be stored"):
        ck.save_state({(1, 2): 3}, tmp_path, "bad")


def test_rng_round_trip(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    random.random(), np.random.rand(), torch.rand(2), np.random.randn()  # numpy's cached gaussian is state too
    ck.save_state(ck.capture_rng(), tmp_path, ck.rng_name(0))
    draw = lambda: (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist())  # noqa: E731
    first = draw()
    draw()
    ck.restore_rng(ck.load_state(tmp_path, ck.rng_name(0)))
    assert draw() == first


def _fake_ckpt(root: Path, step: int, complete: bool = True) -> Path:
    p = root / f"checkpoint-{step}"
    p.mkdir(parents=True)
    (p / "adapter_model.safetensors").write_bytes(b"x")
    if complete:
        ck.mark_complete(p, step)
    return p


def test_latest_complete_skips_incomplete_and_partial(tmp_path, caplog):
    _fake_ckpt(tmp_path, 2)
    _fake_ckpt(tmp_path, 10)
    _fake_ckpt(tmp_path, 12, complete=False)  # killed while writing (or an old, pickled checkpoint)
    (tmp_path / "checkpoint-14.partial").mkdir()
    (tmp_path / "checkpoint-9").mkdir()  # incomplete, older: not warned about
    assert ck.latest_complete(tmp_path) == tmp_path / "checkpoint-10"
    assert "checkpoint-12" in caplog.text and "checkpoint-9" not in caplog.text
    assert ck.latest_complete(tmp_path / "nothing") is None
    assert [p.name for p in ck.remove_partials(tmp_path)] == ["checkpoint-14.partial"]
    assert not (tmp_path / "checkpoint-14.partial").exists()


def test_publish_and_rotate_never_delete_the_newest(tmp_path):
    for s in (2, 4, 6):
        _fake_ckpt(tmp_path, s)
    _fake_ckpt(tmp_path, 8, complete=False)
    # a run resumed from checkpoint-2 writes checkpoint-4 again (it replaces the old one) and is the newest
    tmp = tmp_path / "checkpoint-4.partial"
    tmp.mkdir()
    (tmp / "new").write_text("1")
    with pytest.raises(RuntimeError, match="not complete"):
        ck.publish(tmp, tmp_path / "checkpoint-4")
    ck.mark_complete(tmp, 4)
    ck.publish(tmp, tmp_path / "checkpoint-4")
    assert (tmp_path / "checkpoint-4" / "new").is_file() and not tmp.exists()
    assert not list(tmp_path.glob("*.old"))
    removed = ck.rotate(tmp_path, 1, tmp_path / "checkpoint-4")
    assert sorted(p.name for p in removed) == ["checkpoint-2", "checkpoint-6"]
    # incomplete directories are neither counted nor deleted by rotation
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-8"]
    _fake_ckpt(tmp_path, 10)
    _fake_ckpt(tmp_path, 12)
    assert [p.name for p in ck.rotate(tmp_path, 2, tmp_path / "checkpoint-12", protect=(tmp_path / "checkpoint-4",))] \
        == ["checkpoint-10"]


def test_check_meta_and_check_resumable_name_the_problem(tmp_path):
    from sft.config import RunConfig

    cfg = RunConfig()
    cfg.model.dtype = "fp32"
    p = _fake_ckpt(tmp_path, 4, complete=False)
    atomic_write_json(p / ck.RESUME_META, resume.resume_meta(cfg, 2, 100))
    with pytest.raises(SftError, match=f"checkpoint {p} is incomplete"):
        resume.check_resumable(p, 2)
    with pytest.raises(SftError, match="does not exist"):
        resume.check_resumable(tmp_path / "checkpoint-99", 2)
    resume.check_meta(p, resume.resume_meta(cfg, 2, 100))  # the same settings: fine
    other = RunConfig()
    other.model.dtype = "fp32"
    other.data.seq_length = 2048
    with pytest.raises(SftError) as e:
        resume.check_meta(p, resume.resume_meta(other, 1, 100))
    msg = str(e.value)
    assert "data.seq_length: the checkpoint has 1024, this run 2048; set data.seq_length=1024" in msg
    assert "world size: the checkpoint was written by 2 rank(s), this run has 1" in msg
    assert "model.name" not in msg


# --------------------------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """48 short rows (a few steps per epoch, so that the runs cross epochs) and the uninterrupted reference run."""
    from sft.data.ingest import write_dataset

    root = tmp_path_factory.mktemp("resume")
    colours = ["red", "green", "blue", "amber", "violet", "cyan", "black", "white"]
    rows = [{"question": f"What colour is item {i}?", "answer": f"Item {i} is {colours[i * 7 % 8]}.", "source": "t"}
            for i in range(48)]
    write_dataset(str(root / "ds"), rows, progress=False)
    return root


@pytest.fixture(scope="module")
def reference(work):
    out = work / "ref"
    ok(sft("train", *COMMON, *ONE_RANK, f"data.path={work / 'ds'}", f"training.output_dir={out}", cwd=work))
    s = summary(out)
    assert s["steps"] == MAX_STEPS and s["resumed_from"] is None and len(s["loss_history"]) == MAX_STEPS
    assert complete_steps(out) == [MAX_STEPS - SAVE_STEPS, MAX_STEPS]  # rotation kept the newest LIMIT
    assert_pickle_free(out / "checkpoints" / f"checkpoint-{MAX_STEPS}", 1)
    return out


def _kill_steps(n: int = 3, seed: int = 6) -> list[int]:
    """Seeded choice of kill steps in [3, MAX_STEPS - 1] (every trial resumes from a checkpoint), not all on
    checkpoint boundaries."""
    rng = random.Random(seed)
    steps = rng.sample(range(3, MAX_STEPS), n)
    if all(s % SAVE_STEPS == 0 for s in steps):
        steps[-1] = rng.choice([s for s in range(3, MAX_STEPS) if s % SAVE_STEPS and s not in steps])
    return steps


def _resume_and_check(out: Path, reference: Path, work: Path, expected_ckpt: int, no_pickle: bool = True) -> float:
    proc = ok(sft("train", *COMMON, *ONE_RANK, f"data.path={work / 'ds'}", f"training.output_dir={out}",
                  "training.resume=auto", cwd=work, no_pickle=no_pickle))
    s, ref = summary(out), summary(reference)
    assert s["steps"] == MAX_STEPS
    # it resumed from the last complete checkpoint and trained only the steps after it
    assert s["resumed_step"] == expected_ckpt, proc.stdout[-2000:]
    assert s["resumed_from"].endswith(f"checkpoint-{expected_ckpt}")
    assert f"resuming from {s['resumed_from']} (step {expected_ckpt} of {MAX_STEPS})" in proc.stdout
    assert len(s["loss_history"]) == MAX_STEPS - expected_ckpt  # first step of this run: expected_ckpt + 1
    # the same losses, step for step, as the uninterrupted run
    assert s["loss_history"] == ref["loss_history"][expected_ckpt:]
    assert complete_steps(out) == [MAX_STEPS - SAVE_STEPS, MAX_STEPS]
    assert not list((out / "checkpoints").glob("*.partial"))
    return assert_bit_exact(reference / "adapter", out / "adapter")


KILL_STEPS = _kill_steps()


@pytest.mark.slow
@pytest.mark.parametrize("kill_step", KILL_STEPS)
def test_sigkill_then_resume_auto_is_bit_exact(reference, work, kill_step):
    out = work / f"kill-{kill_step}"
    # SFT_FAULT_KILL fires at the end of the step, before that step's checkpoint is written
    killed(sft("train", *COMMON, *ONE_RANK, f"data.path={work / 'ds'}", f"training.output_dir={out}", cwd=work,
               fault={"SFT_FAULT_KILL": f"0:{kill_step}"}))
    last = (kill_step - 1) // SAVE_STEPS * SAVE_STEPS
    assert complete_steps(out)[-1] == last
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    diff = _resume_and_check(out, reference, work, last)
    print(f"killed at step {kill_step}, resumed from checkpoint-{last}, adapter max |diff| {diff}")


@pytest.mark.slow
def test_sigkill_while_saving_keeps_the_previous_checkpoint(reference, work):
    out = work / "kill-save"
    step = 6
    killed(sft("train", *COMMON, *ONE_RANK, f"data.path={work / 'ds'}", f"training.output_dir={out}", cwd=work,
               fault={"SFT_FAULT_KILL_SAVE": str(step)}))
    partial = out / "checkpoints" / f"checkpoint-{step}.partial"
    assert {"adapter_model.safetensors", "optimizer.safetensors"} <= {p.name for p in partial.iterdir()}
    assert not (partial / "COMPLETE").exists()
    assert complete_steps(out) == [step - 4, step - 2]
    assert not (out / "checkpoints" / f"checkpoint-{step}").exists()
    # the incomplete checkpoint is refused by name, and skipped by resume=auto
    (out / "checkpoints" / f"checkpoint-{step}").mkdir()  # as if the rename had happened without the marker
    for f in partial.iterdir():
        (out / "checkpoints" / f"checkpoint-{step}" / f.name).write_bytes(f.read_bytes())
    proc = sft("train", *COMMON, *ONE_RANK, f"data.path={work / 'ds'}", f"training.output_dir={out}",
               f"training.resume={out / 'checkpoints' / f'checkpoint-{step}'}", cwd=work)
    assert proc.returncode == 2 and f"checkpoint-{step} is incomplete (no COMPLETE marker" in proc.stderr, proc.stderr
    diff = _resume_and_check(out, reference, work, step - 2)
    print(f"killed while saving checkpoint-{step}, resumed from checkpoint-{step - 2}, adapter max |diff| {diff}")


@pytest.mark.slow
def test_resume_refuses_a_different_config_naming_the_key(reference, work):
    ckpt = reference / "checkpoints" / f"checkpoint-{MAX_STEPS}"
    proc = sft("train", *COMMON, "training.gradient_accumulation_steps=1", f"data.path={work / 'ds'}",
               f"training.output_dir={work / 'other'}", f"training.resume={ckpt}", cwd=work)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"checkpoint {ckpt} does not match this run" in proc.stderr
    assert "training.gradient_accumulation_steps: the checkpoint has 2, this run 1" in proc.stderr
    proc = sft("train", *COMMON, *ONE_RANK, f"data.path={work / 'ds'}", f"training.output_dir={work / 'other'}",
               f"training.resume={work / 'nope' / 'checkpoint-4'}", cwd=work)
    assert proc.returncode == 2 and f"checkpoint {work / 'nope' / 'checkpoint-4'} does not exist" in proc.stderr
    assert not (work / "other").exists()


@pytest.mark.slow
def test_sigkill_during_merge_leaves_no_output_and_merge_again_completes(reference, work):
    out = work / "merged"
    killed(sft("merge", "--adapter", str(reference / "adapter"), "--out", str(out), cwd=work,
               fault={"SFT_FAULT_KILL_MERGE": "1"}))
    assert not out.exists()
    temps = list(work.glob("merged.tmp-*"))
    assert len(temps) == 1 and (temps[0] / "model.safetensors").is_file()  # the first shard was written
    proc = ok(sft("merge", "--adapter", str(reference / "adapter"), "--out", str(out), cwd=work))
    assert "logits check" in proc.stdout
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not list(work.glob("merged.tmp-*")), "the interrupted merge's temporary directory was not cleaned up"
    # a checkpoint merges as well (it carries sft_base.json)
    ok(sft("merge", "--adapter", str(reference / "checkpoints" / f"checkpoint-{MAX_STEPS}"), "--out",
           str(work / "merged-ckpt"), cwd=work))


@pytest.mark.slow
def test_two_ranks_kill_rank1_then_resume_auto(work):
    steps, kill = 8, 5
    common = [*COMMON, f"training.max_steps={steps}", f"data.path={work / 'ds'}"]
    ref = work / "ref2"
    ok(sft2("train", *common, f"training.output_dir={ref}", cwd=work))
    out = work / "kill2"
    proc = sft2("train", *common, f"training.output_dir={out}", cwd=work, fault={"SFT_FAULT_KILL": f"1:{kill}"})
    assert proc.returncode != 0 and "SIGKILL" in proc.stdout, proc.stdout[-3000:]
    last = (kill - 1) // SAVE_STEPS * SAVE_STEPS
    assert complete_steps(out)[-1] == last
    assert_pickle_free(out / "checkpoints" / f"checkpoint-{last}", 2)
    proc = ok(sft2("train", *common, f"training.output_dir={out}", "training.resume=auto", cwd=work))
    s, r = summary(out), summary(ref)
    assert s["world_size"] == 2 and s["steps"] == steps and s["resumed_step"] == last
    assert len(s["loss_history"]) == steps - last
    ta, tb = adapter(ref / "adapter"), adapter(out / "adapter")
    diff = max((ta[k] - tb[k]).abs().max().item() for k in ta)
    assert diff <= 1e-6, diff
    np.testing.assert_allclose(s["loss_history"], r["loss_history"][last:], rtol=1e-6)
    print(f"2 ranks: rank 1 killed at step {kill}, resumed from checkpoint-{last}, adapter max |diff| {diff}")
