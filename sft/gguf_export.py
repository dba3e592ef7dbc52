"""Export a (merged) Hugging Face model directory to one GGUF file for llama.cpp and Ollama.

Supported: the Llama family as llama.cpp names it -- ``llama`` (Llama 2/3 shapes, SmolLM2), ``mistral`` (written
as llama.cpp's ``llama`` architecture, as its own converter does) and ``qwen2``. Anything else is refused before
any work. The file carries the weights (f32, f16, bf16 or q8_0), the tokenizer (byte-level BPE, or a
sentencepiece-style BPE with byte fallback), its special tokens, merges and chat template, and the hyper-parameters
llama.cpp reads.

Two facts of the format shape the code:
* llama.cpp's ``llama`` architecture rotates interleaved pairs of each head's dimensions, transformers rotates its
  two halves (``rotate_half``): Q and K rows are permuted per head so both compute the same. ``qwen2`` uses the
  halves layout in llama.cpp too and is written unpermuted. transformers' own GGUF reader undoes exactly this,
  which is what the round-trip tests check.
* Tensors are streamed: the tensor table is written first (shapes and byte sizes are known from the safetensors
  headers), then one tensor at a time is read, converted and appended, so memory stays at about one tensor.

The file is written under a temporary name in the target folder and renamed into place; an error leaves nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sft.errors import ConfigError, ModelError
from sft.io import atomic_file, atomic_write_text

log = logging.getLogger(__name__)

TYPES = ("f32", "f16", "bf16", "q8_0")
#: transformers model_type -> llama.cpp architecture name
ARCHES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
SUPPORTED = "llama (incl. SmolLM2), mistral and qwen2"


@dataclass
class ExportReport:
    path: Path
    type: str
    architecture: str
    tensors: int
    bytes: int
    seconds: float


def _config(model_dir: Path) -> dict:
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"--model {model_dir}: no config.json; pass a merged model directory (output_dir/merged)")
    return json.loads(cfg_file.read_text())


def check_supported(config, quantized_ok: bool = False) -> str:
    """The llama.cpp architecture for a transformers config (dict or PretrainedConfig); ModelError otherwise.
    ``quantized_ok``: the config is of a training base that the merge will dequantize."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    model_type = get("model_type")
    if model_type not in ARCHES:
        raise ModelError(f"GGUF export supports {SUPPORTED} models; this one is {model_type!r}. "
                         "Use llama.cpp's convert_hf_to_gguf.py for other architectures")
    if get("quantization_config") and not quantized_ok:
        raise ModelError("GGUF export needs a model with plain weights; this one is quantized (merge the adapter "
                         "first: `sft merge` writes full-precision weights)")
    rope = get("rope_parameters") or get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", "linear"):
        raise ModelError(f"GGUF export: rope scaling {rope_type!r} is not supported (default and linear are)")
    return ARCHES[model_type]


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelError(f"--model {model_dir}: no model.safetensors (GGUF export reads safetensors only)")


def _permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Per head, rows [first half, second half] -> interleaved pairs (llama.cpp's rope layout)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _ggml_type(gg, kind: str, shape: tuple[int, ...]):
    """The GGML type of one tensor: vectors stay f32 (llama.cpp reads norms in f32); matrices take ``kind``,
    except q8_0 rows whose length is not a multiple of its 32-value block (those fall back to f16)."""
    Q = gg.GGMLQuantizationType
    if len(shape) < 2 or kind == "f32":
        return Q.F32
    if kind == "q8_0":
        block = gg.GGML_QUANT_SIZES[Q.Q8_0][0]
        return Q.Q8_0 if shape[-1] % block == 0 else Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16}[kind]


def _encode(gg, arr: np.ndarray, qtype) -> np.ndarray:
    Q = gg.GGMLQuantizationType
    if qtype == Q.F32:
        return arr.astype(np.float32, copy=False)
    if qtype == Q.F16:
        return arr.astype(np.float16)
    return gg.quants.quantize(arr, qtype)  # uint8 bytes (bf16, q8_0)


def _nbytes(gg, shape: tuple[int, ...], qtype) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape as passed to the writer, its dtype, bytes) without converting the tensor."""
    Q = gg.GGMLQuantizationType
    if qtype in (Q.F32, Q.F16):
        dtype = np.dtype(np.float32 if qtype == Q.F32 else np.float16)
        return shape, dtype, int(np.prod(shape)) * dtype.itemsize
    byte_shape = gg.quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


# --------------------------------------------------------------------------------------------- tokenizer


def _pre_tokenizer(tok_json: dict) -> str:
    """llama.cpp's name for how text is split before BPE, read from tokenizer.json (llama.cpp itself identifies it
    by hashing the ids of a probe text; the structures below are the ones this exporter recognises)."""
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in parts]
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if types and types[0] == "Split":
        pattern = (parts[0].get("pattern") or {}).get("Regex", "")
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2

        if pattern == QWEN2:
            return "qwen2"
        if pattern.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"):
            return "llama-bpe"
    log.warning("GGUF export: unrecognised pre-tokenizer %s; writing 'default'", types)
    return "default"


def _add_tokenizer(gg, writer, model_dir: Path, vocab_size: int) -> dict:
    """Tokens, token types, merges, special token ids, add-BOS/EOS flags and the chat template."""
    from transformers import AutoTokenizer

    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise ModelError(f"--model {model_dir}: no tokenizer.json (a fast tokenizer is needed for GGUF export)")
    tok_json = json.loads(tok_file.read_text())
    model = tok_json.get("model") or {}
    tok = AutoTokenizer.from_pretrained(model_dir)
    n = len(tok)
    if n > vocab_size:
        raise ModelError(f"GGUF export: the tokenizer has {n} tokens, more than the model's vocab_size {vocab_size}")
    T = gg.TokenType
    byte_level = model.get("type") == "BPE" and not model.get("byte_fallback") and \
        (tok_json.get("decoder") or {}).get("type") == "ByteLevel"
    if byte_level:
        by_id = {i: t for t, i in tok.backend_tokenizer.get_vocab(with_added_tokens=True).items()}
        added = tok.added_tokens_decoder
        tokens, types = [], []
        for i in range(n):
            tokens.append(by_id[i])
            a = added.get(i)
            types.append(T.NORMAL if a is None else (T.CONTROL if a.special else T.USER_DEFINED))
        scores = None
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer(tok_json))
    elif model.get("type") == "BPE" and model.get("byte_fallback"):
        vocab = gg.vocab.LlamaHfVocab(model_dir)  # sentencepiece-style BPE: Llama 2, Mistral v0.x, TinyLlama
        tokens, scores, types = [], [], []
        for text, score, ttype in vocab.all_tokens():
            tokens.append(text.decode("utf-8") if isinstance(text, bytes) else text)
            scores.append(score)
            types.append(ttype)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
    else:
        raise ModelError(f"GGUF export: tokenizer model {model.get('type')!r} is not supported (byte-level BPE and "
                         "sentencepiece-style BPE with byte fallback are)")
    for i in range(len(tokens), vocab_size):  # an embedding padded past the tokenizer (llama.cpp's convention)
        tokens.append(f"[PAD{i}]")
        types.append(T.UNUSED)
        if scores is not None:
            scores.append(-1000.0)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    special = gg.SpecialVocab(model_dir, load_merges=byte_level, n_vocab=vocab_size)
    # what this tokenizer really does, rather than what its config files may imply
    probe = "hello"
    with_special, plain = tok(probe)["input_ids"], tok(probe, add_special_tokens=False)["input_ids"]
    special.add_special_token["bos"] = tok.bos_token_id is not None and with_special[:1] == [tok.bos_token_id] \
        and plain[:1] != [tok.bos_token_id]
    special.add_special_token["eos"] = tok.eos_token_id is not None and with_special[-1:] == [tok.eos_token_id] \
        and plain[-1:] != [tok.eos_token_id]
    for name in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{name}_token_id")
        if tid is not None:
            special.special_token_ids[name] = tid
    if tok.chat_template and special.chat_template is None:
        special.chat_template = tok.chat_template
    special.add_to_gguf(writer, quiet=True)
    return {"tokens": n, "pre": "default" if not byte_level else _pre_tokenizer(tok_json)}


# --------------------------------------------------------------------------------------------- model


def _add_hparams(gg, writer, cfg: dict, name: str, kind: str) -> None:
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    writer.add_name(name)
    writer.add_type("model")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(float(theta))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope.get("rope_type", rope.get("type")) == "linear":
        writer.add_rope_scaling_type(gg.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_vocab_size(cfg["vocab_size"])
    ftype = {"f32": gg.LlamaFileType.ALL_F32, "f16": gg.LlamaFileType.MOSTLY_F16,
             "bf16": gg.LlamaFileType.MOSTLY_BF16, "q8_0": gg.LlamaFileType.MOSTLY_Q8_0}[kind]
    writer.add_file_type(int(ftype))
    if kind == "q8_0":
        writer.add_quantization_version(gg.GGML_QUANT_VERSION)
    window = cfg.get("sliding_window")
    if cfg["model_type"] == "mistral" and window and window < cfg["max_position_embeddings"]:
        log.warning("GGUF export: llama.cpp runs this Mistral model with full attention, not its %d-token sliding "
                    "window (outputs differ only past %d tokens)", window, window)


def _plan(gg, files: list[Path], cfg: dict, arch: str, kind: str) -> list[tuple[str, str, Path, object, tuple]]:
    """(hf name, gguf name, file, ggml type, shape) of every tensor written, in order; unknown tensors are refused."""
    from safetensors import safe_open

    name_map = gg.get_tensor_name_map(gg.MODEL_ARCH.LLAMA if arch == "llama" else gg.MODEL_ARCH.QWEN2,
                                      cfg["num_hidden_layers"])
    tied = cfg.get("tie_word_embeddings", False)
    plan = []
    for f in files:
        with safe_open(f, framework="pt") as st:
            for key in st.keys():
                if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                    continue  # recomputed by llama.cpp / the embedding doubles as the head
                gname = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
                if gname is None:
                    raise ModelError(f"GGUF export: no llama.cpp name for tensor {key!r} of {f}")
                shape = tuple(st.get_slice(key).get_shape())
                plan.append((key, gname, f, _ggml_type(gg, kind, shape), shape))
    return plan


def export_gguf(model_dir: str | Path, out: str | Path, kind: str = "f16", overwrite: bool = False,
                progress: bool = True, name: str | None = None) -> ExportReport:
    """Write ``out`` (a .gguf file) from the Hugging Face model in ``model_dir``."""
    import time

    import gguf as gg
    from safetensors import safe_open
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    model_dir, out = Path(model_dir), Path(out)
    if kind not in TYPES:
        raise ConfigError(f"--type {kind!r}: choose one of {', '.join(TYPES)}")
    if out.suffix != ".gguf":
        raise ConfigError(f"--gguf {out}: the file name must end in .gguf")
    if out.exists() and not overwrite:
        raise ConfigError(f"--gguf {out} already exists; pass --overwrite to replace it")
    if not model_dir.is_dir():
        raise ModelError(f"--model {model_dir}: not a directory; pass a merged model (output_dir/merged)")
    cfg = _config(model_dir)
    arch = check_supported(cfg)
    files = _weight_files(model_dir)
    plan = _plan(gg, files, cfg, arch, kind)
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        writer = gg.GGUFWriter(tmp, arch)
        try:
            _add_hparams(gg, writer, cfg, name or model_dir.resolve().name, kind)
            _add_tokenizer(gg, writer, model_dir, cfg["vocab_size"])
            total = 0
            for _, gname, _, qtype, shape in plan:
                wshape, dtype, nbytes = _nbytes(gg, shape, qtype)
                writer.add_tensor_info(gname, wshape, dtype, nbytes, raw_dtype=None if dtype != np.uint8 else qtype)
                total += nbytes
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            with contextlib.ExitStack() as stack:
                handles = {f: stack.enter_context(safe_open(f, framework="pt")) for f in files}
                for key, gname, f, qtype, _ in tqdm(plan, desc=f"GGUF {kind}", unit="tensor", disable=not progress):
                    w = handles[f].get_tensor(key).to(torch.float32)
                    if arch == "llama" and ".attn_q." in gname:
                        w = _permute_rotary(w, heads)
                    elif arch == "llama" and ".attn_k." in gname:
                        w = _permute_rotary(w, kv_heads)
                    writer.write_tensor_data(_encode(gg, w.numpy(), qtype))
        finally:
            writer.close()
    return ExportReport(path=out, type=kind, architecture=arch, tensors=len(plan), bytes=out.stat().st_size,
                        seconds=time.perf_counter() - t0)


def run_lines(path: Path, modelfile: Path | None = None) -> list[str]:
    """How to run the file: llama.cpp's CLI, and the Ollama Modelfile beside it."""
    modelfile = modelfile or path.parent / "Modelfile"
    return [f"llama-cli -m {path}",
            f"ollama create NAME -f {modelfile}   (its TEMPLATE is the training prompt format)"]


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


#: Stands for the question while the training prompt is rendered, to cut it into Ollama's template around it.
_QUESTION = "\x00sft-question\x00"


def modelfile_text(gguf_name: str, tokenizer, template: str = "default") -> str:
    """An Ollama Modelfile for a GGUF trained with ``data.template``: FROM, the TEMPLATE that renders a prompt
    exactly as training formatted it (the training prompt around Ollama's ``{{ .Prompt }}``: ``Question: …\\n\\n
    Answer:`` or the tokenizer's chat template, its default system prompt included), and stop strings (the EOS
    token training appended after every answer; for the default template also the start of a next question).
    Without TEMPLATE, Ollama applies the base model's chat template, a format the adapter never saw."""
    from sft.data.formatting import prompt_text

    prefix, sep, suffix = prompt_text(tokenizer, _QUESTION, template).partition(_QUESTION)
    if not sep:
        raise ModelError(f"data.template {template}: the prompt does not contain the question; cannot write "
                              "an Ollama TEMPLATE for it")

    def go_literal(text: str) -> str:  # text outside {{ }} is literal in Go templates, except "{{" itself
        return text.replace("{{", '{{ "{{" }}')

    body = go_literal(prefix) + "{{ .Prompt }}" + go_literal(suffix)
    if '"""' in body:
        raise ModelError('the training prompt contains """, which an Ollama TEMPLATE cannot hold')
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    if template == "default":
        stops.append("\n\nQuestion:")
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{body}"""']
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    return "\n".join(lines) + "\n"


def trained_template(model_dir: Path) -> str:
    """The ``data.template`` a merged model was trained with, from its run's summary.json (``output_dir/merged``
    beside ``output_dir/summary.json``); ``default`` when there is none."""
    try:
        return json.loads((model_dir.parent / "summary.json").read_text())["config"]["data"]["template"]
    except (OSError, ValueError, KeyError, TypeError):
        return "default"


def write_modelfile(model_dir: Path, gguf: Path, template: str | None = None) -> tuple[Path, str]:
    """``<gguf stem>.Modelfile`` beside ``gguf`` for ``sft export`` (``template`` None: the one the run trained
    with); named after the GGUF so that exporting several types into one folder replaces no other file."""
    template = template or trained_template(model_dir)
    modelfile = gguf.with_suffix(".Modelfile")
    atomic_write_text(modelfile, modelfile_text(gguf.name, _tokenizer(model_dir), template))
    return modelfile, template


def export_after_merge(merged_dir: Path, out_dir: Path, kind: str, progress: bool = True,
                       template: str = "default") -> dict[str, str]:
    """``training.export_gguf``: output_dir/model-<type>.gguf from the merged model, and a Modelfile beside it
    whose TEMPLATE is the run's ``data.template``."""
    report = export_gguf(merged_dir, out_dir / f"model-{kind}.gguf", kind, overwrite=True, progress=progress,
                         name=out_dir.resolve().name)
    modelfile = out_dir / "Modelfile"
    atomic_write_text(modelfile, modelfile_text(report.path.name, _tokenizer(merged_dir), template))
    print(f"wrote {report.path} ({report.type}, {report.bytes / 2**20:.1f} MiB, {report.seconds:.1f} s)")
    return {"gguf": str(report.path), "modelfile": str(modelfile)}
