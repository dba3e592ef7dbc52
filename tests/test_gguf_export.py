"""GGUF export, checked by a reader someone else wrote: transformers' own GGUF loader.

Each exported file is loaded back with ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` and
``AutoTokenizer.from_pretrained(dir, gguf_file=...)``; its logits are compared with the source model's and its
tokenizer's ids with the source tokenizer's on a set of strings (special tokens, digits, whitespace, non-ASCII)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sft.config import ModelConfig
from sft.errors import ConfigError, ModelError
from sft.gguf_export import export_gguf
from sft.models import dense_copy_of_gguf, embedded_gguf, load_tokenizer

TEXTS = [
    "Hello world",
    "Question: What is 2+2?\n\nAnswer: 4",
    "  leading spaces,   runs   and\ttabs\n\n\nnewlines",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "café naïve Straße 東京 😀 — “quotes”",
    "The date 2024-03-15 is 15.MAR.2024; 1234567890 and 3.14159.",
    "def f(x):\n    return x ** 2  # comment",
]
TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.2)


def _smollm2_tokenizer():
    return load_tokenizer(ModelConfig(name="arch:tiny-llama"))  # the embedded SmolLM2 tokenizer, offline


def _qwen2_style(tok):
    """SmolLM2's vocabulary split the way Qwen2 splits text (what a Qwen2 tokenizer.json says): transformers reads a
    qwen2 GGUF's tokenizer with Qwen2's pre-tokenizer, so a Qwen2-shaped model needs a Qwen2-shaped tokenizer."""
    from tokenizers import Regex, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return tok


def _tiny_model_dir(tmp: Path, model_type: str, **extra) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **{**TINY, **extra})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    out = tmp / f"tiny-{model_type}"
    model.save_pretrained(out)
    tok = _smollm2_tokenizer()
    (_qwen2_style(tok) if model_type == "qwen2" else tok).save_pretrained(out)
    return out


def _round_trip(model_dir: Path, gguf: Path) -> dict:
    """Max |logit diff| and top-1 agreement over the unpadded positions, and tokenizer agreement on TEXTS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    got = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    assert type(got) is type(ref) or ref.config.model_type == "mistral"  # mistral reads back as llama
    tok_ref = AutoTokenizer.from_pretrained(model_dir)
    tok_got = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    same_ids = [tok_ref(t)["input_ids"] == tok_got(t)["input_ids"] for t in TEXTS]
    batch = tok_ref(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        a = ref(**batch).logits
        b = got(**batch).logits
    keep = batch["attention_mask"].bool()
    a, b = a[keep], b[keep]
    return {"max_abs_diff": (a - b).abs().max().item(), "max_abs_logit": a.abs().max().item(),
            "top1": (a.argmax(-1) == b.argmax(-1)).float().mean().item(), "same_ids": same_ids,
            "chat_template": tok_got.chat_template == tok_ref.chat_template,
            "special": (tok_got.bos_token, tok_got.eos_token) == (tok_ref.bos_token, tok_ref.eos_token)}


@pytest.mark.slow
@pytest.mark.parametrize("model_type,extra", [
    ("llama", {"tie_word_embeddings": True}),
    ("mistral", {"tie_word_embeddings": False, "sliding_window": None}),
    ("qwen2", {"tie_word_embeddings": False}),  # q/k/v biases, no rotary permutation
    ("llama", {"tie_word_embeddings": False, "head_dim": 32}),  # head_dim != hidden / heads
])
def test_tiny_model_round_trip_f32(tmp_path, model_type, extra):
    model_dir = _tiny_model_dir(tmp_path, model_type, **extra)
    report = export_gguf(model_dir, tmp_path / "out" / "tiny.gguf", "f32", progress=False)
    assert report.architecture == ("qwen2" if model_type == "qwen2" else "llama")
    r = _round_trip(model_dir, report.path)
    assert r["max_abs_diff"] <= 1e-4, r
    assert all(r["same_ids"]), r
    assert r["chat_template"] and r["special"], r


@pytest.mark.slow
def test_tiny_llama_q8_0_and_bf16(tmp_path):
    model_dir = _tiny_model_dir(tmp_path, "llama", tie_word_embeddings=False)
    sizes = {}
    for kind in ("q8_0", "bf16"):
        report = export_gguf(model_dir, tmp_path / f"tiny-{kind}.gguf", kind, progress=False)
        sizes[kind] = report.bytes
        r = _round_trip(model_dir, report.path)
        print(f"tiny llama {kind}: {r}")
        assert all(r["same_ids"]), r
        # 8-bit blocks / bf16 mantissas: small against the logits' range, mostly the same greedy token. A random
        # model over 49k ids has many near-ties, so the bound is looser than for SmolLM2's trained weights
        # (measured q8_0: max |diff| 0.50 of max |logit| 8.5, top-1 agreement 92%)
        assert r["max_abs_diff"] < 0.1 * r["max_abs_logit"], r
        assert r["top1"] >= 0.85, r
    assert sizes["q8_0"] < 0.6 * sizes["bf16"]  # q8_0 stores ~1.06 bytes per weight, bf16 2


@pytest.fixture(scope="module")
def merged_smollm2(tmp_path_factory) -> Path:
    """What the demo's merge writes: the embedded SmolLM2, dense fp32 safetensors, plus its tokenizer."""
    out = tmp_path_factory.mktemp("smollm2") / "merged"
    shutil.copytree(dense_copy_of_gguf(*embedded_gguf("smollm2-135m-instruct")), out)
    load_tokenizer(ModelConfig()).save_pretrained(out)
    return out


@pytest.mark.slow
def test_demo_smollm2_round_trip(merged_smollm2, tmp_path):
    f32 = export_gguf(merged_smollm2, tmp_path / "smollm2-f32.gguf", "f32", progress=False)
    r = _round_trip(merged_smollm2, f32.path)
    print(f"SmolLM2 f32: {r}")
    assert r["max_abs_diff"] <= 1e-4, r
    assert all(r["same_ids"]) and r["chat_template"] and r["special"], r
    f32.path.unlink()
    q8 = export_gguf(merged_smollm2, tmp_path / "smollm2-q8_0.gguf", "q8_0", progress=False)
    r = _round_trip(merged_smollm2, q8.path)
    print(f"SmolLM2 q8_0: {r}")
    assert all(r["same_ids"]), r
    # measured: max |diff| 1.27 against max |logit| 40.1, the same greedy token at 98.4% of positions
    assert r["max_abs_diff"] < 0.05 * r["max_abs_logit"], r
    assert r["top1"] >= 0.95, r
    assert q8.bytes < 0.3 * f32.bytes


def test_unsupported_architecture_fails_before_writing(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("opt", vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               ffn_dim=64, word_embed_proj_dim=32)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "opt")
    with pytest.raises(ModelError, match=r"supports llama \(incl. SmolLM2\), mistral and qwen2.*'opt'"):
        export_gguf(tmp_path / "opt", tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*gguf*"))


def test_bad_arguments_and_failures_leave_nothing(tmp_path):
    model_dir = _tiny_model_dir(tmp_path, "llama")
    with pytest.raises(ConfigError, match="choose one of f32, f16, bf16, q8_0"):
        export_gguf(model_dir, tmp_path / "x.gguf", "q4_k")
    with pytest.raises(ConfigError, match="must end in .gguf"):
        export_gguf(model_dir, tmp_path / "x.bin")
    (tmp_path / "exists.gguf").write_text("keep")
    with pytest.raises(ConfigError, match="pass --overwrite"):
        export_gguf(model_dir, tmp_path / "exists.gguf")
    assert (tmp_path / "exists.gguf").read_text() == "keep"
    # a tokenizer bigger than the model's embedding: refused after the writer exists, nothing is left behind
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, "vocab_size": 1000}))
    with pytest.raises(ModelError, match="more than the model's vocab_size 1000"):
        export_gguf(model_dir, tmp_path / "out" / "y.gguf")
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.multiprocess
def test_cli_export(tmp_path):
    model_dir = _tiny_model_dir(tmp_path, "llama")
    env_py = [sys.executable, "-m", "sft.cli"]
    proc = subprocess.run([*env_py, "export", "--model", str(model_dir), "--gguf", str(tmp_path / "t.gguf"),
                           "--type", "f16"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "t.gguf").is_file() and "llama-cli -m" in proc.stdout
    # the Ollama Modelfile is written beside the GGUF (its TEMPLATE: tests/test_own_data.py), and named in the output
    assert (tmp_path / "t.Modelfile").read_text().startswith("FROM ./t.gguf\nTEMPLATE")
    assert f"ollama create NAME -f {tmp_path / 't.Modelfile'}" in proc.stdout
    proc = subprocess.run([*env_py, "export", "--model", str(tmp_path / "nope"), "--gguf", str(tmp_path / "u.gguf")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not a directory" in proc.stderr
