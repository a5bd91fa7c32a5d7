"""Teacher targets: what one model per service predicts at each training position of a joint model.

The joint model trains on every service's windows at once; a model trained on one service alone
ranks that service's items better (docs/RESULTS.md, the joint item-level model). Distillation hands
the joint model those models' judgement as well as the one bought item: at every scored position
of a training window, the teacher of the position's service reads the same window's events *of its
service* (all it was trained on), ranks its whole catalogue exactly (:mod:`moe_rec.eval.exact`, as
evaluation does) and keeps its top K with their log-probabilities renormalised over the K; the
joint model's loss then adds ``distill_weight`` x ``KL(teacher || model)`` over those K items
(:meth:`~moe_rec.model.item_model.MoERecForItemPrediction._item_softmax_loss`). Targets are made
once, offline, for every sample of the train split (:func:`teacher_targets`), saved beside the run
(:meth:`TeacherTargets.save`) and placed into each micro batch by the sample's index
(:meth:`TeacherTargets.place`): a step pays a KL over K items per position, not three teachers'
forwards (docs/training.md has the measured cost).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_rec.console import track
from moe_rec.data.positions import code_token_ranges, item_batch
from moe_rec.data.schema import DataError
from moe_rec.data.sequences import IGNORE_INDEX
from moe_rec.data.vocab import BOS, Vocabulary
from moe_rec.eval.exact import ServiceCatalogue, mean_probability, position_log_probs, service_scores
from moe_rec.model import MoERecForItemPrediction
from moe_rec.sid.table import SIDTable

FORMAT = 1  # the saved file's layout


@dataclasses.dataclass(frozen=True)
class Teacher:
    """One service's teacher: its model and the SID table it reads (its own catalogue's IDs)."""

    model: MoERecForItemPrediction
    table: SIDTable


@dataclasses.dataclass
class TeacherTargets:
    """The teachers' top K at every scored position of a train split, sample by sample.

    ``offsets`` (N + 1,): sample i's entries are ``offsets[i]:offsets[i + 1]``, one per scored
    event of the sample in order; ``rows`` (E, K) the joint table's rows of the teacher's K best
    items for that event (-1: none, e.g. a service without a teacher); ``log_probs`` (E, K) the
    teacher's log-probabilities over them; ``meta`` says what made them (teachers, K, split size).
    """

    offsets: np.ndarray
    rows: torch.Tensor
    log_probs: torch.Tensor
    meta: dict[str, Any]

    @property
    def k(self) -> int:
        return int(self.rows.shape[1])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": FORMAT, "offsets": torch.from_numpy(self.offsets), "rows": self.rows,
                   "log_probs": self.log_probs, "meta": self.meta}  # fmt: skip
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> TeacherTargets:
        """Raises DataError for a missing, unreadable or foreign file, saying which."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no teacher targets there (make them with tools/teacher_targets.py)")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: say which, not torch's unpickling trace
            raise DataError(
                f"{path}: not a readable teacher-targets file ({type(e).__name__}: {e})"
            ) from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise DataError(f"{path}: not a teacher-targets file of format {FORMAT}")
        return cls(payload["offsets"].numpy(), payload["rows"], payload["log_probs"], payload["meta"])

    def place(self, indices: Sequence[int], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``teacher_rows`` and ``teacher_log_probs`` (B, T, K) of a micro batch of the samples
        ``indices`` whose ``labels`` (B, T, P) the collator made: each sample's entries at its scored
        positions, in order (-1 / 0 elsewhere). Raises DataError where a sample's scored positions
        do not number its entries: the targets were made for other sequences."""
        b, t = labels.shape[:2]
        rows = torch.full((b, t, self.k), -1, dtype=torch.long)
        log_probs = torch.zeros((b, t, self.k))
        scored = labels[..., 0] != IGNORE_INDEX  # (B, T)
        for i, sample in enumerate(indices):
            start, stop = int(self.offsets[sample]), int(self.offsets[sample + 1])
            where = scored[i].nonzero().flatten()
            if len(where) != stop - start:
                raise DataError(
                    f"train sample {sample} has {len(where)} scored events but its teacher targets "
                    f"{stop - start}: they were made for other sequences; make them again "
                    "(tools/teacher_targets.py) after `moe-rec sequences build`"
                )
            rows[i, where] = self.rows[start:stop].long()
            log_probs[i, where] = self.log_probs[start:stop].float()
        return {"teacher_rows": rows, "teacher_log_probs": log_probs}


def _events(tokens: torch.Tensor, vocab: Vocabulary) -> tuple[torch.Tensor, torch.Tensor]:
    """Event positions of one sample's item tokens (T, S): (n,) positions and (n,) service indices."""
    first = tokens[:, 0]
    is_event = (first >= vocab.service_offset) & (first < vocab.service_offset + len(vocab.services))
    where = is_event.nonzero().flatten()
    return where, first[where] - vocab.service_offset


def _row_map(source: SIDTable, target: SIDTable, service: str, names: tuple[str, str]) -> torch.Tensor:
    """(N_source,) each ``source`` row of ``service`` its row in ``target`` (by item id), -1 for
    the rows of other services (a joint model can teach too). Raises DataError naming
    ``names`` (the two tables) when ``target`` lacks one of them: made from another catalogue."""
    mapping = torch.full((len(source),), -1, dtype=torch.long)
    mine = (source.service_index == source.services.index(service)).nonzero().flatten()
    try:
        rows = target.rows(service, source.item_ids[mine.numpy()].tolist())
    except Exception as e:
        raise DataError(f"the {names[1]} SID table lacks {service} items of the {names[0]}'s: {e}") from None
    mapping[mine] = torch.from_numpy(rows.astype(np.int64))
    return mapping


def teacher_targets(
    samples: Sequence[Mapping[str, Any]],
    table: SIDTable,
    teachers: Mapping[str, Sequence[Teacher]],
    k: int,
    *,
    batch_size: int = 64,
    temperature: float = 1.0,
) -> TeacherTargets:
    """The teachers' top ``k`` at every scored event of ``samples`` (train rows of the joint
    sequences, written with ``table``'s vocabulary): each teacher of the event's service reads the
    sample's events of that service before it, from ``[BOS]``, as its own training windows hold
    them (each hashes the user into its own buckets), and gives a probability to every item of the
    service; several teachers of one service (e.g. its runs of several seeds) are an ensemble,
    their probabilities averaged. ``temperature`` > 1 softens each teacher's softmax (its logits
    divided by it) before the average, so the top ``k`` hand on more of the teacher's doubt about
    less-bought items. Events of a service without a teacher get rows -1."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    unknown = sorted(set(teachers) - set(table.services))
    if unknown:
        raise DataError(
            f"teachers for services {unknown} that the joint table lacks; it has {table.services}"
        )
    empty = sorted(s for s, group in teachers.items() if not group)
    if empty:
        raise DataError(f"services {empty} are given no teacher")
    vocab = table.vocabulary()
    starts = torch.tensor([s for s, _ in code_token_ranges(vocab)])
    joint = ServiceCatalogue(table)
    scorers = {
        s: [_Scorer(t, s, table, joint, f"{s} teacher {n + 1}", temperature) for n, t in enumerate(group)]
        for s, group in teachers.items()
    }
    untaught = (torch.full((k,), -1, dtype=torch.long), torch.zeros(k))  # an event no teacher scored
    counts: list[int] = []
    rows_out: list[torch.Tensor] = []
    lp_out: list[torch.Tensor] = []
    chunks = range(0, len(samples), batch_size)
    for start in track(chunks, "teacher targets"):
        chunk = [samples[i] for i in range(start, min(start + batch_size, len(samples)))]
        texts = [
            start + i for i, r in enumerate(chunk) if max(r["input_ids"], default=0) >= vocab.text_offset
        ]
        if texts:  # a critique or narrative sample: its words are no teacher's input
            raise DataError(
                f"train sample {texts[0]} holds text tokens (critiques or narratives); teacher targets "
                "are made for item histories only: build the sequences without critiques.enabled"
            )
        batch = item_batch(chunk, vocab, 1)  # its user ids are not read: the teachers hash their own
        # per service: (sample, its events of the service: positions, joint rows), in order
        requests: dict[str, list[tuple[int, list[int], list[int]]]] = {s: [] for s in teachers}
        entries = []  # per sample: (M_i,) scored positions
        for i in range(len(chunk)):
            tokens, labels = batch["item_tokens"][i], batch["labels"][i]
            scored = (labels[:, 0] != IGNORE_INDEX).nonzero().flatten()
            entries.append(scored)
            where, services = _events(tokens, vocab)
            for s_index in services[torch.isin(where, scored)].unique().tolist():
                service = table.services[s_index]
                if service not in teachers:
                    continue
                mine = where[services == s_index]  # this service's events, in order
                joint_rows = table.rows_for_codes(service, tokens[mine, 1:] - starts)
                requests[service].append((i, mine.tolist(), joint_rows.tolist()))
        found: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (sample, position) -> top k
        for service, asked in requests.items():
            if not asked:
                continue
            lp = mean_probability([scorer(asked, chunk) for scorer in scorers[service]])  # (M, N_s)
            best, top = torch.topk(lp, min(k, lp.shape[1]), dim=1)  # (M, k'): best first
            top_rows = torch.full((len(lp), k), -1, dtype=torch.long)
            top_lp = torch.zeros((len(lp), k))
            top_rows[:, : top.shape[1]] = joint.rows[service][top]
            top_lp[:, : top.shape[1]] = torch.log_softmax(best, dim=1)  # renormalised over the k
            picks = [(i, position) for i, mine, _ in asked for position in mine]
            found.update(zip(picks, zip(top_rows, top_lp, strict=True), strict=True))
        for i, scored in enumerate(entries):
            counts.append(len(scored))
            for position in scored.tolist():
                top_rows, top_lp = found.get((i, position), untaught)
                rows_out.append(top_rows)
                lp_out.append(top_lp)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    meta = {"k": k, "samples": len(samples), "events": int(offsets[-1]), "services": sorted(teachers),
            "temperature": temperature}  # fmt: skip
    rows = torch.stack(rows_out).int() if rows_out else torch.zeros((0, k), dtype=torch.int32)
    log_probs = torch.stack(lp_out).half() if lp_out else torch.zeros((0, k), dtype=torch.float16)
    return TeacherTargets(offsets, rows, log_probs, meta)


class _Scorer:
    """One teacher of ``service``: its log-probabilities over the service's items after the events
    before each of a batch's events of the service."""

    def __init__(
        self,
        teacher: Teacher,
        service: str,
        table: SIDTable,
        joint: ServiceCatalogue,
        name: str,
        temperature: float = 1.0,
    ) -> None:
        self.teacher, self.service, self.temperature = teacher, service, temperature
        self.to_teacher = _row_map(table, teacher.table, service, ("joint", f"{name}'s"))
        to_joint = _row_map(teacher.table, table, service, (name, "joint"))
        self.catalogue = ServiceCatalogue(teacher.table)
        # (N_s,) each of the teacher's items of the service (its catalogue's order) -> its joint column
        self.column = joint.local_of(to_joint[self.catalogue.rows[service]], service)
        self.vectors = teacher.model.item_table()
        self.vocab = teacher.table.vocabulary()

    def __call__(
        self, asked: list[tuple[int, list[int], list[int]]], chunk: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        """(M, N_s) log-probabilities over the service's items (columns: the joint catalogue's
        order) for every event in ``asked`` (sample, its events' positions, their joint rows), in
        order: the teacher's exact scores / P (its training logits) / the temperature, softmaxed
        over the catalogue."""
        teacher, service, vocab = self.teacher, self.service, self.vocab
        rows = []
        for i, _, joint_rows in asked:
            own = self.to_teacher[torch.tensor(joint_rows)]
            if bool((own < 0).any()):
                raise DataError(f"a {service} event of a training window is no item of the {service} teacher")
            ids = [BOS]
            for r in own.tolist():
                ids += vocab.item_tokens(service, teacher.table.codes[r].tolist())
            domain = vocab.service_index(service)
            rows.append({"user": chunk[i]["user"], "input_ids": ids, "domain_ids": [domain] * len(ids)})
        batch = item_batch(rows, vocab, teacher.model.config.num_user_buckets)
        log_probs, query, own_term = position_log_probs(teacher.model, batch)  # (B, T, P, K), ...
        # teacher position j, after j of the service's events, predicts the next one (index j)
        picks = [(b, j) for b, (_, mine, _) in enumerate(asked) for j in range(len(mine))]
        b_idx = torch.tensor([b for b, _ in picks])
        j_idx = torch.tensor([j for _, j in picks])
        scores = service_scores(
            log_probs[b_idx, j_idx],
            service,
            self.catalogue,
            query=query[b_idx, j_idx] if query is not None else None,
            item_vectors=self.vectors,
            own=(own_term[0][b_idx, j_idx], own_term[1][b_idx, j_idx]) if own_term is not None else None,
        )  # (M, N_s) the exact score of every item of the service: P x its training logit
        logits = torch.empty_like(scores)
        logits[:, self.column] = scores / (teacher.table.codes.shape[1] * self.temperature)
        return torch.log_softmax(logits, dim=1)
