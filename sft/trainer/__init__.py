"""The training loop's room: the Trainer subclass (crash-safe checkpoints, sharded evaluation), the checkpoint
format and resume rules, TrainingArguments, sft's callbacks and the experiment trackers.

Importing a submodule that needs transformers imports it; this package itself imports nothing heavy."""
