"""The train split, sharded over data-parallel ranks, and the collator that pads it into batches.

Every rank reads the whole (small) sample table through HF ``datasets`` and computes the same plan
of an epoch's micro batches, a function of ``seed + epoch`` only, and takes its own share, so no two
ranks see the same sample in an epoch and a restart reproduces the order exactly. A plan is either
fixed-size micro batches of a shuffled epoch (``micro_batch_tokens=0``) or length-grouped ones
(:func:`length_grouped_batches`): samples of similar length together, each micro batch at most
``micro_batch_tokens`` padded tokens, so little of the compute goes to padding. An optimizer step
consumes ``world_size * grad_accum`` micro batches; the remainder of an epoch is dropped, so every
rank runs the same number of steps (collectives under ZeRO-3 would deadlock otherwise).

:class:`DataPosition` ``(epoch, step)`` is all the state there is: saved in a checkpoint, it
restarts the stream at the next unseen step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from datasets.table import InMemoryTable

from moe_rec.data.positions import columnar_item_batch, flat_list_column, item_batch
from moe_rec.data.schema import DataError
from moe_rec.data.sequences import IGNORE_INDEX, user_bucket
from moe_rec.data.text_samples import drop_critique_words
from moe_rec.data.vocab import CRITIQUE, PAD, Vocabulary

if TYPE_CHECKING:
    from moe_rec.train.distill import TeacherTargets


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


class ItemCollator:
    """Right-pads samples into an item-level batch, one position per event
    (:func:`moe_rec.data.positions.item_batch`)."""

    def __init__(self, vocab: Vocabulary, num_user_buckets: int) -> None:
        self.vocab = vocab
        self.num_user_buckets = num_user_buckets

    def __call__(self, rows: Sequence[dict[str, Any]] | datasets.Dataset) -> dict[str, torch.Tensor]:
        if isinstance(rows, datasets.Dataset):  # from its columns, unless a sample holds text
            batch = columnar_item_batch(rows.with_format("arrow")[:], self.vocab, self.num_user_buckets)
            if batch is not None:
                return batch
        return item_batch(rows, self.vocab, self.num_user_buckets)


def length_grouped_batches(
    lengths: np.ndarray, max_tokens: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Micro batches (sample indices) of similar length, each at most ``max_tokens`` once padded
    (``len(batch) * longest``; a longer sample goes alone), in random order.

    The samples are shuffled, then stably sorted by length, so samples of equal length meet at
    random; which lengths share a batch is the same every epoch, and so is the number of batches.
    Every batch holds about ``max_tokens`` tokens, so the per-token mean loss weighs every token
    alike, as fixed-size batches of random samples do on average.
    """
    order = rng.permutation(len(lengths))
    order = order[np.argsort(lengths[order], kind="stable")]
    sorted_lengths = lengths[order]
    bounds, start = [0], 0
    for end in range(1, len(order) + 1):  # sorted ascending: a batch's last sample is its longest
        if end - start > 1 and (end - start) * sorted_lengths[end - 1] > max_tokens:
            start = end - 1
            bounds.append(start)
    bounds.append(len(order))
    batches = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return [batches[i] for i in rng.permutation(len(batches))]


def service_steps(
    batches: Sequence[Sequence[np.ndarray]], per_step: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Micro batches of several services ordered so that each run of ``per_step`` (an optimizer
    step over all ranks) comes from one service: ``batches[s]`` are service ``s``'s micro batches.

    Each service's batches are cut into steps of ``per_step``, the steps of all services shuffled
    together; what is left of each service (fewer than ``per_step``) goes last, so only the epoch's
    last step or few mix services (and the incomplete last one is dropped, as always).
    """
    steps: list[Sequence[np.ndarray]] = []
    rest: list[np.ndarray] = []
    for own in batches:
        whole = len(own) - len(own) % per_step
        steps += [own[i : i + per_step] for i in range(0, whole, per_step)]
        rest += list(own[whole:])
    return [batch for i in rng.permutation(len(steps)) for batch in steps[i]] + rest


@dataclass(frozen=True)
class CritiqueWordDropout:
    """Each word of a training critique left out with probability ``p``
    (:func:`moe_rec.data.text_samples.drop_critique_words`; ``train.critique_word_dropout``)."""

    p: float
    word_starts: np.ndarray  # (tokenizer size,) bool: the subword begins a word
    text_offset: int  # the vocabulary id of tokenizer id 0

    def __call__(self, row: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        return drop_critique_words(row, self.p, self.word_starts, self.text_offset, rng)


class ShardedTrainData:
    """This rank's micro batches, step by step, epoch after epoch.

    Args:
        dataset: the whole train split (every rank passes the same one).
        micro_batch_size: samples per rank per forward, when ``micro_batch_tokens`` is 0.
        micro_batch_tokens: > 0: length-grouped micro batches of at most this many padded tokens.
        grad_accum: micro batches per optimizer step.
        rank, world_size: data-parallel coordinates.
        seed: the plan of epoch ``e`` is drawn from a generator seeded by ``seed + e``.
        collator: rows -> tensors.
        positions_per_sample: (N,) the length each sample pads to in a batch, for length grouping;
            default: its token count (the item-level model passes its event count + 1).
        sample_services: (N,) each sample's service (:meth:`main_services`): given, every optimizer
            step's micro batches (all ranks) hold one service's samples (:func:`service_steps`).
        word_dropout: given, applied to every critique sample of a micro batch with a generator
            seeded by ``(seed, epoch, micro batch)``, so a resumed run drops the same words.
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
        collator: Collator | ItemCollator,
        micro_batch_tokens: int = 0,
        positions_per_sample: np.ndarray | None = None,
        sample_services: np.ndarray | None = None,
        word_dropout: CritiqueWordDropout | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.micro_batch_tokens = micro_batch_tokens
        self.grad_accum = grad_accum
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.collator = collator
        self.batches_per_step = world_size * grad_accum
        self.lengths = self.token_lengths(dataset) if positions_per_sample is None else positions_per_sample
        self.sample_services = sample_services
        self.word_dropout = word_dropout
        self.critique_samples = np.zeros(len(dataset), dtype=bool)  # (N,) holds [CRITIQUE]: words to drop
        if word_dropout is not None:
            flat, rows, _ = flat_list_column(dataset.with_format("arrow")["input_ids"])
            self.critique_samples[rows[flat == CRITIQUE]] = True
        self.targets: TeacherTargets | None = None  # set by the trainer with train.teacher_targets
        self._plans: dict[int, list[np.ndarray]] = {}
        self.steps_per_epoch = len(self.plan(0)) // self.batches_per_step
        if self.steps_per_epoch == 0:
            per_batch = (
                f"length-grouped micro batches of <= {micro_batch_tokens} tokens ({len(self.plan(0))} of them)"
                if micro_batch_tokens
                else f"micro_batch_size {micro_batch_size}"
            )
            raise DataError(
                f"the train split has {len(dataset)} samples, too few for one optimizer step of "
                f"world_size {world_size} x grad_accum {grad_accum} x {per_batch}; "
                f"use fewer ranks or smaller batches"
            )

    @staticmethod
    def token_lengths(dataset: datasets.Dataset) -> np.ndarray:
        """(N,) tokens of every sample, read from the Arrow column without decoding rows."""
        return pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_numpy()

    @staticmethod
    def item_positions(dataset: datasets.Dataset, vocab: Vocabulary) -> np.ndarray:
        """(N,) positions of every sample as the item-level model reads it
        (:func:`moe_rec.data.positions.split_positions`): one per event (its service token and codes),
        one per other token ([BOS], a text token, [CRITIQUE], ...), read from the Arrow column
        without decoding rows. Counting events as tokens / tokens-per-item instead would count a text
        sample's words about ``tokens_per_item`` times too few."""
        flat, rows, lengths = flat_list_column(dataset.with_format("arrow")["input_ids"])
        code = (flat >= vocab.code_offset) & (
            flat < vocab.text_offset
        )  # an event's tokens after its service's
        return lengths - np.bincount(rows[code], minlength=len(lengths))

    @staticmethod
    def main_services(dataset: datasets.Dataset) -> np.ndarray:
        """(N,) the service most of each sample's tokens belong to (its ``domain_ids``; ties go to
        the lower index), read from the Arrow column without decoding rows."""
        flat, rows, lengths = flat_list_column(dataset.with_format("arrow")["domain_ids"])
        n, width = len(lengths), int(flat.max(initial=0)) + 1
        return np.bincount(rows * width + flat, minlength=n * width).reshape(n, width).argmax(axis=1)

    def _batches(self, samples: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        """``samples`` (indices) in micro batches: length-grouped, or shuffled in fixed-size batches
        (the last incomplete one dropped)."""
        if self.micro_batch_tokens:
            return [
                samples[b]
                for b in length_grouped_batches(self.lengths[samples], self.micro_batch_tokens, rng)
            ]
        order = samples[rng.permutation(len(samples))]
        whole = len(order) - len(order) % self.micro_batch_size
        return list(order[:whole].reshape(-1, self.micro_batch_size))

    def plan(self, epoch: int) -> list[np.ndarray]:
        """Every micro batch of ``epoch`` (sample indices, all ranks), in the order they are run."""
        if epoch not in self._plans:
            rng = np.random.default_rng(self.seed + epoch)
            every = np.arange(len(self.lengths))
            if self.sample_services is None:
                plan = self._batches(every, rng)
            else:
                by_service = [self._batches(every[self.sample_services == s], rng)
                              for s in np.unique(self.sample_services)]  # fmt: skip
                plan = service_steps(by_service, self.batches_per_step, rng)
            self._plans = {epoch: plan}  # one epoch at a time is all a stream needs
        return self._plans[epoch]

    def micro_batches(self, epoch: int, step: int) -> list[dict[str, torch.Tensor]]:
        """The ``grad_accum`` micro batches of this rank for optimizer step ``step`` of ``epoch``:
        micro batch ``m`` of rank ``r`` is the plan's ``step * world_size * grad_accum + m * world_size + r``."""
        first = step * self.batches_per_step + self.rank
        mine = self.plan(epoch)[first : first + self.batches_per_step : self.world_size]
        batches = []
        for m, idx in enumerate(mine):
            rows: datasets.Dataset | list[dict[str, Any]] = self.dataset.select(idx.tolist())
            if self.word_dropout is not None and self.critique_samples[idx].any():
                rng = np.random.default_rng((self.seed, epoch, first + m * self.world_size))
                rows = [self.word_dropout(row, rng) for row in rows]
            batches.append(self.collator(rows))
        if self.targets is not None:  # each sample's teacher targets at its scored positions
            for idx, batch in zip(mine, batches, strict=True):
                batch.update(self.targets.place(idx.tolist(), batch["labels"]))
        return batches

    def __call__(self, start: DataPosition) -> Iterator[tuple[DataPosition, list[dict[str, torch.Tensor]]]]:
        """Endless ``(position after this step, micro batches)`` from ``start`` on."""
        epoch, step = start.epoch, start.step
        while True:
            if step >= self.steps_per_epoch:
                epoch, step = epoch + 1, 0
            batches = self.micro_batches(epoch, step)
            step += 1
            yield DataPosition(epoch, step), batches
