"""No surprise network (issue #6): nothing is fetched at run time unless the config names a remote source, library
telemetry is off, and only safetensors are loaded.

The CLI runs in subprocesses whose ``sitecustomize`` (on PYTHONPATH) wraps ``socket.socket.connect`` /
``connect_ex`` / ``sendto`` and ``socket.getaddrinfo``: loopback and AF_UNIX pass (gloo, local stores), anything
else is logged and refused. At exit each process also records the environment variables that switch telemetry and
offline mode, and Deep Lake's telemetry endpoint. Native code that opens sockets itself (Deep Lake's C++ core,
hf_xet) is not seen by this; the Python-level libraries that would fetch (huggingface_hub, transformers, datasets,
requests / httpx) all go through these calls.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SFT = [sys.executable, "-m", "sft.cli"]

BLOCKER = textwrap.dedent('''
    import atexit, errno, json, os, socket, sys

    _DIR = os.environ["SFT_NET_LOG_DIR"]
    _real = {"connect": socket.socket.connect, "connect_ex": socket.socket.connect_ex,
             "sendto": socket.socket.sendto, "getaddrinfo": socket.getaddrinfo}

    def _record(kind, target):
        with open(os.path.join(_DIR, "attempts.jsonl"), "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "argv": sys.argv[:2], "kind": kind, "target": repr(target)}) + "\\n")

    def _local(host):
        if host is None:
            return True
        h = host.decode() if isinstance(host, bytes) else str(host)
        return h in ("localhost", "::1", "0.0.0.0", "", "::") or h.startswith(("127.", "::ffff:127."))

    def _allowed(sock, address):
        if sock.family == getattr(socket, "AF_UNIX", object()):
            return True
        if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
            return _local(address[0])
        return False

    def connect(self, address):
        if not _allowed(self, address):
            _record("connect", address)
            raise OSError(errno.ENETUNREACH, "network refused by the test's blocker")
        return _real["connect"](self, address)

    def connect_ex(self, address):
        if not _allowed(self, address):
            _record("connect_ex", address)
            return errno.ENETUNREACH
        return _real["connect_ex"](self, address)

    def sendto(self, data, *args):
        address = args[-1]
        if not _allowed(self, address):
            _record("sendto", address)
            raise OSError(errno.ENETUNREACH, "network refused by the test's blocker")
        return _real["sendto"](self, data, *args)

    def _numeric(host):
        import ipaddress
        try:
            ipaddress.ip_address(host.decode() if isinstance(host, bytes) else host)
            return True
        except ValueError:
            return False

    def getaddrinfo(host, *args, **kwargs):
        if not _local(host) and not _numeric(host):  # a numeric address needs no DNS; connect() judges it
            _record("getaddrinfo", host)
            raise socket.gaierror(socket.EAI_NONAME, "name resolution refused by the test's blocker")
        return _real["getaddrinfo"](host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto = connect, connect_ex, sendto
    socket.getaddrinfo = getaddrinfo

    _KEYS = ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK", "WANDB_MODE", "DEEPLAKE_TELEMETRY",
             "BNB_DISABLE_KERNELS_HUB")

    @atexit.register
    def _env():
        rec = {"pid": os.getpid(), "argv": sys.argv, "env": {k: os.environ.get(k) for k in _KEYS}}
        if "deeplake" in sys.modules:
            rec["deeplake_telemetry_endpoint"] = sys.modules["deeplake"].telemetry_client.endpoint
        if "huggingface_hub" in sys.modules:  # read at its import: proves the variable was set before that
            rec["hub_offline_constant"] = sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE
        with open(os.path.join(_DIR, "env-%d.json" % os.getpid()), "w") as f:
            json.dump(rec, f)
''')


@pytest.fixture(scope="module")
def blocked(tmp_path_factory):
    """run(*args) -> CompletedProcess of a CLI call under the blocker; attempts() / envs() read what it recorded.
    HF_HUB_OFFLINE is removed from the environment: setting it is the package's job."""
    root = tmp_path_factory.mktemp("net")
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(BLOCKER)
    logs = root / "logs"
    logs.mkdir()

    class Blocked:
        work = root

        def env(self):
            env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "WANDB_MODE")}
            env.update(SFT_NET_LOG_DIR=str(logs), TOKENIZERS_PARALLELISM="false",
                       PYTHONPATH=os.pathsep.join(filter(None, [str(root / "site"), os.environ.get("PYTHONPATH")])))
            return env

        def clear(self):
            for p in logs.iterdir():
                p.unlink()

        def run(self, *args, cwd=None, timeout=600):
            self.clear()
            return subprocess.run([*SFT, *map(str, args)], cwd=cwd or root, env=self.env(), capture_output=True,
                                  text=True, timeout=timeout)

        def python(self, code):
            self.clear()
            return subprocess.run([sys.executable, "-c", code], cwd=root, env=self.env(), capture_output=True,
                                  text=True, timeout=120)

        def attempts(self):
            f = logs / "attempts.jsonl"
            return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []

        def envs(self):
            return [json.loads(p.read_text()) for p in sorted(logs.glob("env-*.json"))]

    return Blocked()


@pytest.mark.multiprocess
def test_the_blocker_refuses_the_network_and_keeps_loopback(blocked):
    """The check of the check: an empty log below means something only if the blocker sees and refuses."""
    p = blocked.python(textwrap.dedent('''
        import socket, threading
        srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
        threading.Thread(target=lambda: srv.accept()[0].sendall(b"ok"), daemon=True).start()
        c = socket.create_connection(srv.getsockname(), timeout=5); assert c.recv(2) == b"ok"
        for call in (lambda: socket.create_connection(("203.0.113.7", 80), timeout=5),
                     lambda: socket.getaddrinfo("huggingface.co", 443)):
            try:
                call()
            except OSError:
                pass
            else:
                raise SystemExit("not refused")
        print("done")
    '''))
    assert p.returncode == 0 and "done" in p.stdout, p.stderr
    kinds = [(a["kind"], a["target"]) for a in blocked.attempts()]
    assert ("connect", "('203.0.113.7', 80)") in kinds and ("getaddrinfo", "'huggingface.co'") in kinds, kinds
    assert not any("127.0.0.1" in t for _, t in kinds)


@pytest.fixture(scope="module")
def pipeline(blocked):
    """ingest -> train (merge on) -> merge, each a CLI process under the blocker: (name, process, attempts, envs)."""
    work = blocked.work
    with (work / "train.jsonl").open("w") as f:
        for i in range(48):
            f.write(json.dumps({"instruction": f"What colour is item {i}?", "output": f"Item {i} is red."}) + "\n")
    steps = {
        "ingest": ["ingest", "train.jsonl", "--out", "ds", "--map", "question=instruction", "answer=output"],
        "train": ["train", "--config", "demo", "model=arch:tiny-llama", "model.dtype=fp32", "demo.generate=false",
                  "data.path=ds", "data.eval_path=null", "data.seq_length=32", "training.max_steps=2",
                  "training.per_device_train_batch_size=2", "training.eval_strategy=no", "training.save_strategy=no",
                  "demo.accuracy_samples=0", "training.progress=false", "training.merge=true",
                  "training.output_dir=run", "demo.max_new_tokens=4"],
        "merge": ["merge", "--adapter", "run/adapter", "--out", "merged"],
    }
    results = []
    for name, args in steps.items():
        p = blocked.run(*args)
        assert p.returncode == 0, f"sft {name} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
        results.append((name, p, blocked.attempts(), blocked.envs()))
    return results


@pytest.mark.multiprocess
def test_no_network_without_a_remote_source(pipeline):
    for name, _, attempts, _ in pipeline:
        assert attempts == [], f"sft {name} tried the network: {attempts}"


@pytest.mark.multiprocess
def test_offline_mode_and_telemetry_switches(pipeline):
    for name, _, _, envs in pipeline:
        (rec,) = [e for e in envs if e["argv"][0].endswith("cli.py")]  # the CLI process (not helpers it spawns)
        env = rec["env"]
        assert env["HF_HUB_OFFLINE"] == "1", (name, env)  # no hub model named: the hub libraries run offline
        if name in ("train", "merge"):  # ...set before huggingface_hub (imported by transformers) read it
            assert rec["hub_offline_constant"] is True, rec
        assert env["HF_HUB_DISABLE_TELEMETRY"] == "1" and env["DO_NOT_TRACK"] == "1", (name, env)
        if name == "train":
            assert env["WANDB_MODE"] == "disabled", env  # report_to does not name wandb
        # deeplake 4.7 has no telemetry switch; its client sends nothing while it has no endpoint
        assert rec.get("deeplake_telemetry_endpoint", "") == "", rec


@pytest.mark.multiprocess
def test_offline_runs_print_no_kernel_hub_notes(pipeline):
    """bitsandbytes 0.50 asks the Hub for a CPU NF4 kernel when imported on a CPU with AVX512-BF16; offline that
    printed two WARNING lines in every run (only such CPUs make the request, so elsewhere this checks nothing)."""
    for name, p, _, _ in pipeline:
        assert "kernels-community" not in p.stdout + p.stderr, (name, p.stderr[-3000:])


@pytest.mark.multiprocess
def test_a_hub_model_is_the_only_thing_that_reaches_out(blocked, pipeline):
    """A config naming a hub id is allowed its hub look-up (offline mode stays off), and nothing else; without a
    network that is one failed DNS query and an error naming the local alternatives."""
    p = blocked.run("train", "--config", "demo", "model=facebook/opt-125m", "demo.generate=false", "data.path=ds",
                    "data.eval_path=null", "training.output_dir=hubrun")
    assert p.returncode == 2, p.stderr
    assert "is a hub id that is not in the local cache, and the hub cannot be reached" in p.stderr
    assert "model.name=arch:opt-125m" in p.stderr
    hosts = {a["target"] for a in blocked.attempts()}
    assert hosts == {"'huggingface.co'"}, hosts
    (rec,) = blocked.envs()
    assert rec["env"]["HF_HUB_OFFLINE"] is None and rec["env"]["HF_HUB_DISABLE_TELEMETRY"] == "1"
    assert not (blocked.work / "hubrun").exists()


# ---------------------------------------------------------------------------------------------- safetensors only


class _Trap:
    """Unpickling this creates a marker file: proof that a pickle was (not) loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def pickled_model_dir(tmp_path) -> tuple[Path, Path]:
    from sft.models import arch_config

    model = tmp_path / "model"
    model.mkdir()
    arch_config("tiny-llama").save_pretrained(model)
    marker = tmp_path / "UNPICKLED"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    return model, marker


def test_a_pickled_checkpoint_is_never_loaded(pickled_model_dir, tmp_path, capsys):
    from sft import cli

    model, marker = pickled_model_dir
    fragment = (f"{model} holds its weights only as pytorch_model.bin: pickle files, which sft never loads "
                f"(unpickling can run arbitrary code). Convert them once to safetensors")
    saved = dict(os.environ)
    try:
        rc = cli.main(["train", "--config", "demo", f"model={model}", "demo.generate=false",
                       f"data.path={tmp_path / 'nope'}", f"training.output_dir={tmp_path / 'out'}"])
        err = capsys.readouterr().err
        assert rc == 2 and f"model.name: {fragment}" in err, err
        rc = cli.main(["generate", "--model", str(model), "--prompt", "hi"])
        err = capsys.readouterr().err
        assert rc == 2 and f"--model: {fragment}" in err, err
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert not marker.exists()


def test_model_loading_asks_for_safetensors(monkeypatch, tmp_path):
    """load_base_model passes use_safetensors=True to every from_pretrained of weights (a hub model too)."""
    import transformers

    from sft.config import ModelConfig, QuantizationConfig
    from sft.models import ModelSource, load_base_model

    seen = {}

    def fake(path, *a, **kw):
        seen.update(kw)
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    from sft.errors import ModelError

    with pytest.raises(ModelError, match="only safetensors weights are loaded"):
        load_base_model(ModelConfig(name="org/model"), QuantizationConfig(), source=ModelSource("hub", "org/model"))
    assert seen.get("use_safetensors") is True
