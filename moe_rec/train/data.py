"""The train split, sharded over data-parallel ranks, and the collator that pads it into batches.

Every rank reads the whole (small) sample table through HF ``datasets`` and takes its own slice of
a permutation that depends only on ``seed + epoch``, so no two ranks see the same sample in an
epoch and a restart reproduces the order exactly. An optimizer step consumes
``world_size * micro_batch_size * grad_accum`` samples; the remainder of an epoch is dropped, so
every rank runs the same number of steps (collectives under ZeRO-3 would deadlock otherwise).

:class:`DataPosition` ``(epoch, step)`` is all the state there is: saved in a checkpoint, it
restarts the stream at the next unseen step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.parquet as pq
import torch
from datasets.table import InMemoryTable

from moe_rec.data.schema import DataError
from moe_rec.data.sequences import IGNORE_INDEX, user_bucket
from moe_rec.data.vocab import PAD


def load_split(sequences_dir: Path, split: str) -> datasets.Dataset:
    """All ``<sequences_dir>/<split>/part-*.parquet`` rows, in file order."""
    files = sorted((Path(sequences_dir) / split).glob("part-*.parquet"))
    if not files:
        raise DataError(
            f"no {split} samples under {Path(sequences_dir) / split}; build them first with "
            f"`moe-rec run --config ...` (or `moe-rec sequences build`)"
        )
    tables = [pq.read_table(f) for f in files]
    return datasets.concatenate_datasets([datasets.Dataset(InMemoryTable(t)) for t in tables])


@dataclass(frozen=True)
class DataPosition:
    """The next optimizer step to run: ``step`` counts steps already done within ``epoch``."""

    epoch: int = 0
    step: int = 0


class Collator:
    """Right-pads samples into a batch: ``input_ids`` with ``[PAD]``, ``domain_ids`` with the
    sample's last domain, ``labels`` with -100, plus ``attention_mask`` and hashed ``user_ids``."""

    def __init__(self, num_user_buckets: int) -> None:
        self.num_user_buckets = num_user_buckets

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        t = max(len(r["input_ids"]) for r in rows)
        b = len(rows)
        input_ids = torch.full((b, t), PAD, dtype=torch.long)
        domain_ids = torch.zeros((b, t), dtype=torch.long)
        labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((b, t), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            input_ids[i, :n] = torch.tensor(r["input_ids"])
            domain_ids[i, :n] = torch.tensor(r["domain_ids"])
            domain_ids[i, n:] = r["domain_ids"][-1]
            if "labels" in r:
                labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        user_ids = torch.tensor([user_bucket(r["user"], self.num_user_buckets) for r in rows])
        batch = {
            "input_ids": input_ids,
            "domain_ids": domain_ids,
            "attention_mask": mask,
            "user_ids": user_ids,
        }
        if "labels" in rows[0]:
            batch["labels"] = labels
        return batch


class ShardedTrainData:
    """This rank's micro batches, step by step, epoch after epoch.

    Args:
        dataset: the whole train split (every rank passes the same one).
        micro_batch_size: samples per rank per forward.
        grad_accum: micro batches per optimizer step.
        rank, world_size: data-parallel coordinates.
        seed: the shuffle of epoch ``e`` is a permutation seeded by ``seed + e``.
        collator: rows -> tensors.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        *,
        micro_batch_size: int,
        grad_accum: int,
        rank: int,
        world_size: int,
        seed: int,
        collator: Collator,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.collator = collator
        self.samples_per_step = world_size * micro_batch_size * grad_accum
        self.steps_per_epoch = len(dataset) // self.samples_per_step
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the train split has {len(dataset)} samples, too few for one optimizer step of "
                f"world_size {world_size} x micro_batch_size {micro_batch_size} x grad_accum {grad_accum} "
                f"= {self.samples_per_step} samples; use fewer ranks or smaller batches"
            )

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(self.seed + epoch).permutation(len(self.dataset))

    def micro_batches(self, epoch: int, step: int) -> list[dict[str, torch.Tensor]]:
        """The ``grad_accum`` micro batches of this rank for optimizer step ``step`` of ``epoch``."""
        order = self._order(epoch)[step * self.samples_per_step : (step + 1) * self.samples_per_step]
        # (grad_accum, world_size, micro_batch_size): micro batch m of rank r
        order = order.reshape(self.grad_accum, self.world_size, self.micro_batch_size)
        return [
            self.collator(self.dataset.select(order[m, self.rank].tolist())) for m in range(self.grad_accum)
        ]

    def __call__(self, start: DataPosition) -> Iterator[tuple[DataPosition, list[dict[str, torch.Tensor]]]]:
        """Endless ``(position after this step, micro batches)`` from ``start`` on."""
        epoch, step = start.epoch, start.step
        while True:
            if step >= self.steps_per_epoch:
                epoch, step = epoch + 1, 0
            batches = self.micro_batches(epoch, step)
            step += 1
            yield DataPosition(epoch, step), batches
