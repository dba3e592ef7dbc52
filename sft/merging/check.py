"""Models in memory: the base as trained with the adapter attached (the reference), and the merge's self-check.

The self-check reloads the merged model and compares its logits on a few tokens with the adapter model's (base as
trained, fp32 arithmetic, for a 4-bit base the dequantized weights), within :func:`_tolerance`. It never holds two
models: the reference logits are computed and the adapter model freed before the merged model is loaded. It does
need one full fp32 copy of the model (~6 bytes per parameter at the peak), so ``check="auto"`` skips it, with a
warning, when that does not fit in :data:`CHECK_MEMORY_FRACTION` of the available memory.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from sft.errors import MergeError
from sft.models.base_meta import base_configs
from sft.merging.plan import LORA_KEY, ADAPTER_WEIGHTS, check_adapter_files, mismatch_error

log = logging.getLogger(__name__)

CHECK_MEMORY_FRACTION = 0.7


def _reference_base(model_cfg, quant_cfg, seed: int, base_dir: Path | None, dtype: torch.dtype):
    """The base as the adapter was trained against, dense, in ``dtype``: the dtype policy's weights, and for a 4-bit
    base the loaded model's own dequantized weights (transformers' ``dequantize``, bitsandbytes underneath)."""
    from sft.config import ModelConfig
    from sft.models import load_base_model, resolve_source

    cfg = model_cfg
    if base_dir is not None:  # the same weights, from the files the merge reads (a cached arch / GGUF copy)
        cfg = ModelConfig(**{**asdict(model_cfg), "name": str(base_dir), "gguf_file": None})
    cfg = ModelConfig(**{**asdict(cfg), "attn_implementation": "sdpa"})
    base = load_base_model(cfg, quant_cfg, seed=seed, source=resolve_source(cfg))
    if quant_cfg.mode == "nf4":
        from sft.patches.transformers import forget_quantization

        base = base.dequantize()
        forget_quantization(base)
    return base.to(dtype)


def load_adapter_model(adapter_dir: str | Path, dtype: torch.dtype = torch.float32, base_override: str | None = None,
                       keep_4bit: bool = False):
    """The base (rebuilt as trained) with the adapter attached, unmerged; and the tokenizer.

    A 4-bit base is dequantized (its own NF4 weights, dense, in ``dtype``) unless ``keep_4bit``: then it stays a
    bitsandbytes model computing in its compute dtype, as in training."""

    from sft.models import load_base_model, resolve_source

    adapter_dir = Path(adapter_dir)
    check_adapter_files(adapter_dir)  # PEFT would unpickle an adapter_model.bin: refuse it here
    model_cfg, quant_cfg, seed = base_configs(adapter_dir, base_override)
    if quant_cfg.mode == "nf4" and keep_4bit:
        base = load_base_model(model_cfg, quant_cfg, seed=seed, source=resolve_source(model_cfg))
    else:
        base = _reference_base(model_cfg, quant_cfg, seed, None, dtype)
    model = _attach(base, adapter_dir, model_cfg)
    model.eval()
    return model, adapter_tokenizer(adapter_dir, model_cfg)


def reference_adapter_model(model_cfg, quant_cfg, seed: int, base_dir: Path | None, adapter_dir: Path):
    """The adapter model as trained (fp32 arithmetic): the reference logits, and for the whole-model path the model
    that is merged."""
    model = _attach(_reference_base(model_cfg, quant_cfg, seed, base_dir, torch.float32), adapter_dir, model_cfg)
    model.eval()
    return model


def _attach(base, adapter_dir: Path, model_cfg):
    from peft import PeftModel

    import warnings

    try:
        with warnings.catch_warnings():
            # checked below, with a message naming both models (PEFT only warns, and merges nothing)
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    except Exception as e:  # shape mismatches (RuntimeError), unknown target modules (ValueError), bad files
        raise mismatch_error(adapter_dir, model_cfg.name, (str(e).splitlines() or [type(e).__name__])[0]) from e
    # Target modules given by short names (q_proj) also match in another architecture, where PEFT creates fresh
    # LoRA layers under other paths, ignores the adapter's weights (a warning, not an error) and the "merge" would
    # silently be the bare base. Every LoRA module of the file must land on a LoRA layer of the model, and back.
    from safetensors import safe_open

    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as f:
        in_file = {m["module"] for k in f.keys() if (m := LORA_KEY.match(k))}
    in_model = {name.removeprefix("base_model.model.") for name, mod in model.named_modules()
                if isinstance(getattr(mod, "lora_A", None), torch.nn.ModuleDict) and len(mod.lora_A)}
    unplaced, unfilled = sorted(in_file - in_model), sorted(in_model - in_file)
    if unplaced or unfilled:
        detail = (f"the base has no module {unplaced[0]}" + (f" (nor {len(unplaced) - 1} more)" if len(unplaced) > 1 else "")
                  + " for the adapter's LoRA weights") if unplaced else (
                  f"the adapter has no LoRA weights for the base's {unfilled[0]}"
                  + (f" (nor {len(unfilled) - 1} more)" if len(unfilled) > 1 else ""))
        raise mismatch_error(adapter_dir, model_cfg.name, detail)
    return model


def adapter_tokenizer(adapter_dir: Path, model_cfg):
    from sft.models import load_tokenizer

    if (adapter_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(adapter_dir)
    else:
        tok = load_tokenizer(model_cfg)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def probe_ids(tokenizer, vocab: int) -> torch.Tensor:
    """Two rows of 16 tokens: a templated question, and seeded random ids over the whole vocabulary."""
    ids = tokenizer("Question: What is the capital of France?\n\nAnswer: Paris is the capital",
                    return_tensors="pt")["input_ids"][:, :16]
    ids = ids.clamp(max=vocab - 1)
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(0, vocab, (1, ids.shape[1]), generator=g)
    return torch.cat([ids, rand])


@torch.no_grad()
def probe_logits(model, probe: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device  # a 4-bit base lands on the GPU when there is one
    return model(input_ids=probe.to(device)).logits.float().cpu()


def _tolerance(save_dtype: torch.dtype, max_ref: float) -> float:
    # fp32: the merged weights equal base + scale*B@A up to float rounding (~1e-6 of the logit scale).
    # bf16: each merged weight is rounded to bf16 once (2^-9 relative), which moves logits by well under 1% of
    # their scale; wrong merges (the wrong base, a 4-bit base merged onto its original weights) move them by more.
    return (1e-4 if save_dtype == torch.float32 else 3e-2) * max(1.0, max_ref)


def estimated_check_bytes(headers) -> int:
    n = 0
    for specs in headers.values():
        for _, _, shape in specs:
            k = 1
            for d in shape:
                k *= d
            n += k
    return 6 * n  # fp32 copy + a bf16 copy while loading


def want_check(check: bool | str, need_bytes: int | None) -> bool:
    if check is True or check is False:
        return check
    if check != "auto":
        raise MergeError(f"check must be True, False or 'auto', not {check!r}")
    if need_bytes is None:
        return True
    import psutil

    avail = psutil.virtual_memory().available
    if need_bytes > CHECK_MEMORY_FRACTION * avail:
        log.warning("merge: skipping the logits self-check: it needs ~%.1f GiB, %.1f GiB are available "
                    "(force it with check=True)", need_bytes / 2**30, avail / 2**30)
        return False
    return True


def check_error(max_diff: float, tol: float) -> MergeError:
    return MergeError(f"merged model's logits differ from the adapter model's by {max_diff:.3g} (tolerance "
                      f"{tol:.3g}); the merge is wrong and was not written")


def merged_diff(merged_dir: Path, probe: torch.Tensor, reference: torch.Tensor,
                 save_dtype: torch.dtype) -> tuple[float, float, float]:
    """Reload the merged model: ``(max |logits - reference|, max |reference|, the tolerance for save_dtype)``."""
    from sft.models.pretrained import load_pretrained

    try:
        reloaded = load_pretrained(merged_dir, dtype=torch.float32, attn_implementation="sdpa",
                                                        use_safetensors=True)
    except Exception as e:
        raise MergeError(f"the merged model does not load: {e}") from e
    got = probe_logits(reloaded, probe)
    reloaded = None
    gc.collect()
    max_diff = (got - reference).abs().max().item()
    max_ref = reference.abs().max().item()
    return max_diff, max_ref, _tolerance(save_dtype, max_ref)
