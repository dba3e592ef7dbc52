"""Preemption: SIGTERM / SIGUSR1 (what Slurm sends on scancel, preemption, `scontrol requeue` and the early warning
of `--signal`) make a run write a complete checkpoint at the next step end, stop with exit status 75, and resume
with `training.resume=auto` to the adapter of an uninterrupted run, bit for bit (fp32).

The signal is sent by the rank itself at the end of a chosen step (SFT_FAULT_SIGNAL), so that the stop step is
exact; tests/test_slurm.py sends the real ones through Slurm.
"""

import pytest

from tests.helpers import COMMON, assert_bit_exact, assert_pickle_free, complete_steps, ok, sft, sft2, summary

pytestmark = pytest.mark.slow

STEPS = 6  # save_steps=2 (COMMON): a stop at step 3 is between two scheduled checkpoints


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from sft.data.ingest import write_dataset

    root = tmp_path_factory.mktemp("preempt")
    rows = [{"question": f"What colour is item {i}?", "answer": f"Item {i} is {['red', 'blue', 'cyan'][i % 3]}.",
             "source": "t"} for i in range(48)]
    write_dataset(str(root / "ds"), rows, progress=False)
    return root


def _common(root):
    return [*COMMON, f"training.max_steps={STEPS}", f"data.path={root / 'ds'}"]


def test_sigusr1_writes_the_checkpoint_exits_75_and_resume_is_bit_identical(data):
    common = [*_common(data), "training.gradient_accumulation_steps=2"]
    ref = data / "ref1"
    ok(sft("train", *common, f"training.output_dir={ref}", cwd=data))
    out = data / "usr1"
    proc = sft("train", *common, f"training.output_dir={out}", cwd=data, fault={"SFT_FAULT_SIGNAL": "0:3:USR1"})
    assert proc.returncode == 75, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "received SIGUSR1: stopped at step 3 of 6, checkpoint-3 written in" in proc.stderr, proc.stderr[-2000:]
    assert "training.resume=auto" in proc.stderr
    assert complete_steps(out)[-1] == 3 and not (out / "adapter").exists() and not (out / "summary.json").exists()
    assert_pickle_free(out / "checkpoints" / "checkpoint-3", 1)
    ok(sft("train", *common, f"training.output_dir={out}", "training.resume=auto", cwd=data))
    assert summary(out)["resumed_step"] == 3
    assert_bit_exact(ref / "adapter", out / "adapter")


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(data):
    """The signal reaches rank 1 only (one node of a job): both ranks agree at the step boundary, checkpoint-3 is
    whole, and the resumed 2-rank run ends with the uninterrupted run's adapter."""
    common = _common(data)
    ref = data / "ref2"
    ok(sft2("train", *common, f"training.output_dir={ref}", cwd=data))
    out = data / "term2"
    proc = sft2("train", *common, f"training.output_dir={out}", cwd=data, fault={"SFT_FAULT_SIGNAL": "1:3:TERM"})
    assert proc.returncode != 0
    assert "preempted: rank 1: received SIGTERM: stopped at step 3 of 6" in proc.stdout, proc.stdout[-3000:]
    assert "preempted: rank 0: a peer rank received a stop signal: stopped at step 3 of 6" in proc.stdout
    assert complete_steps(out)[-1] == 3
    assert_pickle_free(out / "checkpoints" / "checkpoint-3", 2)
    ok(sft2("train", *common, f"training.output_dir={out}", "training.resume=auto", cwd=data))
    s = summary(out)
    assert s["resumed_step"] == 3 and s["world_size"] == 2
    diff = assert_bit_exact(ref / "adapter", out / "adapter")
    print(f"2 ranks, SIGTERM on rank 1 at step 3: adapter max |diff| {diff}")
