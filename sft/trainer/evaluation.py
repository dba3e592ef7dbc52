"""Evaluation loss over every rank's eval shard, without the DDP-with-evaluation hang."""

from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader

from sft import distributed as dist
from sft.data.formatting import IGNORE_INDEX as IGNORE
from sft.ops.attention import packed_blocks


def masked_block(batch: int, seq_length: int) -> dict[str, torch.Tensor]:
    """A batch that contributes nothing to a loss: for ranks that must join a collective forward without data."""
    return {"input_ids": torch.zeros(batch, seq_length, dtype=torch.long),
            "labels": torch.full((batch, seq_length), IGNORE, dtype=torch.long),
            "position_ids": torch.arange(seq_length).repeat(batch, 1)}


class ShardedEvaluation:
    """Mixin for a ``transformers.Trainer``: its ``evaluate``."""

    def _forward_is_collective(self) -> bool:
        """ZeRO-3 and FSDP gather parameters inside the forward: every rank must run every forward pass."""
        if self.is_fsdp_enabled:
            return True
        if self.is_deepspeed_enabled:
            from transformers.integrations import is_deepspeed_zero3_enabled

            return is_deepspeed_zero3_enabled()
        return False

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """The evaluation loss over every rank's eval shard, weighted by labelled tokens.

        transformers' loop gathers after every batch, so ranks whose shards pack into different numbers of
        blocks wait for each other forever (the DDP-with-evaluation hang), and it averages per-batch means.
        Here the ranks agree before each batch whether any of them still has one (one tiny all-reduce), a
        rank that ran out forwards an all-masked block where the forward itself is collective (ZeRO-3, FSDP)
        and skips it otherwise, and the loss is sum(token losses) / labelled tokens over all ranks."""

        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        dist.set_phase("eval", self.state.global_step)
        start = time.time()
        model = self.model_wrapped if (self.is_deepspeed_enabled or self.is_fsdp_enabled) else self.model
        was_training = model.training
        model.eval()
        collective = self._forward_is_collective()
        world = self.args.world_size
        batches = iter(DataLoader(ds, batch_size=self.args.eval_batch_size, collate_fn=self.data_collator)) \
            if ds is not None else iter(())
        dummy = None
        total = torch.zeros(2, dtype=torch.float64)  # (sum of token losses, labelled tokens)
        with torch.no_grad():
            while True:
                batch = next(batches, None)
                if world > 1:
                    if not dist.all_reduce_max_flag(batch is not None):
                        break
                elif batch is None:
                    break
                if batch is None:
                    if not collective:
                        continue
                    batch = dummy if dummy is not None else masked_block(self.args.eval_batch_size, ds.seq_length)
                elif dummy is None:
                    dummy = {k: (torch.full_like(v, IGNORE) if k == "labels" else v.clone()) for k, v in batch.items()}
                inputs = self._prepare_inputs(batch)
                with self.compute_loss_context_manager(), packed_blocks():
                    loss = model(**inputs).loss
                n = int((batch["labels"][:, 1:] != IGNORE).sum())
                if n:
                    total += torch.tensor([float(loss) * n, n], dtype=torch.float64)
        total = dist.all_reduce_sum(total)
        if was_training:
            model.train()
        metrics = {f"{metric_key_prefix}_loss": float(total[0] / total[1]) if total[1] else float("nan"),
                   f"{metric_key_prefix}_tokens": int(total[1]),
                   f"{metric_key_prefix}_runtime": round(time.time() - start, 4)}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
