"""training.torch_compile (issue #7): the compiled model does not recompile for a new packing layout or new label
counts."""

import pytest
import torch

from sft.data.packing import pack_examples
from sft.models import build_random, resolve_attention, set_base_dropout
from sft.patches.transformers import install_chunked_loss


def _compiled_without_recompiles(model, first: dict, later: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(eager loss, compiled loss) of ``first`` (the same dropout draws for both), after which every batch of
    ``later`` must run forward and backward through ``torch.compile(model)`` without a recompilation: dynamo's own
    check (error_on_recompile) raises on any. The eager backend keeps it fast (recompiles happen in dynamo)."""
    import torch._dynamo as dynamo

    compiled = torch.compile(model, backend="eager")
    dynamo.reset()
    try:
        torch.manual_seed(11)
        eager = model(**first).loss
        torch.manual_seed(11)
        out = compiled(**first)
        out.loss.backward()
        with dynamo.config.patch(error_on_recompile=True):
            for b in later:
                nxt = compiled(**b)
                nxt.loss.backward()
                assert torch.isfinite(nxt.loss)
    finally:
        dynamo.reset()
    return eager, out.loss


@pytest.mark.slow
def test_compiled_model_does_not_recompile_for_a_new_packing_layout():
    """training.torch_compile with sft_varlen: a second batch whose documents have other lengths must reuse the
    compiled graphs. Before, the per-document split sizes became guards and every new layout recompiled (a 3-step
    OPT-125m bench cell spent 195-464 s per step recompiling). Dynamo's own recompile check (error_on_recompile)
    fails the test on any recompilation."""
    model = build_random("tiny-llama", 0)
    set_base_dropout(model, 0.0)
    model.set_attn_implementation(resolve_attention("sft_varlen"))
    model.train()
    install_chunked_loss(model)
    g = torch.Generator().manual_seed(5)

    def batch(lengths):
        docs = [torch.randint(3, 250, (n,), generator=g).tolist() for n in lengths]
        (block,) = list(pack_examples([(d, d) for d in docs], seq_length=48, eos_token_id=2))
        return {k: torch.tensor(block[k])[None] for k in ("input_ids", "labels", "position_ids")}

    # each layout fills the 48-token block exactly (documents + their EOS)
    eager, compiled = _compiled_without_recompiles(model, batch((11, 17, 17)),
                                                   [batch(n) for n in ((5, 30, 10), (20, 26), (47,))])
    assert torch.allclose(compiled, eager, atol=1e-5)


@pytest.mark.slow
def test_compiled_model_with_lora_dropout_does_not_recompile_for_new_label_counts():
    """training.torch_compile on sft's default path (fused LoRA linear with the CPU dropout mask, chunked loss):
    batches whose prompts mask a different number of labels must reuse the compiled graphs. Before, the chunked
    loss's labelled-row count became a guard (one recompile per step: a 4-step OPT-125m bench cell was still
    compiling its second step after 10 minutes) and the mask's 64-bit draws broke the graph inside the LoRA
    function. Dynamo's error_on_recompile fails the test on any recompilation; the compiled loss must equal the
    eager one with the same dropout masks."""
    from peft import LoraConfig, get_peft_model

    from sft.patches.peft import install_fast_dropout, install_fused_lora

    model = build_random("tiny-llama", 0)
    set_base_dropout(model, 0.0)
    model.set_attn_implementation(resolve_attention("sft_varlen"))
    install_chunked_loss(model)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]))
    install_fast_dropout(model)
    assert install_fused_lora(model) > 0
    model.train()
    g = torch.Generator().manual_seed(7)

    def batch(prompts):
        docs = []
        for n in prompts:  # 16-token documents: the first n tokens are prompt (no label)
            ids = torch.randint(3, 250, (15,), generator=g).tolist()
            docs.append((ids, [-100] * n + ids[n:]))
        (block,) = list(pack_examples(docs, seq_length=48, eos_token_id=2))
        return {k: torch.tensor(block[k])[None] for k in ("input_ids", "labels", "position_ids")}

    eager, compiled = _compiled_without_recompiles(model, batch((3, 5, 9)),
                                                   [batch(n) for n in ((1, 2, 3), (10, 0, 4), (14, 14, 6))])
    assert torch.allclose(compiled, eager, atol=1e-5)
