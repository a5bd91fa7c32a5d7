"""The Python serving API: a bundle in, the top-k items of a service for a cross-service history out.

A request is checked in the caller's thread, its shape by :mod:`moe_rec.serve.request` (the check
the HTTP service's schema makes) and what depends on the bundle here; a bad one raises
:class:`RequestError` naming the input at fault and never reaches the model. It is turned into the
prompt training and evaluation use (``[BOS]``, then ``[service][c1]..[cL][dedup]`` per history
event, then the requested service's token; ``domain_ids`` the event's service, the ``[BOS]``
taking the first event's), and queued. One worker thread takes up to ``max_batch_size`` queued
requests, waiting at most ``max_wait_ms`` after the first for more (both from
:class:`~moe_rec.serve.config.ServeConfig`), answers them together and hands each caller its items
through a future. A token-level bundle is answered by one :func:`constrained_beam_search`; an
item-level bundle (``model_kind: item``) by exact scoring of every item of the asked service
(:mod:`moe_rec.eval.exact`, the code evaluation ranks with), the excluded ones left out, so it
always has ``min(k, available)`` items.

Every request is decoded with the same beam width ``max_k`` whatever its ``k`` (then cut to
``k``), so an answer does not depend on which other requests shared its batch. A score ranks
the items of one answer: for a token-level bundle the summed log-probabilities of the item's full
semantic ID (the beam score); for an item-level one that sum plus the model's per-item term and
text prior where it has them (so not a log-probability, and it may be positive). Histories longer than
``max_history`` events keep the most recent ``max_history`` (training's ``sequences.max_events``),
after moving the asked service's items last when training did (``sequences.order: asked_last``);
``exclude_seen`` removes every item of the whole given history in the requested service.

Beam search masks seen items only at the last code, so when the history covers much of a service the
``max_k`` beams can end on seen items and die. A request whose decode comes back with fewer than
``min(k, available)`` items (``available``: the service's items not excluded) is decoded again, on
its own, over a trie of just its unseen items: every prefix there leads to an unseen item, so
that search returns ``min(max_k, available)`` of them. Fewer than ``k`` items therefore means that
only that many exist (:meth:`Recommender.available` says how many). The user
bucket is ``user_bucket(user_id)`` as in training; ``user_id=None`` hashes the empty key, the same
treatment evaluation gives any user key (an unseen user shares the bucket its hash lands in).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch

from moe_rec.data.positions import left_pad
from moe_rec.data.sequences import asked_last, prompt, user_bucket
from moe_rec.data.vocab import CRITIQUE
from moe_rec.eval.beam_search import constrained_beam_search
from moe_rec.eval.exact import ServiceCatalogue, request_parts, top_for_requests
from moe_rec.eval.narrate import narrative_prompt, narrative_text, write_narratives
from moe_rec.export.bundle import Bundle, load_bundle
from moe_rec.model import MoERecForItemPrediction
from moe_rec.serve.config import DEFAULT_K, ServeConfig
from moe_rec.serve.request import RecommendRequest, RequestError, parse_request
from moe_rec.sid.trie import SIDTrie

DEFAULT_MAX_HISTORY = 50  # sequences.max_events when the bundle's config does not say
MAX_CRITIQUE_TOKENS = (
    48  # a critique's subwords beyond this are cut (training's sequences.text.max_text_tokens)
)


def _nan_to_null(table: pa.Table) -> pa.Table:
    """``table`` with every NaN of its floating-point columns replaced by null."""
    for i, field in enumerate(table.schema):
        if pa.types.is_floating(field.type):
            col = table.column(i)
            table = table.set_column(i, field, pc.if_else(pc.is_nan(col), pa.scalar(None, field.type), col))
    return table


@dataclass(frozen=True)
class Recommendation:
    service: str
    item_id: str
    score: float  # the item's ranking score (module docstring: summed code log-probabilities, + item terms)
    fields: dict[str, Any]  # the item's catalogue fields (title, brand, ... whatever the catalogue has)
    narrative: str | None = None  # why it fits and what it is, when the request asked (``explain``)


@dataclass(frozen=True)
class Answer:
    """A request's items, best first, and how many of the service's items it could have got
    (all of them, less the history's when ``exclude_seen``): fewer items than ``k`` only when
    ``available`` is below ``k``."""

    items: list[Recommendation]
    available: int


@dataclass
class _Job:
    """A validated request: its prompt, what to exclude, and where the answer goes."""

    prompt: dict[str, Any]  # input_ids, domain_ids (eval's sample layout)
    service: str
    k: int
    user: int
    exclude: torch.Tensor  # (n, L+1) full IDs never to return
    excluded_rows: list[int]  # their table rows
    available: int  # items of the service that may be returned
    future: Future
    explain: bool = False  # write a narrative for every returned item


class Recommender:
    """Thread-safe top-k recommendations from a bundle, with request batching.

    Args:
        bundle: a loaded bundle.
        config: the device (the model moves there), the batching and the beam width ``max_k``.
    """

    def __init__(self, bundle: Bundle, config: ServeConfig | None = None) -> None:
        self.config = config = config or ServeConfig()
        self.bundle, self.device = bundle, _device(config)
        bundle.model.to(self.device).eval()
        self.vocab, self.table = bundle.vocab, bundle.table
        self.item_level = isinstance(bundle.model, MoERecForItemPrediction)
        self.trie = bundle.trie.to(self.device) if bundle.trie is not None else None
        self.exact = ServiceCatalogue(self.table, self.device) if self.item_level else None
        # (N, D) per-item vectors of the item-level model (the bundle's weights never change: once)
        self.item_vectors = bundle.model.item_table() if self.item_level else None
        self.services: list[str] = list(self.vocab.services)
        cfg = bundle.model.config
        sequences = (bundle.manifest.get("config") or {}).get("sequences") or {}
        max_events = sequences.get("max_events")
        self.order: str = sequences.get("order", "interleave")  # training's cross-service order
        # token-level positions: [BOS] + items + the service token + the L codes fed back while
        # decoding; item-level: [BOS] + one per item
        fits = (
            cfg.max_position_embeddings - 1
            if self.item_level
            else (cfg.max_position_embeddings - 2 - self.vocab.levels) // self.vocab.tokens_per_item
        )
        self.max_history: int = min(int(max_events or DEFAULT_MAX_HISTORY), fits)
        self._needs_users = cfg.router_mode == "domain_user"
        index = self.table.service_index
        self._service_rows = {
            s: torch.nonzero(index == i).flatten() for i, s in enumerate(self.table.services)
        }
        self.catalogue = _nan_to_null(bundle.catalogue)  # NaN is not JSON: a missing price is a null
        self._fields = [c for c in self.catalogue.column_names if c not in ("service", "item_id")]
        self.info: dict[str, Any] = {
            "bundle": str(bundle.path),
            "created": bundle.manifest.get("created"),
            "format_version": bundle.manifest.get("format_version"),
            "versions": bundle.manifest.get("versions"),
            "source": bundle.manifest.get("source"),
            "dtype": bundle.manifest.get("dtype"),
            "device": str(self.device),
            "items_per_service": (bundle.manifest.get("items") or {}).get("per_service"),
            "max_k": config.max_k,
            "max_history": self.max_history,
            "max_batch_size": config.max_batch_size,
        }
        self._counts = {"requests": 0, "rejected": 0, "batches": 0, "items_scored": 0, "batch_seconds": 0.0}
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="moe-rec-batcher", daemon=True)
        self._worker.start()

    @classmethod
    def from_bundle(cls, path: Path | str, config: ServeConfig | None = None) -> Recommender:
        """Load and verify a bundle (see :func:`moe_rec.export.load_bundle`) onto ``config.device``."""
        config = config or ServeConfig()
        return cls(load_bundle(path, device=_device(config)), config)

    # --- requests ---------------------------------------------------------------------------

    def _service(self, service: str) -> str:
        """``service`` checked to be one the bundle serves."""
        if service not in self.services:
            raise RequestError("service", f"unknown service {service!r}; known: {self.services}")
        return service

    def _rows(self, request: RecommendRequest) -> tuple[list[str], list[int]]:
        """The history's services and table rows; an unknown service or item names its event."""
        services, items = [e.service for e in request.history], [e.item_id for e in request.history]
        for i, service in enumerate(services):
            if service not in self.services:
                raise RequestError(
                    f"history[{i}].service", f"unknown service {service!r}; known: {self.services}"
                )
        try:
            return services, self.table.rows(services, items).tolist()
        except LookupError:
            for i, (service, item) in enumerate(zip(services, items)):
                try:
                    self.table.rows(service, [item])
                except LookupError:
                    raise RequestError(
                        f"history[{i}].item_id", f"unknown item {item!r} of service {service!r}"
                    ) from None
            raise

    def _job(self, request: RecommendRequest) -> _Job:
        """What the request's shape does not say checked against the bundle (services, items,
        ``k <= max_k``), and its prompt built (caller's thread)."""
        service = self._service(request.service)
        if request.k > self.config.max_k:
            raise RequestError("k", f"must be an integer in [1, {self.config.max_k}], got {request.k!r}")
        services, rows = self._rows(request)
        codes = self.table.codes[rows]  # (n, L+1)
        recent = list(zip(services, codes.tolist()))
        if self.order == "asked_last":  # as training wrote its samples: the asked service's items last
            recent = asked_last(recent, services, service)
        recent = recent[-self.max_history :]
        # the history's distinct items of the asked service: never returned
        seen = sorted({r for s, r in zip(services, rows) if s == service}) if request.exclude_seen else []
        for field, asked in (("critique", request.critique is not None), ("explain", request.explain)):
            if asked and self.bundle.tokenizer is None:
                raise RequestError(
                    field, "this bundle's model reads and writes no text (trained without critiques.enabled)"
                )
        request_prompt = prompt(self.vocab, recent, service)
        if request.critique is not None:  # [CRITIQUE] and its words, before the asked service
            ids = self.bundle.tokenizer.encode(request.critique)[:MAX_CRITIQUE_TOKENS]
            words = [CRITIQUE, *(self.vocab.text_offset + i for i in ids)]
            domain = self.vocab.service_index(service)
            request_prompt = {
                "input_ids": request_prompt["input_ids"][:-1] + words + request_prompt["input_ids"][-1:],
                "domain_ids": request_prompt["domain_ids"][:-1] + [domain] * len(words) + [domain],
            }
        return _Job(
            prompt=request_prompt,
            explain=request.explain,
            service=service,
            k=request.k,
            user=user_bucket(request.user_id or "", self.bundle.model.config.num_user_buckets),
            exclude=self.table.codes[seen],
            excluded_rows=seen,
            available=len(self._service_rows[service]) - len(seen),
            future=Future(),
        )

    def _checked(self, raw: Any) -> _Job:
        """A Python caller's request as a job; a bad one is counted and raised."""
        try:
            return self._job(parse_request(raw))
        except RequestError:
            self._count(rejected=1)
            raise

    def _submit(self, job: _Job) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the recommender is closed")
            self._queue.put(job)

    def answer(self, request: RecommendRequest) -> Answer:
        """The items of a request whose shape is already checked (the HTTP service's), and how many
        it could have got.

        Raises:
            RequestError: an unknown service or item, or ``k`` over ``max_k``.
        """
        try:
            job = self._job(request)
        except RequestError:
            self._count(rejected=1)
            raise
        self._submit(job)
        return Answer(job.future.result(), job.available)

    def recommend(
        self,
        history: Sequence[Mapping[str, str] | tuple[str, str]],
        service: str,
        k: int = DEFAULT_K,
        exclude_seen: bool = True,
        user_id: str | None = None,
        critique: str | None = None,
        explain: bool = False,
    ) -> list[Recommendation]:
        """The ``k`` best items of ``service`` for a cross-service ``history`` (oldest first), best
        first; fewer only when the service has fewer than ``k`` items left after exclusion
        (:meth:`available`), and then all of them. ``critique``: what the user wants changed, in
        words, read before the items are scored; ``explain``: each item gets a narrative (both
        need a bundle trained with critiques and narratives).

        Raises:
            RequestError: naming the bad input (unknown service or item, empty history, k out of range).
        """
        raw = {
            "history": history,
            "service": service,
            "k": k,
            "exclude_seen": exclude_seen,
            "user_id": user_id,
            "critique": critique,
            "explain": explain,
        }
        job = self._checked(raw)
        self._submit(job)
        return job.future.result()

    def available(
        self,
        history: Sequence[Mapping[str, str] | tuple[str, str]],
        service: str,
        exclude_seen: bool = True,
    ) -> int:
        """How many items of ``service`` a request may get: all of them, less the history's when
        ``exclude_seen``. :meth:`recommend` returns fewer than ``k`` only when this is below ``k``.

        Raises:
            RequestError: naming the bad input, as :meth:`recommend` does.
        """
        return self._checked({"history": history, "service": service, "exclude_seen": exclude_seen}).available

    def recommend_many(self, requests: list[dict[str, Any]]) -> list[list[Recommendation] | RequestError]:
        """Many requests (dicts with the keys of :meth:`recommend`) decoded in shared batches; a bad
        one comes back as its :class:`RequestError` in its place, the others still answered."""
        out: list[_Job | RequestError] = []
        for r in requests:
            try:
                out.append(self._checked(r))
            except RequestError as e:
                out.append(e)
        for job in out:
            if isinstance(job, _Job):
                self._submit(job)
        return [job.future.result() if isinstance(job, _Job) else job for job in out]

    def item(self, service: str, item_id: str) -> dict[str, Any]:
        """The catalogue row (``service``, ``item_id`` and every field) of one item."""
        service = self._service(service)
        if not isinstance(item_id, str):
            raise RequestError("item_id", f"must be a string, got {type(item_id).__name__}")
        try:
            row = int(self.table.rows(service, [item_id])[0])
        except LookupError:
            raise RequestError("item_id", f"unknown item {item_id!r} of service {service!r}") from None
        return self.catalogue.slice(row, 1).to_pylist()[0]

    # --- the batching worker ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch, deadline = [job], time.monotonic() + self.config.max_wait_ms / 1000
            while len(batch) < self.config.max_batch_size:
                try:
                    nxt = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            try:
                for j, result in zip(batch, self._decode(batch)):
                    j.future.set_result(result)
            except Exception as e:  # noqa: BLE001 - a model failure is every caller's answer
                for j in batch:
                    j.future.set_exception(e)

    def _search(
        self, batch: list[_Job], trie: SIDTrie, exclude: list[torch.Tensor] | None
    ) -> list[list[tuple[int, float]]]:
        """One beam search of width ``max_k`` over the batch's prompts: per job, its ``(table row,
        score)`` of every live beam, best first."""
        ids, mask, domains = left_pad([j.prompt for j in batch])
        users = torch.tensor([j.user for j in batch], device=self.device) if self._needs_users else None
        services = [j.service for j in batch]
        codes, scores = constrained_beam_search(
            self.bundle.model,
            trie,
            self.vocab,
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            domain_ids=domains.to(self.device),
            user_ids=users,
            services=services,
            beam_width=self.config.max_k,
            exclude_codes=exclude,
        )  # (B, W, L+1), (B, W)
        b, w, depth = codes.shape
        rows = self.table.rows_for_codes([s for s in services for _ in range(w)], codes.reshape(b * w, depth))
        return [
            [(r, s) for r, s in zip(job_rows, job_scores) if r >= 0]
            for job_rows, job_scores in zip(rows.view(b, w).tolist(), scores.cpu().tolist())
        ]

    def _unseen_trie(self, job: _Job) -> SIDTrie:
        """The trie of the job's service's items that it may get (none of those it excludes)."""
        rows = self._service_rows[job.service]
        rows = rows[~torch.isin(rows, torch.tensor(job.excluded_rows, dtype=torch.long))]
        index = torch.full((len(rows),), self.services.index(job.service), dtype=torch.long)
        return SIDTrie.build(self.trie.services, index, self.table.codes[rows], self.trie.vocab_sizes).to(
            self.device
        )

    def _score_exactly(self, batch: list[_Job]) -> list[list[tuple[int, float]]]:
        """The item-level model: every item of each job's service scored exactly, the excluded
        ones left out; per job, its ``(table row, score)`` of the ``max_k`` best, best first."""
        prompts = [{**j.prompt, "user": ""} for j in batch]
        users = torch.tensor([j.user for j in batch])
        log_probs, query, own = request_parts(self.bundle.model, prompts, self.vocab, users)
        rows, scores = top_for_requests(
            log_probs, [j.service for j in batch], self.exact, self.config.max_k, [j.excluded_rows for j in batch],
            query, self.item_vectors, own,
        )  # fmt: skip
        return [
            [(r, s) for r, s in zip(job_rows, job_scores) if r >= 0]
            for job_rows, job_scores in zip(rows.tolist(), scores.tolist())
        ]

    def _decode(self, batch: list[_Job]) -> list[list[Recommendation]]:
        """Each job's top ``k`` real items. Item-level bundles score every item exactly. Token-level
        ones run one beam search over the batch's prompts; a job that got fewer than it can have
        (its beams ended on excluded items) is searched again alone over the trie of its unseen items."""
        t0 = time.perf_counter()
        if self.item_level:
            found = self._score_exactly(batch)
        else:
            found = self._search(batch, self.trie, [j.exclude for j in batch])
            for i, j in enumerate(batch):
                if len(found[i]) < min(j.k, j.available):
                    found[i] = self._search([j], self._unseen_trie(j), None)[0]
        results, scored = [], 0
        for j, beams in zip(batch, found):
            keep = beams[: j.k]
            scored += len(keep)
            records = self.catalogue.take(pa.array([r for r, _ in keep], pa.int64())).to_pylist()
            results.append(
                [
                    Recommendation(
                        service=j.service,
                        item_id=rec["item_id"],
                        score=float(s),
                        fields={f: rec[f] for f in self._fields},
                    )
                    for (_, s), rec in zip(keep, records)
                ]
            )
        if any(j.explain for j in batch):
            results = self._narrate(
                batch, results, [[r for r, _ in beams[: j.k]] for j, beams in zip(batch, found)]
            )
        self._count(
            requests=len(batch), batches=1, items_scored=scored, batch_seconds=time.perf_counter() - t0
        )
        return results

    def _narrate(
        self, batch: list[_Job], results: list[list[Recommendation]], rows: list[list[int]]
    ) -> list[list[Recommendation]]:
        """Every item of the jobs that asked for ``explain`` (``rows``: their table rows), with its
        narrative (one greedy decode over all of them, KV-cached: one prefill, then one position a
        step; :mod:`moe_rec.eval.narrate`)."""
        asked = [(i, n) for i, j in enumerate(batch) if j.explain for n in range(len(results[i]))]
        prompts, users = [], []
        for i, n in asked:
            item = self.vocab.item_tokens(batch[i].service, self.table.codes[rows[i][n]].tolist())
            prompts.append(narrative_prompt(batch[i].prompt, item, self.vocab))
            users.append(batch[i].user)
        texts = write_narratives(self.bundle.model, prompts, users, self.vocab)
        out = [list(r) for r in results]
        for (i, n), ids in zip(asked, texts, strict=True):
            out[i][n] = replace(out[i][n], narrative=narrative_text(self.bundle.tokenizer, ids))
        return out

    # --- bookkeeping ------------------------------------------------------------------------

    def _count(self, **delta: float) -> None:
        with self._lock:
            for key, value in delta.items():
                self._counts[key] += value

    def stats(self) -> dict[str, Any]:
        """Counters since start: requests decoded, requests rejected, batches, mean batch size,
        items returned (``items_scored``), mean seconds per batch."""
        with self._lock:
            c = dict(self._counts)
        c["mean_batch_size"] = c["requests"] / c["batches"] if c["batches"] else 0.0
        c["mean_batch_seconds"] = c.pop("batch_seconds") / c["batches"] if c["batches"] else 0.0
        return c

    def close(self) -> None:
        """Finish the queued requests and stop the worker thread (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._worker.join()

    def __enter__(self) -> Recommender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _device(config: ServeConfig) -> torch.device:
    """``config.device``, or CUDA when there is one."""
    return torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
