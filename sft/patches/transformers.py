"""sft's changes to transformers' objects: the fused CPU ops installed as instance ``forward``s (norm, SwiGLU, the
chunked loss), attributes its layers read (the attention's math backward, base dropout, partial checkpointing, a
dequantized model's quantizer), the bf16 check of ``TrainingArguments``, the ``sft_varlen`` attention registration,
and the private ``Trainer`` methods sft's Trainer overrides (those stay in sft/trainer/, listed here).

Replaced by the documented route: a random ``arch:`` model's attention was chosen by assigning
``model.config._attn_implementation``; it now goes through ``model.set_attn_implementation`` (the same config value
and the same modules, checked in tests/test_patches.py).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import types

import torch

from sft.patches.registry import VERIFIED, need, need_attr, need_params, register, route_forward
from sft.patches.registry import applied as _ran

LLAMA = "transformers.models.llama.modeling_llama"
TORCH = (f"torch {VERIFIED['torch']}",)  # the kernels' torch (torch.compile, the CPU flash attention op)

# -- the fused CPU ops as instance forwards -----------------------------------------------------------------------

FUSED_NORM = "transformers.rmsnorm_forward"
FUSED_MLP = "transformers.mlp_forward"
FUSED_ROPE = "transformers.apply_rotary_pos_emb"
CHUNKED_LOSS = "transformers.causal_lm_forward"


def install_fused_norm(model: torch.nn.Module) -> int:
    """Route every Llama-style RMSNorm of ``model`` through :func:`sft.ops.norm.rms_norm`. Returns how many."""
    from sft.ops import norm

    return route_forward(model, norm.applies_to, norm.rms_norm, FUSED_NORM)


def install_fused_mlp(model: torch.nn.Module) -> int:
    """Route every Llama-style SiLU MLP of ``model`` through :func:`sft.ops.mlp.swiglu_mlp`. Returns how many."""
    from sft.ops import mlp

    return route_forward(model, mlp.applies_to, mlp.swiglu_mlp, FUSED_MLP)


def install_fused_rope(model: torch.nn.Module) -> int:
    """Swap ``apply_rotary_pos_emb`` for :func:`sft.ops.rope.fused` of it in the transformers modeling module of
    every attention layer of ``model`` whose forward calls it, where it computes Llama's (process-wide: every model of those modules runs it from now on). Returns how many of ``model``'s attention
    modules now run the fused function."""
    import sys

    from sft.ops import rope

    n = 0
    for m in model.modules():
        cls = type(m)
        mod = sys.modules.get(cls.__module__)
        fn = getattr(mod, "apply_rotary_pos_emb", None)
        if fn is None or not cls.__name__.endswith("Attention"):
            continue
        try:
            calls = "apply_rotary_pos_emb(" in inspect.getsource(cls.forward)
        except (OSError, TypeError):
            calls = False
        if not calls:
            continue
        if not hasattr(fn, "_sft_original"):
            if not rope.is_llama_rope(fn):
                continue
            mod.apply_rotary_pos_emb = rope.fused(fn)
        n += 1
    if n:
        _ran(FUSED_ROPE)
    return n


def install_chunked_loss(model, chunk: int | None = None) -> bool:
    """Route ``model(…, labels=…)`` through :func:`sft.ops.loss.chunked_causal_lm_loss`. Returns False (and changes
    nothing) for model types not known to have a plain ``lm_head(hidden)`` head.

    The instance's ``forward`` is replaced: with labels, the base module computes the hidden states and the loss
    comes from the chunked path (``logits`` is None in the output); without labels (generation, inference) the
    model's own forward runs unchanged. Call before wrapping the model with PEFT."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from sft.ops.capabilities import supports
    from sft.ops.loss import chunked_causal_lm_loss

    if not supports("plain_lm_head", getattr(model.config, "model_type", None)):
        return False
    head = model.get_output_embeddings()
    body = getattr(model, model.base_model_prefix, None)
    if not isinstance(head, torch.nn.Linear) or body is None:
        return False
    original = model.forward

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None,
                num_items_in_batch=None, **kwargs):
        if labels is None or kwargs.get("shift_labels") is not None or kwargs.get("output_hidden_states"):
            return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            labels=labels, inputs_embeds=inputs_embeds, num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs.pop("logits_to_keep", None)
        kwargs.pop("return_dict", None)
        kwargs["use_cache"] = False
        out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   inputs_embeds=inputs_embeds, **kwargs)
        loss = chunked_causal_lm_loss(out.last_hidden_state, head, labels, num_items_in_batch, chunk)
        return CausalLMOutputWithPast(loss=loss, logits=None)

    model.forward = types.MethodType(forward, model)
    model._sft_chunked_loss = True
    _ran(CHUNKED_LOSS)
    return True


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                       num_hidden_layers=1, vocab_size=64)


def _check_fused_norm() -> None:
    from sft.ops import norm

    mod = importlib.import_module(LLAMA)
    cls = need_attr(mod, "LlamaRMSNorm", FUSED_NORM)
    need_params(cls.forward, ("self", "hidden_states"), FUSED_NORM)
    need(norm.applies_to(cls(8)), FUSED_NORM, "a LlamaRMSNorm no longer has a tensor weight and a float "
         "variance_epsilon (sft.ops.norm.applies_to)")


def _check_fused_mlp() -> None:
    from sft.ops import mlp

    mod = importlib.import_module(LLAMA)
    cls = need_attr(mod, "LlamaMLP", FUSED_MLP)
    need_params(cls.forward, ("self", "x"), FUSED_MLP)
    need(mlp.applies_to(cls(_llama_config())), FUSED_MLP, "a LlamaMLP is no longer gate/up/down projections with "
         "a SiLU act_fn (sft.ops.mlp.applies_to)")


def _check_fused_rope() -> None:
    from sft.ops import rope

    mod = importlib.import_module(LLAMA)
    fn = need_attr(mod, "apply_rotary_pos_emb", FUSED_ROPE)
    need(rope.is_llama_rope(getattr(fn, "_sft_original", fn)), FUSED_ROPE,
         "Llama's apply_rotary_pos_emb(q, k, cos, sin) no longer computes q * cos + rotate_half(q) * sin "
         "(sft.ops.rope.is_llama_rope)")
    cls = need_attr(mod, "LlamaAttention", FUSED_ROPE)
    need("apply_rotary_pos_emb(query_states, key_states, cos, sin)" in inspect.getsource(cls.forward), FUSED_ROPE,
         "LlamaAttention.forward no longer calls apply_rotary_pos_emb(query_states, key_states, cos, sin)")


def _check_chunked_loss() -> None:
    mod = importlib.import_module(LLAMA)
    cls = need_attr(mod, "LlamaForCausalLM", CHUNKED_LOSS)
    need_params(cls.forward, ("self", "input_ids", "attention_mask", "position_ids"), CHUNKED_LOSS)
    need_params(cls.forward, ("labels", "inputs_embeds", "logits_to_keep"), CHUNKED_LOSS, prefix=False)
    need(cls.base_model_prefix == "model", CHUNKED_LOSS, f"base_model_prefix is {cls.base_model_prefix!r}")
    need_attr(importlib.import_module("transformers.modeling_outputs"), "CausalLMOutputWithPast", CHUNKED_LOSS)
    model = cls(_llama_config())
    out = model.model(input_ids=torch.zeros(1, 2, dtype=torch.long))
    need(hasattr(out, "last_hidden_state"), CHUNKED_LOSS, "the base model's output has no last_hidden_state")


def _op_runs(module: str):
    return lambda: importlib.import_module(module).runs()


register(
    FUSED_NORM, "transformers", "LlamaRMSNorm-style modules (forward source equal to LlamaRMSNorm.forward)",
    "instance-forward",
    what="each such module's instance `forward` becomes sft.ops.norm.rms_norm (one compiled CPU kernel per "
         "direction while autograd is on; the module's own forward otherwise)",
    why="model.fused_norm: 12-13.5 ms -> 1.8 ms fwd+bwd per norm (sft/ops/norm.py); no fp32 activation copies",
    alternative="transformers' Hub kernels (use_kernels / kernelize with a kernel mapping for RMSNorm): fetches code "
                "from the Hub at model.train() and has no CPU RMSNorm with this numerics; kept. Hub kernels stay off "
                "(sft.models.pretrained.load_pretrained, use_kernels=False): with them on, model.train() reset "
                "these forwards (transformers 5.24, commit 1327c0e)",
    where=__name__, check=_check_fused_norm, runs=_op_runs("sft.ops.norm"), also=TORCH)

register(
    FUSED_MLP, "transformers", "LlamaMLP-style modules (forward source equal to LlamaMLP.forward, SiLU act_fn)",
    "instance-forward",
    what="each such module's instance `forward` becomes sft.ops.mlp.swiglu_mlp (the SiLU x up product compiled)",
    why="model.fused_mlp: fewer passes, silu(g) never stored (sft/ops/mlp.py)",
    alternative="none documented for CPU (Hub kernels have no CPU SwiGLU); kept",
    where=__name__, check=_check_fused_mlp, runs=_op_runs("sft.ops.mlp"), also=TORCH)

register(
    FUSED_ROPE, "transformers", "apply_rotary_pos_emb of transformers modeling modules (computing Llama's)",
    "module-function",
    what="the module's apply_rotary_pos_emb becomes sft.ops.rope.fused of it (q and k rotated by one compiled CPU "
         "kernel per direction while autograd is on; the original function otherwise)",
    why="model.fused_rope: one pass over q and k instead of five, no zeroed half-slice gradients (sft/ops/rope.py)",
    alternative="transformers' Hub kernels (use_kernelized_func / kernelize for rotary_pos_emb): fetch code from the "
                "Hub and have no CPU kernel; kept off",
    where=__name__, check=_check_fused_rope, runs=_op_runs("sft.ops.rope"), also=TORCH)

register(
    CHUNKED_LOSS, "transformers", "<Model>ForCausalLM instance forward (model types in capabilities.PLAIN_LM_HEAD)",
    "instance-forward",
    what="with labels, the instance `forward` runs the base model and sft.ops.loss.chunked_causal_lm_loss "
         "(logits=None); without labels the original forward",
    why="model.chunked_loss: never materialises batch x seq x vocab fp32 logits (~3 GB peak for OPT-125m 8x512)",
    alternative="Trainer(compute_loss_func=...) / model.loss_function receive logits already computed, so they "
                "cannot avoid them; kept",
    where=__name__, check=_check_chunked_loss, runs=_op_runs("sft.ops.loss"))


# -- the attention: sft_varlen registration and the math backward marker ------------------------------------------

ATTENTION_INTERFACE = "transformers.attention_interface"
MATH_BACKWARD = "transformers.attention_math_backward"


def register_attention() -> str:
    """Make ``attn_implementation="sft_varlen"`` known to transformers (attention function and mask builder: the
    SDPA mask, used by the fallback path). Idempotent."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    from sft.ops.attention import NAME, varlen_sdpa_forward

    AttentionInterface.register(NAME, varlen_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _ran(ATTENTION_INTERFACE)
    return NAME


def use_math_backward(model: torch.nn.Module) -> int:
    """Route ``model``'s per-document bf16 CPU attention through the hand-written backward
    (sft.ops.attention._CausalFlashMathBackward) by marking its attention modules; returns how many were marked."""
    from sft.ops.attention import MATH_BACKWARD_ATTR

    n = 0
    for m in model.modules():
        if hasattr(m, "is_causal") and type(m).__name__.endswith("Attention"):
            setattr(m, MATH_BACKWARD_ATTR, True)
            n += 1
    if n:
        _ran(MATH_BACKWARD)
    return n


def set_attention(model, name: str) -> None:
    """Switch ``model``'s attention implementation through transformers' documented ``set_attn_implementation``
    (the config value and every submodule's config; for a registered name such as ``sft_varlen`` too)."""
    model.set_attn_implementation(name)


def _check_attention_interface() -> None:
    tr = importlib.import_module("transformers")
    for cls in ("AttentionInterface", "AttentionMaskInterface"):
        need_attr(need_attr(tr, cls, ATTENTION_INTERFACE), "register", ATTENTION_INTERFACE)
    need_attr(importlib.import_module("transformers.masking_utils"), "sdpa_mask", ATTENTION_INTERFACE)
    fwd = need_attr(importlib.import_module("transformers.integrations.sdpa_attention"), "sdpa_attention_forward",
                    ATTENTION_INTERFACE)
    need_params(fwd, ("module", "query", "key", "value", "attention_mask"), ATTENTION_INTERFACE)
    need_attr(importlib.import_module("transformers.modeling_utils").PreTrainedModel, "set_attn_implementation",
              ATTENTION_INTERFACE)


def _check_math_backward() -> None:
    attn = need_attr(importlib.import_module(LLAMA), "LlamaAttention", MATH_BACKWARD)(_llama_config(), 0)
    need(hasattr(attn, "is_causal"), MATH_BACKWARD, "LlamaAttention instances no longer have is_causal (how the "
         "attention modules are recognised)")
    need(hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"), MATH_BACKWARD,
         "torch.ops.aten._scaled_dot_product_flash_attention_for_cpu is gone")


register(
    ATTENTION_INTERFACE, "transformers", "AttentionInterface / AttentionMaskInterface (process-wide registries)",
    "registration",
    what="registers attn_implementation 'sft_varlen' (sft.ops.attention.varlen_sdpa_forward, sdpa_mask)",
    why="per-document attention for packed blocks without the block-diagonal mask's masked work",
    alternative="this is the documented route (AttentionInterface.register); listed because it is process-wide",
    where=__name__, check=_check_attention_interface)

register(
    MATH_BACKWARD, "transformers", "attention modules (class name *Attention with is_causal): attribute "
    "_sft_attention_math_backward", "instance-attribute",
    what="marks each attention module so sft_varlen's bf16 CPU path uses sft's GEMM backward",
    why="model.fast_attention_backward: 1.6-1.8x faster per-document attention fwd+bwd on AMX; without AMX the fp32 "
        "kernel keeps bf16 inputs (1.2x faster, less memory; sft/ops/attention.py)",
    alternative="a second registered attention name (AttentionInterface) would carry the choice without touching "
                "modules, but changes the attn_implementation saved in the adapter's config; kept",
    where=__name__, check=_check_math_backward, runs=_op_runs("sft.ops.attention"), also=TORCH)


# -- attributes transformers' layers read ---------------------------------------------------------------------------

BASE_DROPOUT = "transformers.layer_dropout_attributes"
PARTIAL_CHECKPOINTING = "transformers.layer_gradient_checkpointing"
FORGET_QUANTIZATION = "transformers.dequantized_model_state"

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
    _ran(BASE_DROPOUT)
    return n


def keep_activations(model, keep_layers: int | None) -> int:
    """After ``activation_checkpointing_enable``: let the first ``keep_layers`` checkpointed layers keep their
    activations (selective checkpointing; transformers checks each layer's ``gradient_checkpointing`` flag).
    Returns the number of layers that still recompute."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    for m in layers[:keep_layers or 0]:
        m.gradient_checkpointing = False
    if layers and keep_layers:
        _ran(PARTIAL_CHECKPOINTING)
    return len(layers) - min(len(layers), keep_layers or 0)


def forget_quantization(model) -> None:
    """Make a dequantized (or GGUF-dequantized) model an ordinary dense one: transformers keeps its quantizer and
    the ``is_quantized`` flag, which forbid dtype casts and make PEFT treat it as k-bit."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _ran(FORGET_QUANTIZATION)


def _check_base_dropout() -> None:
    attn = importlib.import_module(LLAMA).LlamaAttention(_llama_config(), 0)
    need(isinstance(getattr(attn, "attention_dropout", None), float), BASE_DROPOUT,
         "LlamaAttention.attention_dropout is no longer a float attribute (model.dropout would not reach it)")
    from transformers import OPTConfig
    from transformers.models.opt.modeling_opt import OPTAttention

    opt = OPTAttention(OPTConfig(hidden_size=16, num_attention_heads=2, ffn_dim=32, num_hidden_layers=1,
                                 vocab_size=64), 0)
    need(isinstance(getattr(opt, "dropout", None), float), BASE_DROPOUT,
         "OPTAttention.dropout is no longer a float attribute (model.dropout would not reach it)")


def _check_partial_checkpointing() -> None:
    mod = importlib.import_module("transformers.modeling_layers")
    cls = need_attr(mod, "GradientCheckpointingLayer", PARTIAL_CHECKPOINTING)
    need("gradient_checkpointing" in vars(cls), PARTIAL_CHECKPOINTING, "GradientCheckpointingLayer has no "
         "gradient_checkpointing class attribute")
    need("self.gradient_checkpointing and self.training" in inspect.getsource(mod), PARTIAL_CHECKPOINTING,
         "GradientCheckpointingLayer no longer decides per layer from self.gradient_checkpointing")


def _check_forget_quantization() -> None:
    src = inspect.getsource(importlib.import_module("transformers.modeling_utils").PreTrainedModel)
    for name in ("hf_quantizer", "is_quantized"):
        need(name in src, FORGET_QUANTIZATION, f"PreTrainedModel no longer reads {name}")


register(
    BASE_DROPOUT, "transformers", "float dropout attributes of transformers' layers (attention_dropout, dropout, "
    "activation_dropout, ...)", "instance-attribute",
    what="model.dropout sets those attributes (and nn.Dropout.p, and the config fields) on a loaded model",
    why="transformers' layers copy the config's dropout into attributes at construction; a loaded model's "
        "dropout can only change there",
    alternative="passing the model type's own config fields to from_pretrained (attention_dropout=..., per model "
                "type) before the load; not used: the names differ per architecture and arch:/GGUF models are "
                "built elsewhere; kept",
    where=__name__, check=_check_base_dropout)

register(
    PARTIAL_CHECKPOINTING, "transformers", "GradientCheckpointingLayer.gradient_checkpointing (per layer)",
    "instance-attribute",
    what="after checkpointing is enabled on every layer, the first N layers get gradient_checkpointing=False",
    why="gradient_checkpointing=auto: layers the chunked loss's saved memory pays for keep their activations",
    alternative="none: activation_checkpointing_enable / gradient_checkpointing_enable switch every layer; kept",
    where=__name__, check=_check_partial_checkpointing)

register(
    FORGET_QUANTIZATION, "transformers", "PreTrainedModel.hf_quantizer / is_quantized / config.quantization_config",
    "instance-attribute",
    what="cleared on a model whose weights were dequantized (the merge's 4-bit reference, the dense GGUF copy)",
    why="transformers keeps the quantizer after dequantize() / a GGUF load: dtype casts are refused and PEFT "
        "treats the dense model as k-bit",
    alternative="none documented (dequantize() leaves the quantizer); kept",
    where=__name__, check=_check_forget_quantization)


# -- TrainingArguments' bf16 check ----------------------------------------------------------------------------------

BF16_CHECK = "transformers.training_args.is_torch_bf16_gpu_available"


@contextlib.contextmanager
def bf16_allowed_on_cpu():
    """While the block runs, transformers' ``TrainingArguments`` bf16 check (``is_torch_bf16_gpu_available``) answers
    yes: for DeepSpeed on CPU, whose accelerator trains bf16 with torch's CPU kernels."""
    import transformers.training_args as ta

    original = ta.is_torch_bf16_gpu_available
    ta.is_torch_bf16_gpu_available = lambda: True
    _ran(BF16_CHECK)
    try:
        yield
    finally:
        ta.is_torch_bf16_gpu_available = original


def _check_bf16() -> None:
    ta = importlib.import_module("transformers.training_args")
    need_attr(ta, "is_torch_bf16_gpu_available", BF16_CHECK)
    need("is_torch_bf16_gpu_available()" in inspect.getsource(ta), BF16_CHECK,
         "TrainingArguments no longer calls is_torch_bf16_gpu_available() (the swap would do nothing)")


register(
    BF16_CHECK, "transformers", "transformers.training_args.is_torch_bf16_gpu_available (module function)",
    "module-function",
    what="answers True while TrainingArguments(bf16=True) is built, only for a DeepSpeed launch on CPU",
    why="TrainingArguments refuses bf16 without a bf16 GPU unless use_cpu, and use_cpu switches DeepSpeed off",
    alternative="none: TrainingArguments has no option for DeepSpeed's CPU accelerator; kept",
    where=__name__, check=_check_bf16)


# -- the Trainer methods sft's Trainer overrides (the code stays in sft/trainer/) ---------------------------------

#: private Trainer method -> (the sft module that overrides it, the signature it was written against, why)
TRAINER_OVERRIDES = {
    "_save_checkpoint": ("sft.trainer.checkpoint_io", ("self", "model", "trial"),
                         "crash-safe checkpoints: write into checkpoint-N.partial, add sft's extras, mark COMPLETE, "
                         "rename; no pickles"),
    "_save": ("sft.trainer.checkpoint_io", ("self", "output_dir", "state_dict"),
              "transformers' _save without torch.save(self.args) (training_args.bin, a pickle)"),
    "_save_optimizer_and_scheduler": ("sft.trainer.checkpoint_io", ("self", "output_dir"),
                                      "optimizer and scheduler state as safetensors + JSON (not torch.save)"),
    "_save_scaler": ("sft.trainer.checkpoint_io", ("self", "output_dir"), "the grad scaler as JSON"),
    "_save_rng_state": ("sft.trainer.checkpoint_io", ("self", "output_dir"), "RNG states as safetensors + JSON"),
    "_load_optimizer_and_scheduler": ("sft.trainer.checkpoint_io", ("self", "checkpoint"),
                                      "reads sft's pickle-free optimizer format"),
    "_load_scaler": ("sft.trainer.checkpoint_io", ("self", "checkpoint"), "reads sft's scaler JSON"),
    "_load_rng_state": ("sft.trainer.checkpoint_io", ("self", "checkpoint"), "reads sft's RNG state files"),
    "_maybe_log_save_evaluate": ("sft.trainer.firststep", ("self", "tr_loss", "grad_norm"),
                                 "checks the first optimizer step (loss, gradient norm) on every rank before it is "
                                 "logged or saved"),
}


def trainer_override(method: str) -> str:
    return f"transformers.Trainer.{method}"


def _override_check(method: str, params: tuple[str, ...]):
    name = trainer_override(method)

    def check() -> None:
        from transformers import Trainer

        need_params(need_attr(Trainer, method, name), params, name)
        if method == "_save_checkpoint":
            src = inspect.getsource(Trainer._maybe_log_save_evaluate)
            need("self._save_checkpoint(" in src, name, "Trainer._maybe_log_save_evaluate no longer calls "
                 "_save_checkpoint (sft's checkpoints would not be written)")
        if method in ("_load_optimizer_and_scheduler", "_load_rng_state", "_load_scaler"):
            need(f"self.{method}(" in inspect.getsource(Trainer), name, f"Trainer no longer calls {method}")
    return check


for _method, (_where, _params, _why) in TRAINER_OVERRIDES.items():
    register(
        trainer_override(_method), "transformers", f"transformers.Trainer.{_method} (private method)",
        "trainer-override",
        what=f"overridden in sft's Trainer subclass (ShardAwareTrainer, mixin in {_where})",
        why=_why,
        alternative=("a TrainerCallback's on_save runs after _save_checkpoint has written and published the "
                     "checkpoint, too late for files that must be in it before it is marked COMPLETE; kept"
                     if _method.startswith("_save") else
                     "TrainerCallback.on_step_end has no gradient norm and runs after the step's log; kept"
                     if _method == "_maybe_log_save_evaluate" else
                     "none (the Trainer loads its state through these methods); kept"),
        where=_where, check=_override_check(_method, _params))
