"""Distillation from one model per service (moe_rec.train.distill): the KL term of the item loss
against a float64 loop over the evaluation path's scores; teacher targets placed by sample, saved,
loaded and refused when foreign; the builder against each teacher's exact ranking of the same
history as a request; and a tiny run trained on targets made by tools/teacher_targets.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_rec.data.positions import code_token_ranges, item_batch
from moe_rec.data.schema import DataError
from moe_rec.data.sequences import IGNORE_INDEX
from moe_rec.data.vocab import BOS, Vocabulary
from moe_rec.eval.exact import ServiceCatalogue, position_log_probs, request_log_probs, top_for_requests
from moe_rec.model import MoERecForItemPrediction, build_config, model_class
from moe_rec.sid.table import SIDTable
from moe_rec.train.distill import Teacher, TeacherTargets, teacher_targets
from tests.model.test_item_model import VOCAB, _catalogue, _model, _sample
from tests.train.conftest import ROOT, tiny_config

SEEDS = [int(torch.randint(1 << 30, (1,))) for _ in range(2)]  # fresh seeds each run


def _item_model(seed: int, n_items: int, **fields: object) -> MoERecForItemPrediction:
    """The tiny item model with the item softmax, learned vectors, item text and its prior."""
    model = _model(
        seed, "token", item_loss="items", item_embedding=True, num_items=n_items, item_text=True,
        item_text_dim=6, item_text_prior=True, **fields,
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed + 1)
    model.set_item_text(torch.randn(n_items, 6, generator=g))
    with torch.no_grad():
        model.item_embed.weight.normal_(0, 0.5, generator=g)
    return model


@pytest.mark.parametrize(("over", "negatives"), [("teacher_items", 0), ("catalogue", 0), ("catalogue", 2)])
@pytest.mark.parametrize("seed", SEEDS)
def test_the_distill_term_is_the_kl_from_the_teacher_to_the_models_softmax_over_its_items(
    seed: int, over: str, negatives: int
) -> None:
    """lm_loss with teacher targets minus lm_loss without = distill_weight x the mean over scored
    positions of KL(teacher || the model's softmax over the teacher's items, or with
    ``distill_over='catalogue'`` over the item loss's candidates (the service's items, or the
    target and the drawn ones) and the teacher's, read at the teacher's), the logits read off the
    evaluation path (mean code log-probability + query . vector + the own-item correction) in
    float64; -1 rows are left out, a position with none adds 0, gradients stay finite."""
    g = torch.Generator().manual_seed(seed)
    catalogue = _catalogue(g)
    model = _item_model(
        seed % 1000, len(catalogue), distill_weight=0.7, distill_over=over, item_negatives=negatives
    )
    model.draw_negatives_from(seed)  # both forwards and the reference below draw the same items
    model.set_train_catalogue(
        torch.tensor([c for _, c in catalogue]), torch.tensor([VOCAB.service_token(s) for s, _ in catalogue])
    )
    events = [torch.randint(len(catalogue), (n,), generator=g).tolist() for n in (5, 3, 4)]  # catalogue rows
    rows = [_sample([catalogue[r] for r in sample], f"u{j}") for j, sample in enumerate(events)]
    batch = item_batch(rows, VOCAB, 16)
    batch.pop("user_ids")
    k = 5
    b, t = batch["labels"].shape[:2]
    teacher_rows = torch.full((b, t, k), -1, dtype=torch.long)
    teacher_lp = torch.zeros((b, t, k))
    service_of = torch.tensor([VOCAB.service_token(s) for s, _ in catalogue])
    scored = (batch["labels"][..., 0] != IGNORE_INDEX).nonzero().tolist()
    for n, (i, pos) in enumerate(scored):
        if n == 1:
            continue  # a position with no teacher row at all
        mine = (service_of == batch["item_tokens"][i, pos, 0]).nonzero().flatten()
        count = 1 + int(torch.randint(len(mine) - 1, (1,), generator=g))  # never the whole service
        pick = mine[torch.randperm(len(mine), generator=g)[:count]]  # at least one slot left at -1
        teacher_rows[i, pos, : len(pick)] = pick
        teacher_lp[i, pos, : len(pick)] = torch.log_softmax(torch.randn(len(pick), generator=g) * 2, 0)
    plain = model(**batch).lm_loss
    taught = model(**batch, teacher_rows=teacher_rows, teacher_log_probs=teacher_lp).lm_loss

    labels = batch.pop("labels")
    log_probs, query, own = position_log_probs(model, batch)  # (B, T, P, K), (B, T, D'), rows/amounts
    vectors = model.item_table().double()
    codes = [c for _, c in catalogue]
    total = 0.0
    for i, pos in scored:
        known = [r for r in teacher_rows[i, pos].tolist() if r >= 0]
        if not known:
            continue
        at = pos - 1  # position pos - 1 predicts the event at pos
        lp = log_probs[i, at].double()

        def logit(r: int, i: int = i, at: int = at, lp: torch.Tensor = lp) -> float:
            x = sum(float(lp[p, c]) for p, c in enumerate(codes[r])) / len(codes[r])
            x += float(query[i, at].double() @ vectors[r])
            if own is not None and int(own[0][i, at]) == r:
                x += float(own[1][i, at])
            return x

        logits = [logit(r) for r in known]
        if over == "catalogue":  # the item loss's candidates and the teacher's items, each once
            service = int(batch["item_tokens"][i, pos, 0])
            candidates = set((service_of == service).nonzero().flatten().tolist())
            if negatives:  # the target (position pos holds event pos - 1) and the drawn items
                drawn = model._draw_negatives(torch.tensor(sorted(candidates)), service)
                candidates = {events[i][pos - 1], *drawn.tolist()}
            norm = math.log(sum(math.exp(logit(r)) for r in candidates | set(known)))
        else:
            norm = math.log(sum(math.exp(x) for x in logits))
        for r_index in range(len(known)):
            p_log = float(teacher_lp[i, pos, r_index])
            total += math.exp(p_log) * (p_log - (logits[r_index] - norm))
    want = 0.7 * total / len(scored)
    assert labels is not None and want > 0
    assert float(taught - plain) == pytest.approx(want, rel=1e-4, abs=1e-6)
    model.zero_grad()
    taught.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_an_unknown_distill_over_is_refused_naming_the_choices() -> None:
    with pytest.raises(
        ValueError, match="distill_over must be 'teacher_items' or 'catalogue', got 'catalog'"
    ):
        _item_model(0, 8, distill_over="catalog")


def test_targets_are_placed_at_each_samples_scored_positions_saved_and_checked(tmp_path: Path) -> None:
    """place() puts sample i's entries at its scored positions in order; save/load round-trips; a
    sample whose scored positions do not number its entries, a missing file and a foreign one are
    refused with a DataError naming the file or the sample."""
    g = torch.Generator().manual_seed(3)
    counts = [2, 0, 3]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    rows = torch.randint(20, (5, 4), generator=g, dtype=torch.int32)
    lp = torch.randn(5, 4, generator=g).half()
    targets = TeacherTargets(offsets, rows, lp, {"k": 4})
    targets.save(tmp_path / "t.pt")
    loaded = TeacherTargets.load(tmp_path / "t.pt")
    assert loaded.rows.equal(rows) and loaded.log_probs.equal(lp) and (loaded.offsets == offsets).all()
    labels = torch.full((2, 6, 3), IGNORE_INDEX)
    labels[0, [1, 4], 0] = 1  # sample 2 of the file: 3 entries wanted, at positions 1, 2, 5 of row 1
    labels[1, [1, 2, 5], 0] = 1
    placed = loaded.place([0, 2], labels)
    assert placed["teacher_rows"][0, [1, 4]].tolist() == rows[0:2].long().tolist()
    assert placed["teacher_rows"][1, [1, 2, 5]].tolist() == rows[2:5].long().tolist()
    assert placed["teacher_log_probs"][1, 5].tolist() == lp[4].float().tolist()
    assert (placed["teacher_rows"][0, [0, 2, 3, 5]] == -1).all()
    with pytest.raises(DataError, match="train sample 2 has 2 scored events but its teacher targets 3"):
        loaded.place([2], labels[:1])
    with pytest.raises(DataError, match="no teacher targets there"):
        TeacherTargets.load(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(DataError, match="bad.pt: not a readable teacher-targets file"):
        TeacherTargets.load(tmp_path / "bad.pt")


def _teacher(service: str, item_ids: list[str], seed: int, other: str | None = None) -> Teacher:
    """A teacher whose codes differ from the joint table's (its own SID table): of ``service``
    alone, or also of ``other`` with items of ids the joint table does not hold (a joint teacher)."""
    services = [service] * len(item_ids) + ([other] * 3 if other else [])
    item_ids = item_ids + ([f"x{n}" for n in range(3)] if other else [])
    vocab = Vocabulary(services=tuple(dict.fromkeys(services)), levels=2, codebook_size=4, dedup_size=4)
    codes = torch.tensor([[i % 4, (i // 4) % 4, 0] for i in range(len(item_ids))])
    table = SIDTable(services=services, item_ids=item_ids, codes=codes, codebook_size=4, max_dedup=4)
    torch.manual_seed(seed)
    cfg = build_config("tiny", vocab_size=vocab.size, num_domains=len(vocab.services), num_user_buckets=16,
                       code_token_ranges=code_token_ranges(vocab), item_loss="items", item_embedding=True,
                       num_items=len(item_ids))  # fmt: skip
    model = model_class(cfg)(cfg)
    model.set_train_catalogue(codes, torch.tensor([vocab.service_token(s) for s in services]))
    with torch.no_grad():
        model.item_embed.weight.normal_(0, 0.5)
    return Teacher(model.eval(), table)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_builder_matches_each_teachers_ranking_of_the_same_history_as_a_request(
    seed: int, temperature: float
) -> None:
    """For every scored event of joint windows that mix services, the targets are the top k of
    what the event's service's teachers give a request holding that service's earlier events of
    the window (left-padded, asked service last: the evaluation path): each teacher's softmax of
    its exact scores / P / the temperature over the whole catalogue, averaged over the teachers (a has two, an
    ensemble), mapped to joint rows, renormalised over the k (a float64 sum here); a teacher of
    several services (b's also holds items of c that the joint table lacks) ranks its own
    service's items; a service without a teacher gets rows -1."""
    g = torch.Generator().manual_seed(seed)
    catalogue = _catalogue(g)
    joint = SIDTable(services=[s for s, _ in catalogue], item_ids=[f"{s}{n % 4}" for n, (s, _) in enumerate(catalogue)],
                     codes=torch.tensor([c for _, c in catalogue]), codebook_size=8, max_dedup=4)  # fmt: skip
    assert joint.vocabulary() == VOCAB
    teachers = {s: [_teacher(s, [f"{s}{n}" for n in order], seed % 997 + j, other) for j, order in enumerate(orders)]
                for s, other, orders in (("a", None, ((3, 1, 0, 2), (1, 2, 3, 0))), ("b", "c", ((3, 1, 0, 2),)))}  # fmt: skip
    samples = []
    for j, n in enumerate((6, 2, 5)):
        row = _sample([catalogue[int(i)] for i in torch.randint(len(catalogue), (n,), generator=g)], f"u{j}")
        row["labels"] = [0]
        samples.append(row)
    k = 3
    targets = teacher_targets(samples, joint, teachers, k, batch_size=2, temperature=temperature)
    assert len(targets) == 3 and targets.meta["events"] == sum(len(s["input_ids"]) // 5 for s in samples)
    entry = 0
    for row in samples:
        events = [(VOCAB.services[row["domain_ids"][1 + 5 * e]], row["input_ids"][1 + 5 * e : 6 + 5 * e])
                  for e in range(len(row["input_ids"]) // 5)]  # fmt: skip
        for e, (service, _) in enumerate(events):
            got_rows, got_lp = targets.rows[entry].tolist(), targets.log_probs[entry].float()
            entry += 1
            if service not in teachers:
                assert got_rows == [-1] * k
                continue
            mean: dict[str, float] = {}  # item id -> the teachers' mean probability
            for teacher in teachers[service]:
                vocab = teacher.table.vocabulary()
                ids = [BOS]
                for s, tokens in events[:e]:
                    if s == service:
                        item = joint.item_ids[int(joint.rows_for_codes(s, torch.tensor([tokens[1:]]) - torch.tensor(
                            [lo for lo, _ in code_token_ranges(VOCAB)]))[0])]  # fmt: skip
                        ids += vocab.item_tokens(
                            service, teacher.table.codes_for(service, [item])[0].tolist()
                        )
                ids.append(vocab.service_token(service))
                domain = vocab.service_index(service)
                request = {"user": row["user"], "input_ids": ids, "domain_ids": [domain] * len(ids)}
                batch = item_batch([request], vocab, teacher.model.config.num_user_buckets, left_pad=True)
                log_probs, query, own = request_log_probs(teacher.model, batch)
                top, scores = top_for_requests(log_probs, [service], ServiceCatalogue(teacher.table), 4,
                                               query=query, item_vectors=teacher.model.item_table(), own=own)  # fmt: skip
                z = sum(math.exp(v / 3 / temperature) for v in scores[0].double().tolist())
                for r, v in zip(top[0].tolist(), scores[0].double().tolist(), strict=True):
                    item = str(teacher.table.item_ids[r])
                    mean[item] = mean.get(item, 0.0) + math.exp(v / 3 / temperature) / z / len(
                        teachers[service]
                    )
            best = sorted(mean, key=lambda item: -mean[item])[:k]
            assert got_rows == joint.rows(service, best).tolist()
            kept = sum(mean[item] for item in best)
            want = torch.tensor([math.log(mean[item] / kept) for item in best], dtype=torch.float32)
            torch.testing.assert_close(got_lp, want, atol=2e-3, rtol=1e-3)
    assert entry == len(targets.rows)
    texts = dict(samples[1], input_ids=samples[1]["input_ids"] + [VOCAB.text_offset])
    with pytest.raises(DataError, match="train sample 1 holds text tokens"):
        teacher_targets([samples[0], texts], joint, teachers, k)


def test_a_run_trains_on_targets_made_by_the_tool_and_refuses_foreign_ones(
    run_dir: Path, tmp_path: Path
) -> None:
    """tools/teacher_targets.py with the run itself as every service's teacher (grocery's two
    checkpoints an ensemble); the same run trained again on them logs a larger first loss (the KL
    is added, nothing else changes: full softmax, one seed); targets for fewer samples, or on a
    token-level run, are refused by name."""
    from moe_rec.config import ConfigError
    from moe_rec.train import train
    from moe_rec.train.trainer import Trainer

    item = ("model.kind=item", "model.overrides.item_loss=items", "model.overrides.item_embedding=true",
            "model.overrides.distill_weight=2.0", "train.max_steps=2", "train.log_every=1")  # fmt: skip
    teacher_cfg = tiny_config(run_dir, *item)
    train(teacher_cfg)
    out = tmp_path / "teachers.pt"
    cmd = [sys.executable, str(ROOT / "tools/teacher_targets.py"), "--config", str(ROOT / "configs/experiments/demo.yaml"),
           f"run_dir={run_dir}", "--teacher", f"grocery={run_dir}", "--teacher", f"market={run_dir}@latest",
           "--teacher", f"grocery={run_dir}@latest",
           "--top-k", "4", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    targets = TeacherTargets.load(out)
    assert (targets.rows[:, 0] >= 0).all() and targets.meta["services"] == ["grocery", "market"]
    assert targets.meta["teachers"] == {"grocery": [f"grocery={run_dir}", f"grocery={run_dir}@latest"],
                                        "market": [f"market={run_dir}@latest"]}  # fmt: skip

    def first_loss(name: str, *extra: str) -> float:
        student = tmp_path / name
        student.mkdir()
        for part in ("sequences", "sids"):
            (student / part).symlink_to(run_dir / part)
        train(tiny_config(student, *item, *extra))
        lines = (student / "checkpoints" / "metrics.jsonl").read_text().splitlines()
        return next(
            r["train/lm_loss"] for r in map(json.loads, lines) if r.get("step") == 1 and r["kind"] == "train"
        )

    assert first_loss("taught", f"train.teacher_targets={out}") > first_loss("plain") + 1e-4
    short = TeacherTargets(targets.offsets[:-1], targets.rows, targets.log_probs, targets.meta)
    short.save(tmp_path / "short.pt")
    with pytest.raises(DataError, match="teacher targets for .* train samples, the train split has"):
        Trainer(tiny_config(run_dir, *item, f"train.teacher_targets={tmp_path / 'short.pt'}"))
    with pytest.raises(ConfigError, match="train.teacher_targets needs an item-level model"):
        Trainer(tiny_config(run_dir, f"train.teacher_targets={out}"))
