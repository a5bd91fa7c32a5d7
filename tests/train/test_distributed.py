"""Two ranks over gloo on CPU: under ZeRO-2 and ZeRO-3 the loss falls and the ranks hold the same
weights; the checkpoint consolidates to an fp32 state dict that reproduces the engine's logits; a
run stopped at step k and resumed matches an uninterrupted run step for step (with fixed-size and
with length-grouped micro batches, and for the item-level model); a corrupt checkpoint stops the
resume with an error; user-level DP training (train.privacy) on 2 ranks is the one-rank run."""

from __future__ import annotations

import json
import os
import pickle
import socket
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from moe_rec.data.sequences import user_bucket
from moe_rec.eval.config import EvalConfig
from moe_rec.eval.evaluate import evaluate_model
from moe_rec.model import MoERecForCausalLM, MoERecForItemPrediction
from moe_rec.sid.table import SIDTable
from moe_rec.train import train
from moe_rec.train.checkpoint import consolidate, load_model
from moe_rec.train.data import load_split
from moe_rec.train.trainer import model_config
from tests.train.conftest import VOCAB, tiny_config, write_sequences

pytestmark = pytest.mark.slow
WORLD = 2
# user-level DP (train.privacy) with a fixed seed: the same users and noise on any world size
PRIVATE = ("model.kind=item", "train.grad_accum=1", "train.clip=0", "train.privacy.enabled=true",
           "train.privacy.noise_multiplier=0.5", "train.privacy.expected_users=16", "train.privacy.seed=7",
           "train.max_steps=6", "train.eval_every=6")  # fmt: skip


def _worker(rank: int, port: int, out: Path, scenario: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), DS_ACCELERATOR="cpu", WANDB_MODE="disabled", OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    results = {}
    try:
        if scenario == "zero":
            for stage in (2, 3):
                ds = f"train.deepspeed=configs/deepspeed/zero{stage}.json"
                cfg = tiny_config(out / f"zero{stage}", ds, "train.save_every=2", "train.eval_every=4")
                results[stage] = train(cfg)
        elif scenario == "item":  # the item-level model, ZeRO-3, length-grouped steps of one service each,
            # stopped and resumed
            # with the item softmax and per-item vectors, every parameter partitioned (even the tiny
            # item table), so validation must gather the per-item vectors from their shards
            zero3 = json.loads(Path("configs/deepspeed/zero3.json").read_text())
            zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
            (out / f"zero3-{rank}.json").write_text(json.dumps(zero3))
            args = ("model.kind=item", f"train.deepspeed={out / f'zero3-{rank}.json'}", "train.micro_batch_tokens=12",
                    "train.batch_by_service=true", "train.eval_every=4", "train.max_eval_samples=0", "model.overrides.item_loss=items",
                    "model.overrides.item_embedding=true", "model.overrides.item_negatives=4")  # fmt: skip
            results["full"] = train(tiny_config(out / "full", *args))
            results["first"] = train(tiny_config(out / "split", *args, "train.stop_at=3"))
            results["rest"] = train(tiny_config(out / "split", *args))
        elif scenario == "private":  # user-level DP, ZeRO-1 and ZeRO-2
            for stage in (1, 2):
                ds = f"train.deepspeed=configs/deepspeed/zero{stage}.json"
                results[stage] = train(tiny_config(out / f"private{stage}", *PRIVATE, ds))
        else:  # resume{stage}-{micro_batch_tokens}
            stage, tokens = scenario.removeprefix("resume").split("-")
            ds = f"train.deepspeed=configs/deepspeed/zero{stage}.json"
            batches = f"train.micro_batch_tokens={tokens}"
            results["full"] = train(tiny_config(out / "full", ds, batches))
            results["first"] = train(tiny_config(out / "split", ds, batches, "train.stop_at=3"))
            results["rest"] = train(tiny_config(out / "split", ds, batches))
            if rank == 0:  # damage the newest checkpoint: the next resume must refuse it
                (out / "split/checkpoints/step_00000008/rng_rank1.pt").unlink()
            torch.distributed.barrier()
            try:
                train(tiny_config(out / "split", ds, batches))
            except Exception as e:  # noqa: BLE001 - the error itself is the result
                results["corrupt"] = f"{type(e).__name__}: {e}"
    except Exception:
        results["error"] = traceback.format_exc()
    (out / f"rank{rank}.pkl").write_bytes(pickle.dumps(results))
    # The results are on disk. Leave without interpreter teardown: a communication thread that
    # gloo or DeepSpeed's shared-memory op leaves behind can abort the process on its way out
    # ("terminate called without an active exception"), which would fail a run that passed.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(tmp_path: Path, scenario: str) -> list[dict]:
    for name in ("zero2", "zero3", "full", "split", "private1", "private2"):
        write_sequences(tmp_path / name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, tmp_path, scenario), nprocs=WORLD, join=True)
    results = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]
    for r in results:
        assert "error" not in r, r["error"]
    return results


def _assert_loads_and_reproduces(run_dir: Path, summary: dict) -> None:
    state = consolidate(run_dir / "checkpoints")
    assert all(v.dtype == torch.float32 for v in state.values())
    cfg = tiny_config(run_dir)
    model = MoERecForCausalLM(model_config(cfg.model, VOCAB)).eval()
    model.load_state_dict(state, strict=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    with torch.no_grad():
        out = model(**summary["probe"]["batch"])
    # fp32 both; the engine ran the same weights inside DeepSpeed (another summation order allowed)
    torch.testing.assert_close(out.logits[:2], summary["probe"]["logits"], rtol=1e-5, atol=1e-5)
    _assert_validation_matches(model, run_dir, summary["valid"])


def _assert_validation_matches(model: MoERecForCausalLM, run_dir: Path, metrics: dict[str, float]) -> None:
    """Teacher-forced accuracy recomputed one unpadded row at a time on one process, and Recall /
    NDCG of the test-time evaluator on one process, must equal the trainer's batched, rank-sharded
    and reduced numbers, overall and per service."""
    rows = load_split(run_dir / "sequences", "valid").select(range(8))
    counts = {"": [0, 0, 0, 0], **{f"{s}/": [0, 0, 0, 0] for s in VOCAB.services}}  # rows, exact, hits, codes
    for r in rows:
        target = VOCAB.item_tokens(r["service"], r["target"])[1:]
        ids = torch.tensor([r["input_ids"] + target])
        doms = torch.tensor([r["domain_ids"] + [VOCAB.service_index(r["service"])] * len(target)])
        users = torch.tensor([user_bucket(r["user"], model.config.num_user_buckets)])
        with torch.no_grad():
            logits = model(input_ids=ids, domain_ids=doms, user_ids=users).logits[0]  # (T, V)
        pred = logits[len(r["input_ids"]) - 1 : -1].argmax(-1).tolist()  # predictions of the L+1 codes
        n = sum(p == t for p, t in zip(pred, target))
        for key in ("", f"{r['service']}/"):
            c = counts[key]
            c[0], c[1], c[2], c[3] = c[0] + 1, c[1] + (n == len(target)), c[2] + n, c[3] + len(target)
    expected = {}
    for key, (n_rows, exact, hits, codes) in counts.items():
        expected[f"valid/{key}exact_match"] = exact / n_rows
        expected[f"valid/{key}token_acc"] = hits / codes
    ranking = evaluate_model(model, SIDTable.load(run_dir / "sids"), load_split(run_dir / "sequences", "valid"),
                             EvalConfig(split="valid", max_samples=8, batch_size=3))  # fmt: skip
    expected.update({k: v for k, v in ranking.items() if not k.endswith("/count") and "/macro/" not in k})
    assert "valid/ndcg@10" in expected and "valid/grocery/recall@5" in expected
    assert metrics == pytest.approx(expected)


def _assert_plan(plan: str, run_dir: Path, start: int, stop: int, when: str) -> None:
    """The start-up line names the steps to run and the validation requests of each service."""
    services = [r["service"] for r in load_split(run_dir / "sequences", "valid").select(range(8))]
    counted = ", ".join(f"{s} {services.count(s)}" for s in VOCAB.services if s in services)
    assert f"steps {start} -> {stop} of 8 " in plan, plan
    assert plan.endswith(f"validation {when} on 8 requests ({counted})"), plan


def test_zero2_and_zero3_train_agree_and_consolidate(tmp_path: Path) -> None:
    ranks = _spawn(tmp_path, "zero")
    for stage in (2, 3):
        losses = ranks[0][stage]["losses"]
        assert len(losses) == 8
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses  # one rank of this config drops ~0.75
        assert ranks[0][stage]["losses"] == ranks[1][stage]["losses"]  # the reduced loss
        # unreduced loss and logits on the same batch: equal only if both ranks hold the same weights
        torch.testing.assert_close(ranks[0][stage]["probe"]["logits"], ranks[1][stage]["probe"]["logits"])
        _assert_loads_and_reproduces(tmp_path / f"zero{stage}", ranks[0][stage])
        _assert_plan(ranks[0][stage]["plan"], tmp_path / f"zero{stage}", 0, 8, "every 4 steps and at step 8")
    # the same seed, data and fp32 math: ZeRO-3's partitioned parameters train like ZeRO-2's; its
    # gradients are reduce-scattered instead of all-reduced (another summation order), and those
    # differences compound over 8 steps at lr 0.01, hence 1e-4 rather than fp32 rounding
    z2, z3 = torch.tensor(ranks[0][2]["losses"]), torch.tensor(ranks[0][3]["losses"])
    torch.testing.assert_close(z2, z3, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "zero3/checkpoints/metrics.jsonl").read_text().count("train/loss") == 4
    for stage in (2, 3):  # saved every 2 steps, keep_last=2, plus the best one
        d = tmp_path / f"zero{stage}/checkpoints"
        best, latest = (d / "best").read_text(), (d / "latest").read_text()
        assert latest == "step_00000008"
        tags = sorted(p.name for p in d.iterdir() if p.is_dir())
        assert tags == sorted({best, "step_00000006", "step_00000008"})


@pytest.mark.parametrize("stage, tokens", [(2, 0), (3, 60)])
def test_resume_matches_an_uninterrupted_run(tmp_path: Path, stage: int, tokens: int) -> None:
    """ZeRO-3 with length-grouped micro batches: the ranks' batches differ in shape every step."""
    ranks = _spawn(tmp_path, f"resume{stage}-{tokens}")
    for r in ranks:
        assert r["first"]["step"] == 3 and r["rest"]["step"] == 8
        resumed = r["first"]["losses"] + r["rest"]["losses"]
        assert len(resumed) == 8  # a resumed run repeats the same arithmetic: only float noise may differ
        torch.testing.assert_close(
            torch.tensor(resumed), torch.tensor(r["full"]["losses"]), rtol=1e-6, atol=1e-6
        )
        torch.testing.assert_close(r["rest"]["probe"]["logits"], r["full"]["probe"]["logits"])
        _assert_plan(r["first"]["plan"], tmp_path / "split", 0, 3, "at step 8")
        _assert_plan(r["rest"]["plan"], tmp_path / "split", 3, 8, "at step 8")
        assert "CheckpointError" in r["corrupt"] and "rng_rank1.pt is missing" in r["corrupt"], r["corrupt"]


def test_item_level_model_trains_resumes_and_validates_on_every_request(tmp_path: Path) -> None:
    """Two ranks, ZeRO-3: the loss falls, a resumed run matches an uninterrupted one step for step,
    the checkpoint loads as the item-level model and reproduces the engine's logits, and the
    rank-sharded validation equals one process's exact ranking of all 48 valid requests."""
    ranks = _spawn(tmp_path, "item")
    for r in ranks:
        losses = r["full"]["losses"]
        assert len(losses) == 8 and sum(losses[-3:]) < sum(losses[:3]), losses
        resumed = r["first"]["losses"] + r["rest"]["losses"]  # the same arithmetic, as above
        torch.testing.assert_close(torch.tensor(resumed), torch.tensor(losses), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r["rest"]["probe"]["logits"], r["full"]["probe"]["logits"])
    assert ranks[0]["full"]["valid"] == ranks[1]["full"]["valid"]
    model = load_model(tmp_path / "full" / "checkpoints", "latest").eval()
    assert isinstance(model, MoERecForItemPrediction)
    summary = ranks[0]["full"]
    with torch.no_grad():  # no labels: the loss needs the training catalogue, the logits do not
        out = model(**{k: v for k, v in summary["probe"]["batch"].items() if k != "labels"})
    torch.testing.assert_close(out.logits[:2], summary["probe"]["logits"], rtol=1e-5, atol=1e-5)
    valid = load_split(tmp_path / "full" / "sequences", "valid")
    assert len(valid) == 48
    ranking = evaluate_model(model, SIDTable.load(tmp_path / "full" / "sids"), valid,
                             EvalConfig(split="valid", batch_size=7))  # fmt: skip
    expected = {k: v for k, v in ranking.items() if not k.endswith("/count") and "/macro/" not in k}
    assert summary["valid"] == pytest.approx(expected)
    assert expected["valid/ndcg@10"] > 0


def test_private_training_on_two_ranks_is_the_one_rank_run(tmp_path: Path) -> None:
    """Under train.privacy each rank clips its share of the sampled users and rank 0 alone adds the
    noise; the engine's average over ranks is undone by the world size. So with a fixed seed 2
    ranks (ZeRO-1 and ZeRO-2) train as one process does: same losses, same weights, same privacy
    record, and both ranks hold the same weights."""
    ranks = _spawn(tmp_path, "private")
    write_sequences(tmp_path / "single")
    single = train(tiny_config(tmp_path / "single", *PRIVATE))
    assert single["privacy"]["steps"] == 6 and single["privacy"]["history"] == [[0.5, 16 / 48, 6]]
    for stage in (1, 2):
        for r in ranks:
            torch.testing.assert_close(
                torch.tensor(r[stage]["losses"]), torch.tensor(single["losses"]), rtol=1e-4, atol=1e-4
            )
            assert r[stage]["privacy"] == single["privacy"]
        torch.testing.assert_close(ranks[0][stage]["probe"]["logits"], ranks[1][stage]["probe"]["logits"])
        torch.testing.assert_close(
            ranks[0][stage]["probe"]["logits"], single["probe"]["logits"], rtol=1e-4, atol=1e-4
        )
        # the gradient the engine stepped with, whose scale Adam's updates hardly show
        norms = [_grad_norms(tmp_path / name) for name in (f"private{stage}", "single")]
        torch.testing.assert_close(norms[0], norms[1], rtol=1e-4, atol=0)


def _grad_norms(run_dir: Path) -> torch.Tensor:
    """The engine's gradient norm on every train row of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "checkpoints/metrics.jsonl").read_text().splitlines()]
    return torch.tensor([r["train/grad_norm"] for r in rows if r["kind"] == "train"])
