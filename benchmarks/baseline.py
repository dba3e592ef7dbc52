"""The seed recipe, kept as the benchmark baseline: what every speed-up is measured against.

The seed project fine-tuned OPT-1.3B on LIMA with TRL's ``SFTTrainer(packing=True)`` + PEFT. Reproduced here with
the pieces today's libraries still have, deliberately independent of ``sft.recipe`` / ``sft.data`` so that work on
the framework's training path never moves the baseline:

* model: loaded in bf16, then every 1-D parameter (norms, biases) cast to fp32 ("cast 1-D params to fp32"), trained
  under bf16 autocast (``TrainingArguments(bf16=True)``) -- sft's ``dtype: bf16-mixed``. Dropout as in the
  architecture's config (OPT: 0.1). With ``quantization: nf4``: bitsandbytes NF4 + double quant, bf16 compute,
  ``prepare_model_for_kbit_training``.
* LoRA: ``peft.get_peft_model`` with r, alpha 32, dropout 0.05, bias none, the cell's target modules.
* data: the whole dataset read into memory, formatted ``"Question: {q}\\n\\nAnswer: {a}"``, packed by a copy of
  TRL's ``ConstantLengthDataset`` (removed from TRL in 0.20): a ~3.7 M-character buffer of samples is tokenized,
  joined with EOS, cut into ``seq_length`` blocks, shuffled; no per-document position ids, so packed documents
  attend to each other. Batches through ``DataCollatorForLanguageModeling(mlm=False)``, as SFTTrainer did.
* loop: ``transformers.Trainer`` with non-reentrant activation checkpointing, AdamW, lr 1e-4 cosine, warm-up 10,
  weight decay 0.05 (configs/train/opt-1.3b-lima.yaml).

The cell's axes still apply (dtype fp32/bf16, checkpointing off, micro-batch, sequence length, ranks), so a matrix
can ask for "the seed recipe without checkpointing"; the seed itself is bf16-mixed with checkpointing.
"""

from __future__ import annotations

import random
from typing import Any

import torch

SEED_TEMPLATE = "Question: {question}\n\nAnswer: {answer}"
SEED_LORA = dict(lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
SEED_TRAINING = dict(learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=10, weight_decay=0.05,
                     logging_steps=10)


class ConstantLengthDataset(torch.utils.data.IterableDataset):
    """TRL's ConstantLengthDataset (as of TRL 0.7, what the seed used), trimmed to what the seed passed."""

    def __init__(self, tokenizer, texts: list[str], seq_length: int = 1024, infinite: bool = True,
                 num_of_sequences: int = 1024, chars_per_token: float = 3.6, shuffle: bool = True, seed: int = 42):
        self.tokenizer = tokenizer
        self.texts = texts
        self.seq_length = seq_length
        self.infinite = infinite
        self.max_buffer_size = seq_length * chars_per_token * num_of_sequences
        self.concat_token_id = tokenizer.eos_token_id
        self.shuffle = shuffle
        self.rng = random.Random(seed)

    def __iter__(self):
        iterator = iter(self.texts)
        more_examples = True
        while more_examples:
            buffer, buffer_len = [], 0
            while buffer_len < self.max_buffer_size:
                try:
                    buffer.append(next(iterator))
                    buffer_len += len(buffer[-1])
                except StopIteration:
                    if self.infinite:
                        iterator = iter(self.texts)
                    else:
                        more_examples = False
                        break
            tokenized = self.tokenizer(buffer, add_special_tokens=True, truncation=False)["input_ids"]
            all_token_ids: list[int] = []
            for ids in tokenized:
                all_token_ids.extend(ids + [self.concat_token_id])
            examples = [all_token_ids[i:i + self.seq_length] for i in range(0, len(all_token_ids), self.seq_length)]
            examples = [e for e in examples if len(e) == self.seq_length]
            if self.shuffle:
                self.rng.shuffle(examples)
            for example in examples:
                yield {"input_ids": torch.LongTensor(example), "labels": torch.LongTensor(example)}


def read_texts(path: str) -> list[str]:
    """The whole dataset as formatted texts (the seed loaded its dataset fully into memory)."""
    from sft.data.source import open_dataset

    ds = open_dataset(path)  # Deep Lake, or the Arrow format where deeplake is not installed
    questions, answers = ds["question"][:], ds["answer"][:]
    return [SEED_TEMPLATE.format(question=q, answer=a) for q, a in zip(questions, answers)]


def _cast_1d_to_fp32(model) -> None:
    for p in model.parameters():
        if p.ndim == 1:
            p.data = p.data.to(torch.float32)


def load_seed_model(model_name: str, quantization: str, dtype: str, seed: int = 42):
    """The base model as the seed loaded it (bf16, then 1-D params fp32), or NF4 for QLoRA."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from sft.config import ModelConfig
    from sft.models import build_random, dense_copy_of_gguf, materialize_arch, resolve_source

    src = resolve_source(ModelConfig(name=model_name))
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    if src.kind == "arch":
        path = str(materialize_arch(src.path, seed)) if quantization == "nf4" else None
    elif src.kind == "gguf":
        path = str(dense_copy_of_gguf(src.path, src.gguf_file))
    else:
        path = src.path
    if quantization == "nf4":
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch.bfloat16)
    if path is None:
        model = build_random(src.path, seed, dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    if dtype == "bf16-mixed":
        _cast_1d_to_fp32(model)
    return model


def build_trainer(spec: Any, dataset: str, output_dir: str, max_steps: int, callbacks=(), seed: int = 42):
    """A ready-to-train seed-recipe Trainer for a bench cell (``spec``: benchmarks.matrix.CellSpec)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from sft.config import ModelConfig
    from sft.models import load_tokenizer

    checkpointing = spec.gradient_checkpointing is not False  # the seed recipe has no "auto": it checkpoints
    # The tokenizer is sft's choice for the model (for random-init architectures there is no "original" one);
    # token ids do not change the speed.
    tokenizer = load_tokenizer(ModelConfig(name=spec.model_name))
    torch.manual_seed(seed)
    model = load_seed_model(spec.model_name, spec.quantization, spec.dtype, seed)
    if spec.quantization == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    targets: Any = "all-linear" if list(spec.lora_targets) == ["all-linear"] else list(spec.lora_targets)
    model = get_peft_model(model, LoraConfig(r=spec.lora_r, target_modules=targets, **SEED_LORA))

    train_dataset = ConstantLengthDataset(tokenizer, read_texts(dataset), seq_length=spec.seq_length, infinite=True,
                                          seed=seed)
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=spec.micro_batch,
        gradient_accumulation_steps=spec.grad_accum,
        max_steps=max_steps,
        bf16=spec.dtype == "bf16-mixed" or spec.quantization == "nf4",
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        **SEED_TRAINING,
    )
    return Trainer(model=model, args=args, train_dataset=train_dataset, callbacks=list(callbacks),
                   data_collator=DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False))
