"""Deep Lake on S3-compatible object storage (issue #15), against a real S3 server on loopback.

Each fixture starts ``moto_server`` (PyPI ``moto[server]``) on 127.0.0.1 and a free port, with authentication on
(``INITIAL_NO_AUTH_ACTION_COUNT``: the first four calls make an IAM user, a policy and an access key; after that
every request must be signed with that key), and stops it afterwards. No traffic leaves the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import run_cli
from sft.data.ingest import write_dataset
from sft.data.source import ShardedSource

pytest.importorskip("moto", reason="moto[server] is not installed (pip install -e .[dev])")
boto3 = pytest.importorskip("boto3")

BIN = Path(sys.executable).parent
BUCKET = "sft-data"


class S3Server:
    """A moto S3 server on loopback with one IAM key and one bucket; ``stop()`` ends it."""

    def __init__(self, tmp: Path):
        exe = shutil.which("moto_server", path=str(BIN)) or shutil.which("moto_server")
        assert exe, "moto_server not found next to the interpreter"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="4")
        self.log = open(tmp / f"moto-{self.port}.log", "w")
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.1)
        anon = dict(endpoint_url=self.endpoint, aws_access_key_id="setup", aws_secret_access_key="setup",
                    region_name="us-east-1")
        iam = boto3.client("iam", **anon)
        iam.create_user(UserName="trainer")
        policy = json.dumps({"Version": "2012-10-17",
                             "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]})
        arn = iam.create_policy(PolicyName="s3-all", PolicyDocument=policy)["Policy"]["Arn"]
        iam.attach_user_policy(UserName="trainer", PolicyArn=arn)
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        self.creds = {"aws_access_key_id": self.key_id, "aws_secret_access_key": self.secret,
                      "endpoint_url": self.endpoint, "aws_region": "us-east-1"}
        self.client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.key_id,
                                   aws_secret_access_key=self.secret, region_name="us-east-1")
        self.client.create_bucket(Bucket=BUCKET)
        self.creds_file = tmp / f"creds-{self.port}.json"
        self.creds_file.write_text(json.dumps(self.creds))

    def keys(self, prefix: str) -> list[str]:
        r = self.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for o in r.get("Contents", [])]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


def url(name: str) -> str:
    return f"s3://{BUCKET}/{name}"


def assert_no_secret(server: S3Server, *texts: str, dirs: tuple[Path, ...] = ()) -> None:
    """Neither the secret nor the key id in any text or in any file under ``dirs``."""
    for t in texts:
        assert server.secret not in t and server.key_id not in t
    for d in dirs:
        for p in Path(d).rglob("*"):
            if p.is_file():
                data = p.read_bytes()
                assert server.secret.encode() not in data and server.key_id.encode() not in data, p


ROWS = [{"question": f"What colour is item {i}?", "answer": f"Item {i} is {['red', 'blue', 'green'][i % 3]}.",
         "source": "t"} for i in range(48)]


# ---------------------------------------------------------------------------------------------- ingest, open, fail


@pytest.mark.multiprocess
def test_ingest_to_s3_then_stream_it_back(s3, tmp_path, capsys):
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in ROWS))
    rc, out, err = run_cli(capsys, "ingest", src, "--out", url("ingested"), "--creds", s3.creds_file)
    assert rc == 0, err
    assert f"wrote 48 rows to {url('ingested')}" in out
    rows = list(ShardedSource(url("ingested"), shuffle=False, read_batch=7, creds=s3.creds).iter_rows())
    assert rows == [{"question": r["question"], "answer": r["answer"]} for r in ROWS]
    # an existing dataset needs --overwrite; bad rows leave nothing behind in the bucket
    rc, _, err = run_cli(capsys, "ingest", src, "--out", url("ingested"), "--creds", s3.creds_file)
    assert rc == 2 and f"{url('ingested')} already exists; pass --overwrite" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": 1, "answer": "a"}\n')
    rc, _, err = run_cli(capsys, "ingest", bad, "--out", url("bad"), "--creds", s3.creds_file)
    assert rc == 2 and "bad.jsonl line 2: field 'question' (question) must be text" in err
    assert s3.keys("bad") == []
    assert_no_secret(s3, out, err)


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", ["wrong secret", "missing bucket", "missing dataset", "wrong ingest key"])
def test_wrong_key_or_missing_bucket_fails_fast_before_the_model_loads(s3, tmp_path, capsys, monkeypatch, case):
    import sft.models

    def boom(*a, **k):
        raise AssertionError("a model was loaded; the error should have come before that")

    monkeypatch.setattr(sft.models, "load_model_and_tokenizer", boom)
    write_dataset(url("ok"), ROWS, progress=False, creds=s3.creds, overwrite=True)
    creds = tmp_path / "creds.json"
    wrong = dict(s3.creds, aws_secret_access_key="not-the-secret-" + "x" * 20)
    creds.write_text(json.dumps(wrong if "wrong" in case else s3.creds))
    path = {"missing bucket": "s3://no-such-bucket/ds", "missing dataset": url("nothing-here")}.get(case, url("ok"))
    t0 = time.monotonic()
    if case == "wrong ingest key":
        src = tmp_path / "a.jsonl"
        src.write_text('{"question": "q", "answer": "a"}\n')
        rc, out, err = run_cli(capsys, "ingest", src, "--out", url("other"), "--creds", creds)
        assert rc == 2 and f"--out {url('other')}: access denied" in err, err
    else:
        rc, out, err = run_cli(capsys, "train", "--config", "demo", "model=arch:tiny-llama", "demo.generate=false",
                               f"data.path={path}", f"data.creds={creds}", "data.eval_path=null",
                               f"training.output_dir={tmp_path / 'out'}", "training.progress=false")
        assert rc == 2, err
        expected = {"wrong secret": f"cannot open remote dataset {path}: access denied",
                    "missing bucket": f"no Deep Lake dataset at {path}: the bucket or the prefix does not exist",
                    "missing dataset": f"no Deep Lake dataset at {path}"}[case]
        assert expected in err, err
    assert time.monotonic() - t0 < 10, "it should fail in seconds, not after Deep Lake's retries"
    assert_no_secret(s3, out, err)
    assert wrong["aws_secret_access_key"] not in err


@pytest.mark.multiprocess
def test_creds_from_yaml_mapping_and_env_and_redaction(s3, tmp_path, monkeypatch):
    from sft.config import load_config
    from sft.data.creds import resolve
    from sft.errors import DataError

    cfg_file = tmp_path / "t.yaml"
    cfg_file.write_text("data:\n  creds:\n" + "".join(f"    {k}: {v}\n" for k, v in s3.creds.items()))
    cfg = load_config(cfg_file)
    assert resolve(cfg.data.creds) == s3.creds
    dumped = json.dumps(cfg.to_dict())
    assert s3.secret not in dumped and s3.key_id not in dumped and s3.endpoint in dumped
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    assert resolve(None) == s3.creds
    write_dataset(url("env"), ROWS[:5], progress=False, overwrite=True)  # creds from the environment
    assert len(list(ShardedSource(url("env")).iter_rows())) == 5
    with pytest.raises(DataError) as e:
        resolve({"aws_access_key_id": s3.key_id, "aws_secret_acces_key": s3.secret})
    assert "unknown key 'aws_secret_acces_key'" in str(e.value) and s3.secret not in str(e.value)


# ---------------------------------------------------------------------------------------------- training


def _env(**extra) -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
             PYTHONUNBUFFERED="1", ACCELERATE_USE_CPU="true")
    for k in list(e):
        if k.startswith(("AWS_", "SFT_FAULT")):
            e.pop(k)
    e.update(extra)
    return e


@pytest.mark.slow
def test_two_ranks_stream_disjoint_shards_from_s3_and_match_one_rank(s3, tmp_path):
    """2 ranks (creds from data.creds) and 1 rank (creds from AWS_* variables) on the same global batches give the
    same losses only if each rank streamed exactly its own half; no secret in any output."""
    from tests.helpers import TRAIN, fixed_length_rows, launch

    from sft.config import ModelConfig
    from sft.models import load_tokenizer

    tok = load_tokenizer(ModelConfig(name="arch:tiny-llama"))
    b, steps, length = 2, 4, 31
    rows = fixed_length_rows(tok, 2 * b * steps, length)
    half = len(rows) // 2
    write_dataset(url("two"), rows, progress=False, creds=s3.creds, overwrite=True)
    one = []
    for k in range(steps):
        one += rows[k * b:(k + 1) * b] + rows[half + k * b:half + (k + 1) * b]
    write_dataset(url("one"), one, progress=False, creds=s3.creds, overwrite=True)
    common = [*TRAIN, f"data.seq_length={length + 1}", f"training.max_steps={steps}", "training.merge=false"]
    p2 = launch(*common, f"data.path={url('two')}", f"data.creds={s3.creds_file}",
                f"training.per_device_train_batch_size={b}", f"training.output_dir={tmp_path / 'out2'}", cwd=tmp_path,
                extra_env={k: "" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
    out2, _ = p2.communicate(timeout=600)
    assert p2.returncode == 0, out2[-4000:]
    aws = {"AWS_ACCESS_KEY_ID": s3.key_id, "AWS_SECRET_ACCESS_KEY": s3.secret, "AWS_ENDPOINT_URL": s3.endpoint,
           "AWS_REGION": "us-east-1"}
    p1 = subprocess.run([sys.executable, *common, f"data.path={url('one')}",
                         f"training.per_device_train_batch_size={2 * b}", f"training.output_dir={tmp_path / 'out1'}"],
                        cwd=tmp_path, env=_env(**aws), capture_output=True, text=True, timeout=600)
    assert p1.returncode == 0, p1.stderr[-4000:]
    l1 = json.loads((tmp_path / "out1" / "summary.json").read_text())["summary"]["loss_history"]
    l2 = json.loads((tmp_path / "out2" / "summary.json").read_text())["summary"]["loss_history"]
    assert len(l1) == len(l2) == steps
    for a, c in zip(l1, l2):
        assert abs(a - c) <= 1e-4 * abs(a), (l1, l2)
    summary = json.loads((tmp_path / "out2" / "summary.json").read_text())
    assert summary["summary"]["world_size"] == 2 and summary["config"]["data"]["path"] == url("two")
    assert_no_secret(s3, out2, p1.stdout, p1.stderr, dirs=(tmp_path / "out1", tmp_path / "out2"))


RESUME = ["model.name=arch:tiny-llama", "model.dtype=fp32", "demo.generate=false", "data.eval_path=null",
          "data.seq_length=64", "training.max_steps=8", "training.per_device_train_batch_size=2",
          "training.save_strategy=steps", "training.save_steps=2", "training.merge=false",
          "demo.accuracy_samples=0",
          "training.progress=false", "training.eval_strategy=no", "training.logging_steps=1", "lora.dropout=0.0",
          "training.learning_rate=5e-3", "training.warmup_steps=2", "data.read_batch=8"]


@pytest.mark.slow
def test_resume_from_a_checkpoint_continues_the_s3_stream_bit_exact(s3, tmp_path):
    from tests.helpers import assert_bit_exact, complete_steps

    write_dataset(url("resume"), ROWS, progress=False, creds=s3.creds, overwrite=True)
    args = [sys.executable, "-m", "sft.cli", "train", *RESUME, f"data.path={url('resume')}",
            f"data.creds={s3.creds_file}"]

    def train(out: Path, *extra: str, fault: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([*args, f"training.output_dir={out}", *extra], cwd=tmp_path, env=_env(**(fault or {})),
                              capture_output=True, text=True, timeout=600)

    ref = train(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-4000:]
    killed = train(tmp_path / "run", fault={"SFT_FAULT_KILL": "0:5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert complete_steps(tmp_path / "run")[-1] == 4
    cursor = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-4" / "data_cursor_rank0.json").read_text())
    assert cursor["cursor"]["row"] > 0  # the stream position is in the checkpoint
    resumed = train(tmp_path / "run", "training.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())["summary"]
    r = json.loads((tmp_path / "ref" / "summary.json").read_text())["summary"]
    assert s["resumed_step"] == 4 and s["loss_history"] == r["loss_history"][4:]
    assert_bit_exact(tmp_path / "ref" / "adapter", tmp_path / "run" / "adapter")
    assert_no_secret(s3, ref.stdout, ref.stderr, resumed.stdout, resumed.stderr,
                     dirs=(tmp_path / "ref", tmp_path / "run"))


@pytest.mark.slow
def test_server_stopped_mid_epoch_fails_within_the_bound_naming_the_url(tmp_path):
    """The store goes away after the first checkpoint: the next read is retried within data.read_timeout_s x
    data.read_attempts, then the run stops (status 2) with a message naming the URL; the last complete checkpoint
    is intact.

    Deep Lake keeps recently read chunks in memory (a 22 MB dataset was still served from memory after the
    counting pass had read it), so this dataset is larger (~44 MB of text that compresses poorly: 28,000 rows, one
    short trainable row per read block of 256, the rest skipped as overlong), so that the epoch's reads go to the
    store."""
    import random

    from sft.config import ModelConfig
    from sft.models import load_tokenizer

    server = S3Server(tmp_path)
    try:
        tok = load_tokenizer(ModelConfig(name="arch:tiny-llama"))
        vocab = [w.replace("\u0120", " ") for w in tok.get_vocab() if w.isascii() and len(w) >= 5
                 and w.replace("\u0120", "").isalpha()]
        rng = random.Random(0)

        def rows():
            for i in range(28_000):
                if i % 32 == 0:  # a short, trainable row in every read block; the rest is skipped as overlong
                    yield {"question": f"What colour is item {i}?", "answer": "red.", "source": "t"}
                else:
                    yield {"question": "".join(rng.choice(vocab) for _ in range(300)), "answer": "x", "source": "t"}

        write_dataset(url("big"), rows(), progress=False, creds=server.creds)
        out = tmp_path / "out"
        proc = subprocess.Popen(
            [sys.executable, "-m", "sft.cli", "train", *RESUME, "training.max_steps=100000", "data.overlong=skip",
             "data.shuffle=false", "data.read_batch=256", "data.read_timeout_s=3", "data.read_attempts=2",
             f"data.path={url('big')}", f"data.creds={server.creds_file}", f"training.output_dir={out}"],
            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while not list((out / "checkpoints").glob("checkpoint-*/COMPLETE")):
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.2)
        server.stop()
        stopped = time.monotonic()
        stdout, stderr = proc.communicate(timeout=120)
        elapsed = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    assert proc.returncode == 2, (proc.returncode, stderr[-4000:])
    assert f"dataset {url('big')}: reading rows" in stderr and "failed 2 time(s)" in stderr, stderr[-4000:]
    assert "training.resume=auto" in stderr
    # bound: 2 attempts x 3 s + 1 s back-off, plus the steps still in flight and the exit
    assert elapsed < 45, f"took {elapsed:.0f} s after the server stopped"
    from safetensors.torch import load_file

    from sft.trainer import checkpoint_format as ck

    steps = [step for step, _, complete in ck.list_checkpoints(out / "checkpoints") if complete]
    assert steps, list((out / "checkpoints").iterdir())
    ckpt = out / "checkpoints" / f"checkpoint-{steps[-1]}"
    assert (ckpt / "COMPLETE").is_file() and load_file(str(ckpt / "adapter_model.safetensors"))
    assert json.loads((ckpt / "data_cursor_rank0.json").read_text())["global_step"] == steps[-1]
    assert not (out / "adapter").exists()
    assert_no_secret(server, stdout, stderr, dirs=(out,))
