"""The Trainer sft trains with: transformers' ``Trainer`` with crash-safe checkpoints (CheckpointIO), an
evaluation that cannot hang across ranks (ShardedEvaluation), a checked first optimizer step (FirstStepCheck), and
datasets that are already this rank's shard."""

from __future__ import annotations

import torch
from transformers import Trainer

from sft.data.formatting import IGNORE_INDEX as IGNORE
from sft.trainer.checkpoint_io import CheckpointIO
from sft.trainer.evaluation import ShardedEvaluation
from sft.trainer.firststep import FirstStepCheck


class ShardAwareTrainer(FirstStepCheck, CheckpointIO, ShardedEvaluation, Trainer):
    """Our datasets are already this rank's shard: do not let accelerate re-shard or dispatch them. The first
    optimizer step is checked (FirstStepCheck: a non-finite or zero loss, a non-finite gradient norm)."""

    def __init__(self, *args, checkpoint_extras=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.checkpoint_extras = checkpoint_extras

    def get_train_dataloader(self):
        if self.args.world_size <= 1:
            return super().get_train_dataloader()
        from torch.utils.data import DataLoader

        return DataLoader(self.train_dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator)


class Collator:
    """Stack constant-length blocks; drop position ids when the config says so.

    With position ids the packed documents are isolated (attention stays inside each), and then the label of each
    document's first token is masked: after the model's label shift it would be predicted from the previous
    document's EOS, a target across documents (as transformers' DataCollatorWithFlattening masks it). Without
    them (the seed's packing, documents see each other) the stream is trained as it is."""

    def __init__(self, position_ids: bool):
        self.position_ids = position_ids

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        keys = [k for k in features[0] if self.position_ids or k != "position_ids"]
        batch = {k: torch.stack([f[k] for f in features]) for k in keys}
        if self.position_ids and "labels" in batch:
            batch["labels"] = batch["labels"].masked_fill(batch["position_ids"] == 0, IGNORE)
        return batch

