"""Merge a LoRA adapter into its base: a standalone model that ``AutoModelForCausalLM.from_pretrained`` loads.

Only rank 0 calls :func:`merge_adapter` (the trainer makes the other ranks wait at a barrier).

How the base is rebuilt: next to the adapter, training writes ``sft_base.json`` (the model section of the run
config, the quantization section and the seed). That is what makes ``sft merge`` work for every model source,
random-init architectures (rebuilt bit-identically from the seed) and GGUF files included. Without it, the
adapter's own ``base_model_name_or_path`` is used.

Why the base is loaded with the run's dtype policy: the adapter was trained against the bf16-rounded weights,
so it is added to exactly those (cast to fp32 for the addition), then the sum is written in the weights' dtype.

Safety: the model is written to a temporary sibling directory, reloaded, and its logits on a few tokens are
compared with the adapter model's; only then is it renamed into place. A mismatch raises MergeError and leaves
nothing behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sft.errors import MergeError

log = logging.getLogger(__name__)

BASE_META = "sft_base.json"


@dataclass
class MergeReport:
    out: str
    max_abs_diff: float
    max_abs_logit: float
    dtype: str
    seconds: float


def write_base_meta(adapter_dir: str | Path, model_cfg, quant_cfg, seed: int) -> None:
    from dataclasses import asdict

    meta = {"model": asdict(model_cfg), "quantization": asdict(quant_cfg), "seed": seed}
    Path(adapter_dir, BASE_META).write_text(json.dumps(meta, indent=2))


def _base_configs(adapter_dir: Path):
    from sft.config import ModelConfig, QuantizationConfig

    meta_path = adapter_dir / BASE_META
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return ModelConfig(**meta["model"]), QuantizationConfig(**meta["quantization"]), int(meta.get("seed", 42))
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    name = cfg.get("base_model_name_or_path")
    if not name:
        raise MergeError(
            f"{adapter_dir}: no {BASE_META} and no base_model_name_or_path in adapter_config.json; "
            f"cannot tell which base this adapter belongs to"
        )
    return ModelConfig(name=name), QuantizationConfig(), 42


def load_adapter_model(adapter_dir: str | Path, dtype: torch.dtype = torch.float32, base_override: str | None = None):
    """The base (rebuilt as trained) with the adapter attached, unmerged, in ``dtype``; and the tokenizer."""
    from peft import PeftModel

    from sft.models import load_base_model, load_tokenizer, resolve_source

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise MergeError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
    model_cfg, quant_cfg, seed = _base_configs(adapter_dir)
    if base_override:
        model_cfg.name = base_override
        model_cfg.gguf_file = None
    source = resolve_source(model_cfg)
    base = load_base_model(model_cfg, quant_cfg, seed=seed, source=source)
    base = base.to(dtype)
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        raise MergeError(
            f"the adapter in {adapter_dir} does not fit the base {model_cfg.name}: {str(e).splitlines()[0]}. "
            f"Pass the base it was trained on (--base)"
        ) from e
    if (adapter_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    else:
        tokenizer = load_tokenizer(model_cfg, source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def _probe_ids(tokenizer, vocab: int) -> torch.Tensor:
    ids = tokenizer("Question: What is the capital of France?\n\nAnswer:", return_tensors="pt")["input_ids"]
    return ids.clamp(max=vocab - 1)


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, overwrite: bool = False,
                  base_override: str | None = None, check: bool = True) -> MergeReport:
    """Merge ``adapter_dir`` into its base and write a standalone model to ``out_dir`` (atomically)."""
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise MergeError(f"{out_dir} already exists; pass --overwrite to replace it")
    model_cfg, _, _ = _base_configs(adapter_dir)
    save_dtype = torch.float32 if model_cfg.dtype == "fp32" else torch.bfloat16

    model, tokenizer = load_adapter_model(adapter_dir, dtype=torch.float32, base_override=base_override)
    probe = _probe_ids(tokenizer, model.get_input_embeddings().num_embeddings)
    with torch.no_grad():
        reference = model(input_ids=probe).logits.float()
    merged = model.merge_and_unload()
    merged.to(save_dtype)
    merged.config.use_cache = True

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=out_dir.name + ".tmp-"))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del merged, model
        max_diff = max_ref = 0.0
        if check:
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
            with torch.no_grad():
                got = reloaded(input_ids=probe).logits.float()
            max_diff = (got - reference).abs().max().item()
            max_ref = reference.abs().max().item()
            # fp32: the merged weights equal base + BA up to float rounding. bf16: the sum is rounded to bf16 once
            # more, which moves logits by ~1% of their scale.
            tol = (1e-4 if save_dtype == torch.float32 else 3e-2) * max(1.0, max_ref)
            if not max_diff <= tol:
                raise MergeError(
                    f"merged model's logits differ from the adapter model's by {max_diff:.3g} (tolerance {tol:.3g}); "
                    f"the merge is wrong and was not written"
                )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return MergeReport(
        out=str(out_dir), max_abs_diff=max_diff, max_abs_logit=max_ref,
        dtype=str(save_dtype).replace("torch.", ""), seconds=time.perf_counter() - t0,
    )
