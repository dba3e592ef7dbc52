"""Canaries for sft's library patches (sft/patches/): each fails naming its patch when the library changes under it.

* every registered patch's check: the patched object still exists with the shape the patch was written against;
* the forward replacements and the fused ops (norm, SwiGLU, LoRA, loss, the attention backward, the LoRA dropout)
  still run in a real training step of a model loaded through ``from_pretrained`` (a patch that is installed and
  then silently undone, as transformers 5.24's ``model.train()`` undid the fused norm, commit 1327c0e, fails here);
* summary.json of a tiny real run lists the patches that ran;
* nothing outside sft/patches/ assigns to another library's objects.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
import torch

import sft.patches as patches
from sft.patches import PatchBroken, registry
from sft.patches import transformers as tf_patches

SFT = Path(__file__).resolve().parents[1] / "sft"
OPTIONAL = {"deepspeed": "deepspeed", "bitsandbytes": "bitsandbytes"}


def _named(name: str, e: BaseException) -> str:
    return f"sft patch {name} broke: {type(e).__name__}: {e}"


def test_every_patch_states_what_why_versions_and_alternative():
    reg = registry()
    assert len(reg) >= 20
    for name, p in reg.items():
        assert name.split(".")[0] == p.library, name
        for field in ("target", "kind", "what", "why", "alternative", "where"):
            assert getattr(p, field).strip(), f"{name}: empty {field}"
        assert p.verified and p.verified[0].startswith(p.library + " "), (name, p.verified)
        assert p.check is not None, f"{name}: no canary check"
        importlib.import_module(p.where)  # the module that holds it exists


@pytest.mark.parametrize("name", sorted(registry()))
def test_canary(name):
    """The patched library object is still there, with the shape the patch expects."""
    p = registry()[name]
    if p.library in OPTIONAL:
        pytest.importorskip(OPTIONAL[p.library])
    try:
        p.check()
    except PatchBroken:
        raise
    except Exception as e:  # an import or attribute error inside the check: still name the patch
        raise PatchBroken(_named(name, e)) from e


def test_a_broken_library_object_fails_naming_its_patch(monkeypatch):
    """What a canary says when the library moves: the patch's name and the versions it was verified on."""
    import transformers.training_args as ta

    monkeypatch.delattr(ta, "is_torch_bf16_gpu_available")
    with pytest.raises(PatchBroken, match=re.escape(tf_patches.BF16_CHECK) + r".*verified on transformers"):
        registry()[tf_patches.BF16_CHECK].check()
    from transformers import Trainer

    monkeypatch.setattr(Trainer, "_save_checkpoint", lambda self, model: None)
    with pytest.raises(PatchBroken, match=re.escape("transformers.Trainer._save_checkpoint")):
        registry()["transformers.Trainer._save_checkpoint"].check()


def test_sfts_trainer_overrides_are_exactly_the_registered_ones():
    """Every private transformers.Trainer method sft's Trainer overrides is registered (and recorded when called)."""
    from transformers import Trainer

    from sft.trainer.trainer import ShardAwareTrainer

    overridden = {n for cls in ShardAwareTrainer.__mro__ if cls.__module__.startswith("sft.")
                  for n in vars(cls) if n.startswith("_") and not n.startswith("__") and hasattr(Trainer, n)}
    assert overridden == set(tf_patches.TRAINER_OVERRIDES)
    for n in overridden:
        assert getattr(getattr(ShardAwareTrainer, n), "sft_patch", None) == tf_patches.trainer_override(n), n
        assert tf_patches.trainer_override(n) in registry()


# Assignments to another library's objects, by the shapes sft used before sft/patches/ existed.
FORBIDDEN = [
    (r"\.forward\s*=(?!=)", "an instance or class forward"),
    (r"__init__\s*=(?!=)", "a wrapped __init__"),
    (r"\bsetattr\(", "setattr on a library object"),
    (r"_attn_implementation\s*=(?!=)", "config._attn_implementation (use set_attn_implementation)"),
    (r"is_torch_bf16_gpu_available\s*=(?!=)", "transformers.training_args.is_torch_bf16_gpu_available"),
    (r"\.(hf_quantizer|is_quantized)\s*=(?!=)", "a model's quantizer state"),
    (r"support_avx512bf16_for_cpu\s*=(?!=)", "bitsandbytes' CPU layout switch"),
    (r"_communication_backend_name\s*=(?!=)", "DeepSpeed's accelerator backend name"),
    (r"\.gradient_checkpointing\s*=(?!=)", "a layer's gradient_checkpointing flag"),
    (r"_shared_state\[", "accelerate's shared state"),
    (r"lora_dropout\[[^\]]+\]\s*=(?!=)", "PEFT's LoRA dropout modules"),
]
# sft's own objects that match a shape above: its config (RunConfig sections), wherever the line lives
ALLOWED = ("cfg.model.", "run.model.", "config.model.")


def test_nothing_outside_sft_patches_assigns_to_library_objects():
    bad = []
    for path in sorted(SFT.rglob("*.py")):
        rel = path.relative_to(SFT.parent).as_posix()
        if rel.startswith("sft/patches/"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for pattern, what in FORBIDDEN:
                m = re.search(pattern, code)
                if m and not any(tok in code for tok in ALLOWED):
                    bad.append(f"{rel}:{i}: {what}: {line.strip()}")
    assert not bad, "move these into sft/patches/ (and register them):\n" + "\n".join(bad)


# -- the patched paths run in a real training step ------------------------------------------------------------------

# the patches of a LoRA run on a Llama-family model in bf16-mixed on CPU, with their run counters
FUSED = [tf_patches.FUSED_NORM, tf_patches.FUSED_MLP, tf_patches.FUSED_ROPE, tf_patches.CHUNKED_LOSS,
         tf_patches.MATH_BACKWARD, "peft.lora_linear_forward", "peft.lora_dropout_modules"]


def _counts() -> dict[str, int]:
    return {n: registry()[n].runs() for n in FUSED}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny real run (sft.train): a random tiny Llama saved and loaded through from_pretrained (where transformers'
    Hub kernels once undid the fused norm), bf16-mixed, LoRA with dropout, two steps and a checkpoint. The attention
    stays bf16 (SFT_ATTENTION_FP32=0), the case the attention's math backward serves; a CPU without AMX would
    otherwise compute it in fp32."""
    from sft.config import load_config
    from sft.data.ingest import write_dataset
    from sft.models import materialize_arch
    from sft.recipe import train

    tmp = tmp_path_factory.mktemp("patches")
    base = materialize_arch("tiny-llama", 0, dtype=torch.float32)
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{2 * i}.", "source": "test"} for i in range(32)]
    write_dataset(str(tmp / "ds"), rows, progress=False)
    cfg = load_config(None, [
        f"model.name={base}", "model.tokenizer=bytes", "model.dtype=bf16-mixed", "model.gradient_checkpointing=false",
        "demo.generate=false", f"data.path={tmp / 'ds'}", "data.eval_path=null", "data.seq_length=64",
        "training.max_steps=2", "training.per_device_train_batch_size=2", "training.logging_steps=1",
        "demo.accuracy_samples=0", "training.eval_strategy=no", "training.save_strategy=steps",
        "training.save_steps=2", "training.merge=false", "training.progress=false", "lora.dropout=0.1",
        f"training.output_dir={tmp / 'out'}",
    ])
    from sft.ops.attention import UPCAST_ENV

    patches.reset()
    before = _counts()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(UPCAST_ENV, "0")
        summary = train(cfg)
    after = _counts()
    return summary, before, after, json.loads((tmp / "out" / "summary.json").read_text())


@pytest.mark.parametrize("name", FUSED)
def test_the_patched_path_runs_in_a_training_step(tiny_run, name):
    """Installed is not enough: the patched forward must still be what runs after the Trainer's model.train()."""
    _, before, after, _ = tiny_run
    assert name in patches.ran(), f"sft patch {name} was not applied in a LoRA run of a Llama model"
    assert after[name] > before[name], (f"sft patch {name} was applied but its path never ran in the training "
                                        f"steps: the library replaced or bypassed the patched forward")


def test_summary_json_lists_the_patches_that_ran(tiny_run):
    summary, _, _, data = tiny_run
    assert summary.steps == 2
    listed = data["patches"]
    assert listed == sorted(listed) and set(listed) <= set(registry())
    assert set(listed) == {
        *FUSED, tf_patches.ATTENTION_INTERFACE, tf_patches.BASE_DROPOUT,
        *(tf_patches.trainer_override(m) for m in ("_maybe_log_save_evaluate", "_save_checkpoint", "_save",
                                                    "_save_optimizer_and_scheduler", "_save_scaler",
                                                    "_save_rng_state")),
    }, listed


def test_dequantized_and_4bit_patches_record_that_they_ran():
    """The patches a LoRA run does not reach, applied on small objects: each records itself."""
    from sft.models import build_random

    patches.reset()
    model = build_random("tiny-llama", 0)
    tf_patches.forget_quantization(model)
    assert model.hf_quantizer is None and model.is_quantized is False
    tf_patches.set_attention(model, tf_patches.register_attention())
    assert model.config._attn_implementation == "sft_varlen"
    assert {m.config._attn_implementation for m in model.modules() if type(m).__name__ == "LlamaAttention"} \
        == {"sft_varlen"}
    assert tf_patches.FORGET_QUANTIZATION in patches.ran()
    with tf_patches.bf16_allowed_on_cpu():
        import transformers.training_args as ta

        assert ta.is_torch_bf16_gpu_available()
    assert tf_patches.BF16_CHECK in patches.ran()


def test_the_run_canary_catches_a_forward_undone_by_train(monkeypatch):
    """The class of break of commit 1327c0e: the patch is installed, then ``model.train()`` (transformers 5.24's
    kernelize) puts the class's forward back. The run counters the canaries read stay still, so
    test_the_patched_path_runs_in_a_training_step fails naming the patch, where a check of the installed forward
    at load time passes."""
    from sft.config import LoraSection, ModelConfig, QuantizationConfig
    from sft.models import load_model_and_tokenizer

    model, _, _ = load_model_and_tokenizer(ModelConfig(name="arch:tiny-llama", dtype="fp32"), LoraSection(r=4),
                                           QuantizationConfig(), tokens_per_micro_batch=64)
    ids = torch.randint(0, 100, (1, 16))

    def step() -> dict[str, int]:
        before = _counts()
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: c - before[n] for n, c in _counts().items()}

    assert step()[tf_patches.FUSED_NORM] > 0
    original = torch.nn.Module.train

    def kernelize_like_train(self, mode=True):
        for m in self.modules():
            m.__dict__.pop("forward", None)  # what kernelize did to every kernel-mapped layer
        return original(self, mode)

    monkeypatch.setattr(torch.nn.Module, "train", kernelize_like_train)
    ran = step()
    assert ran[tf_patches.FUSED_NORM] == ran[tf_patches.FUSED_MLP] == ran["peft.lora_linear_forward"] == 0, ran
