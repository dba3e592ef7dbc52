"""4-bit NF4 (QLoRA) with bitsandbytes: the load-time config, the storage dtype under sharded launches, which
weights are quantized, and the NF4 round trip the merge reproduces."""

from __future__ import annotations

import logging

import torch

from sft.config import QuantizationConfig
from sft.distributed import sharded_launch
from sft.errors import ConfigError
from sft.models.precision import to_torch_dtype

log = logging.getLogger(__name__)


# bitsandbytes' Params4bit default, which transformers uses when it quantizes a checkpoint while loading it
# (BitsAndBytesConfig has no block-size option). The merge re-quantizes with exactly this.
NF4_BLOCKSIZE = 64


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


def bnb_config(q: QuantizationConfig):
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
        bnb_4bit_compute_dtype=to_torch_dtype(q.compute_dtype),
        bnb_4bit_quant_storage=to_torch_dtype(resolve_quant_storage(q)),
    )


def nf4_roundtrip(weight: torch.Tensor, q: QuantizationConfig, device: str | torch.device | None = None) -> torch.Tensor:
    """The weight a QLoRA model computes with: bitsandbytes' dequantization of its NF4 quantization.

    Reproduces what loading with :func:`bnb_config` does to one Linear weight: cast to the compute dtype
    (transformers casts before quantizing), quantize in blocks of :data:`NF4_BLOCKSIZE` with the absmax
    constants quantized again when ``double_quant``, then dequantize (the result is in the compute dtype).
    ``device``: where to quantize (default: CUDA when present, like training; else CPU). Returned on CPU."""
    import bitsandbytes.functional as bnbf

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    w = weight.to(device=device, dtype=to_torch_dtype(q.compute_dtype)).contiguous()
    packed, state = bnbf.quantize_4bit(
        w, blocksize=NF4_BLOCKSIZE, compress_statistics=q.double_quant, quant_type="nf4",
        quant_storage=to_torch_dtype(q.quant_storage or "uint8"),
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

        bnb_cfg = bnb_config(q)
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
