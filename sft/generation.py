"""Generate from a base model, an adapter directory or a merged model."""

from __future__ import annotations

from pathlib import Path

import torch

from sft.errors import ModelError
from sft.hooks import RunHooks


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 32,
                   progress: bool = False, desc: str = "generating", add_special_tokens: bool = True) -> list[str]:
    """Greedy continuations of ``prompts`` (batched, left-padded), cut at EOS; prompt tokens excluded.

    ``add_special_tokens=False`` for chat-template prompts: the template already wrote BOS where it wants one
    (tokenizing them like training does, see sft.data.formatting)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # so every row's continuation starts at the same column
    device = next(model.parameters()).device
    outputs: list[str] = []
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, unit="batch"):
            chunk = prompts[i : i + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(device)
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, use_cache=True, num_beams=1,
                # unset sampling knobs a checkpoint's generation_config may carry (they only cause warnings)
                temperature=None, top_p=None, top_k=None,
            )
            new = out[:, enc["input_ids"].shape[1]:]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def load_for_generation(path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, description) for an adapter dir, a merged/local model dir, or any model.name."""
    from transformers import AutoTokenizer

    from sft.models.pretrained import load_pretrained

    p = Path(path)
    if is_adapter_dir(p):
        from sft.merging import load_adapter_model

        model, tokenizer = load_adapter_model(p, dtype=dtype)
        return model, tokenizer, f"adapter {p}"
    if p.is_dir() and (p / "config.json").is_file():
        try:
            model = load_pretrained(p, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(p)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load {p}: {e}") from e
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer, f"model {p}"
    from sft.config import ModelConfig, QuantizationConfig
    from sft.models import load_base_model, load_tokenizer, resolve_source

    cfg = ModelConfig(name=path, dtype="fp32")
    source = resolve_source(cfg)
    model = load_base_model(cfg, QuantizationConfig(), source=source)
    return model.to(dtype), load_tokenizer(cfg, source), source.describe()


def generate(model: str, prompts: list[str], max_new_tokens: int = 32, template: str = "default",
             raw: bool = False) -> list[str]:
    """Greedy answers of ``model`` (an adapter dir, a merged or local model dir, or any ``model.name``) to
    ``prompts``, each formatted as in training (``template``) unless ``raw``."""
    from sft.data.formatting import prompt_text

    m, tokenizer, _ = load_for_generation(model)
    texts = prompts if raw else [prompt_text(tokenizer, p, template) for p in prompts]
    out = generate_texts(m, tokenizer, texts, max_new_tokens=max_new_tokens,
                         add_special_tokens=raw or template == "default")
    return [t.strip() for t in out]


def answer_as_trained(model, tokenizer, question: str, template: str, max_new_tokens: int) -> str:
    """One greedy answer to ``question``, prompted exactly as training formatted it (``data.template``)."""
    from sft.data.formatting import prompt_text

    text = generate_texts(model, tokenizer, [prompt_text(tokenizer, question, template)],
                          max_new_tokens=max_new_tokens, add_special_tokens=template == "default")[0]
    return text.strip()


def load_merged(merged_dir: str | Path):
    """(model, tokenizer) of a merged model directory, reloaded from disk in fp32 the way a user would."""
    from transformers import AutoTokenizer

    from sft.models.pretrained import load_pretrained

    model = load_pretrained(merged_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


class FirstAnswer(RunHooks):
    """A run hook for any run with an eval set: the trained model's answer to the first question of
    ``data.eval_path``, into the summary's ``sample_question`` / ``sample_answer`` (its fields, RunSummary.add).
    From the merged model reloaded from disk when the run merges, else from the adapter model after training (not
    when it is sharded across ranks: ZeRO-3 / FSDP without a merge)."""

    def __init__(self, cfg, max_new_tokens: int = 64):
        self.cfg = cfg
        self.max_new_tokens = max_new_tokens
        self.question: str | None = None

    def before_training(self, model, tokenizer, summary) -> None:
        from sft.data.inputs import first_rows

        rows = first_rows(self.cfg, self.cfg.data.eval_path, 1) if self.cfg.data.eval_path else []
        self.question = rows[0]["question"] if rows else None
        summary.add("sample_question")  # summary.json shows both, null when no answer was generated
        summary.add("sample_answer")

    def after_training(self, model, tokenizer, summary) -> None:
        from sft import distributed as dist

        if self.question is None or self.cfg.training.merge or dist.sharded_launch() is not None:
            return
        self._answer(model, tokenizer, summary)

    def after_merge(self, merged_dir: Path, summary) -> None:
        if self.question is not None:
            self._answer(*load_merged(merged_dir), summary)

    def _answer(self, model, tokenizer, summary) -> None:
        summary.add("sample_question", self.question)
        summary.add("sample_answer", answer_as_trained(model, tokenizer, self.question, self.cfg.data.template,
                                                       self.max_new_tokens))
