"""User-level DP training (``train.privacy``, :mod:`moe_rec.train.privacy`).

The accountant against references computed here (the closed-form RDP of the Poisson-subsampled
Gaussian at integer orders, the exact (epsilon, delta) curve of the Gaussian mechanism) and against
Opacus's own computation; the clip against its bound on tiny models in float64: removing any one
user (with every window) moves the step's summed gradient by at most ``max_grad_norm``, exactly
that much when the user's gradient was clipped; users, not windows, are Poisson-sampled; the
privatized gradient goes through the DeepSpeed engine as computed; a run reports epsilon, resumes
its accountant, records it in the checkpoint and the bundle, and refuses what it cannot run."""

from __future__ import annotations

import copy
import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_rec.config import ConfigError
from moe_rec.model import model_class
from moe_rec.train.config import PrivacyConfig
from moe_rec.train.data import Collator, ItemCollator, load_split
from moe_rec.train.privacy import (
    Accountant,
    UserSampledData,
    add_noise,
    calibrate,
    clipped_user_sum,
    noise_generator,
    trainable,
    user_rows,
)
from moe_rec.train.trainer import model_config
from tests.train.conftest import VOCAB, sid_table, tiny_config, write_catalogue

PRIVATE = ("train.grad_accum=1", "train.clip=0", "train.privacy.enabled=true")


def _subsampled_gaussian_rdp(q: float, sigma: float, alpha: int) -> float:
    """RDP at integer order ``alpha`` of one Poisson-subsampled Gaussian step (Mironov, Talwar and
    Zhang 2019, Sec. 3.3): ``log(sum_k C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2)))
    / (alpha - 1)``, summed in log space."""
    terms = [
        math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
        + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
        for k in range(alpha + 1)
    ]  # fmt: skip
    top = max(terms)
    return (top + math.log(sum(math.exp(t - top) for t in terms))) / (alpha - 1)


def _epsilon_from_rdp(orders: np.ndarray, rdp: np.ndarray, delta: float) -> float:
    """(epsilon, delta) from RDP curves (Balle et al. 2020, Theorem 21), the conversion Opacus uses."""
    return float(
        np.min(rdp - (np.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders))
    )


@pytest.mark.parametrize(
    ("sigma", "q", "steps"), [(1.1, 256 / 60000, 14062), (0.8, 0.05, 300), (2.0, 0.01, 1000)]
)
def test_rdp_accountant_matches_the_closed_form_and_opacus(sigma: float, q: float, steps: int) -> None:
    """Our accountant, stepped one step at a time and resumed from its saved history half way, gives
    Opacus's epsilon for the same (sigma, q, steps); Opacus's RDP at integer orders is the closed
    form, and epsilon over those orders alone is no smaller (ours minimises over more orders)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    delta = 1e-5
    first = Accountant("rdp", delta)
    for _ in range(steps // 2):
        first.step(sigma, q)
    ours = Accountant("rdp", delta)
    ours.load_history(json.loads(json.dumps(first.history())))  # through a checkpoint's JSON
    for _ in range(steps - steps // 2):
        ours.step(sigma, q)
    assert ours.steps == steps and ours.history() == [[sigma, q, steps]]
    reference = RDPAccountant()
    reference.history = [(sigma, q, steps)]
    assert ours.epsilon() == pytest.approx(reference.get_epsilon(delta), rel=1e-12)

    orders = np.arange(2, 64)
    closed = np.array([steps * _subsampled_gaussian_rdp(q, sigma, int(a)) for a in orders])
    np.testing.assert_allclose(
        compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders), closed, rtol=1e-9
    )
    on_integers = _epsilon_from_rdp(orders.astype(float), closed, delta)
    assert ours.epsilon() <= on_integers + 1e-9 and ours.epsilon() > 0.9 * on_integers


def test_without_subsampling_the_accountants_bound_the_exact_gaussian_curve() -> None:
    """q = 1, T steps of sigma: one Gaussian mechanism with mu = sqrt(T) / sigma, whose exact
    delta(epsilon) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Balle and Wang 2018). PRV is
    a tight upper bound of it, RDP a looser one equal to its own closed form T alpha / (2 sigma^2)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    sigma, steps, delta = 2.0, 50, 1e-5
    mu = math.sqrt(steps) / sigma
    exact = brentq(
        lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta, 0, 100
    )
    accountants = {}
    for mechanism in ("rdp", "prv"):
        accountants[mechanism] = Accountant(mechanism, delta)
        accountants[mechanism].load_history([[sigma, 1.0, steps]])
    with warnings.catch_warnings():  # PRV's log(1 - q) at q = 1
        warnings.simplefilter("ignore", RuntimeWarning)
        prv = accountants["prv"].epsilon()
    assert exact <= prv <= exact + 0.05
    orders = np.array(Accountant("rdp", delta).accountant.DEFAULT_ALPHAS, dtype=float)
    rdp_closed = _epsilon_from_rdp(orders, steps * orders / (2 * sigma**2), delta)
    assert accountants["rdp"].epsilon() == pytest.approx(rdp_closed, rel=1e-12) and rdp_closed > prv


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_calibrated_noise_spends_the_target_epsilon_by_the_last_step(mechanism: str) -> None:
    q, steps, delta, target = 0.05, 200, 1e-4, 4.0
    sigma = calibrate(target, delta, q, steps, mechanism)
    spent = Accountant(mechanism, delta)
    spent.load_history([[sigma, q, steps]])
    assert target - 0.02 <= spent.epsilon() <= target
    spent.load_history([[sigma * 0.95, q, steps]])  # less noise spends more
    assert spent.epsilon() > target


# -- the clip ------------------------------------------------------------------------------------


def _users(
    run_dir: Path, kind: str, max_windows: int = 4, backend: str = "loop", dtype: torch.dtype = torch.float64
) -> tuple[torch.nn.Module, list[dict]]:
    """A tiny model of ``kind`` (float64: the loop experts; grouped_mm takes float32 at least) and
    one batch per user of the train split (2 windows each). ``item_softmax``: the item model with
    the demo's loss (a softmax over the service's items, here all of them) and per-item vectors."""
    softmax = ("model.overrides.item_loss=items", "model.overrides.item_embedding=true")
    cfg = tiny_config(
        run_dir, f"model.kind={kind.removesuffix('_softmax')}", f"model.moe_backend={backend}",
        *(softmax if kind == "item_softmax" else ()),
    )  # fmt: skip
    table = sid_table()
    mc = model_config(cfg.model, VOCAB, num_items=len(table))
    torch.manual_seed(0)
    model = model_class(mc)(mc).to(dtype).train()
    if kind == "item_softmax":
        model.set_train_catalogue(table.codes, table.service_index + VOCAB.service_offset)
        with torch.no_grad():  # the per-item vectors start at zero; give them a gradient-carrying value
            model.item_embed.weight.normal_(0, 0.1)
    train = load_split(run_dir / "sequences", "train")
    item_level = kind.startswith("item")
    collator = ItemCollator(VOCAB, mc.num_user_buckets) if item_level else Collator(mc.num_user_buckets)
    data = UserSampledData(
        train,
        expected_users=8,
        max_windows_per_user=max_windows,
        rank=0,
        world_size=1,
        seed=0,
        collator=collator,
    )
    return model, [collator(train.select(rows)) for rows in data.rows]


@pytest.mark.parametrize(
    ("kind", "backend", "dtype", "tol"),
    [("item", "loop", torch.float64, 1e-12), ("token", "loop", torch.float64, 1e-12),
     ("item_softmax", "loop", torch.float64, 1e-12), ("item", "grouped_mm", torch.float32, 1e-5)],
)  # fmt: skip
def test_clipping_bounds_each_users_contribution(
    run_dir: Path, kind: str, backend: str, dtype: torch.dtype, tol: float
) -> None:
    """No noise. With C below most users' gradient norms, removing one user changes the summed
    clipped gradient by exactly C (theirs was clipped) and never by more; with C above every norm
    nothing is clipped and the sum is the gradient of the summed per-user losses, so a user's
    contribution is that user's own gradient alone (nothing crosses between users). Float64 on
    the reference experts (item model with the code loss, with the demo's item softmax and
    per-item vectors, token model); float32 on grouped_mm, the default backend."""
    model, batches = _users(run_dir, kind, backend=backend, dtype=dtype)
    batches = batches[:10]
    params = trainable(model)
    raw = [clipped_user_sum(model, [b], params, math.inf).grads for b in batches]  # unclipped, per user
    norms = [torch.linalg.vector_norm(torch.cat([g.flatten() for g in gs])).item() for gs in raw]
    clip = float(np.median(norms))

    def flat(grads: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([g.flatten() for g in grads])

    everyone = clipped_user_sum(model, batches, params, clip)
    assert everyone.norms == pytest.approx(norms, rel=tol)
    assert all(g.dtype == dtype for g in everyone.grads)
    assert sum(n > clip for n in norms) >= 4
    for u in range(len(batches)):
        without = clipped_user_sum(model, batches[:u] + batches[u + 1 :], params, clip)
        moved = torch.linalg.vector_norm(flat(everyone.grads) - flat(without.grads)).item()
        assert moved <= clip * (1 + tol)
        if norms[u] > clip:  # clipped: the user's influence is exactly C
            assert moved == pytest.approx(clip * norms[u] / (norms[u] + 1e-6), rel=100 * tol)
        else:
            assert moved == pytest.approx(norms[u], rel=100 * tol)

    unclipped = clipped_user_sum(model, batches, params, 2 * max(norms))
    model.zero_grad()
    sum(model(**b).loss for b in batches).backward()
    expected = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    torch.testing.assert_close(flat(unclipped.grads), flat(expected), rtol=100 * tol, atol=100 * tol)


def test_a_user_is_their_newest_windows_up_to_the_bound(run_dir: Path) -> None:
    """One example per user, the user's first rows in the table (newest first); every window of
    a user in one batch, whatever the table's order of users; at most ``max_windows_per_user``."""
    assert user_rows(["b", "b", "a", "b", "a", "c"], 2) == [[2, 4], [0, 1], [5]]  # a, b, c
    model, batches = _users(run_dir, "token", max_windows=1)
    train = load_split(run_dir / "sequences", "train")
    assert len(batches) == len(set(train["user"])) == 48
    assert all(b["input_ids"].shape[0] == 1 for b in batches)
    _, both = _users(run_dir, "token", max_windows=4)
    assert all(b["input_ids"].shape[0] == 2 for b in both)
    assert all(len(set(b["user_ids"].tolist())) == 1 for b in both)


def test_users_are_poisson_sampled_per_step_and_dealt_to_ranks(run_dir: Path) -> None:
    train = load_split(run_dir / "sequences", "train")
    collator = Collator(64)

    def data(rank: int, world: int, seed: int = 5) -> UserSampledData:
        return UserSampledData(
            train,
            expected_users=12,
            max_windows_per_user=4,
            rank=rank,
            world_size=world,
            seed=seed,
            collator=collator,
        )

    one = data(0, 1)
    assert (one.users, one.sample_rate, one.expected_users, one.steps_per_epoch) == (48, 0.25, 12.0, 4)
    sizes = [len(one.sample(s)) for s in range(400)]
    assert abs(np.mean(sizes) - 12) < 0.5 and np.std(sizes) > 1  # binomial(48, 1/4): mean 12, sd 3
    assert len(set(sizes)) > 5  # a Poisson sample: its size varies
    assert (one.sample(7) == data(0, 1).sample(7)).all() and not np.array_equal(one.sample(7), one.sample(8))
    assert not np.array_equal(one.sample(7), data(0, 1, seed=6).sample(7))
    whole = one.user_step(7)
    shares = [data(r, 2).user_step(7) for r in range(2)]  # user i of the sample to rank i % 2
    assert shares[0].sampled == shares[1].sampled == whole.sampled == len(whole.batches) == len(one.sample(7))
    for r, share in enumerate(shares):
        assert len(share.batches) == len(whole.batches[r::2])
        for mine, theirs in zip(share.batches, whole.batches[r::2]):
            assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_noise_is_gaussian_with_the_asked_std_and_its_own_stream() -> None:
    grads = [torch.zeros(200, 100), torch.zeros(3000)]
    add_noise(grads, 0.7, noise_generator(1, 0))
    draws = torch.cat([g.flatten() for g in grads])
    assert abs(draws.mean().item()) < 0.02 and draws.std().item() == pytest.approx(0.7, rel=0.02)
    again = [torch.zeros(200, 100), torch.zeros(3000)]
    add_noise(again, 0.7, noise_generator(1, 0))
    assert torch.equal(again[0], grads[0])
    other = [torch.zeros(200, 100)]
    add_noise(other, 0.7, noise_generator(1, 1))
    assert not torch.equal(other[0], grads[0])


# -- through the trainer ---------------------------------------------------------------------------


def test_a_private_step_hands_the_engine_the_privatized_gradient(run_dir: Path) -> None:
    """One step through DeepSpeed (ZeRO-2, one rank) moves the weights as a plain AdamW step with
    the gradient ``(sum_u clip(g_u) + N(0, (sigma C)^2)) / (q users)`` computed here does, and the
    engine's gradient norm is that gradient's."""
    from moe_rec.train.trainer import Trainer, _optimizer, lr_lambda

    cfg = tiny_config(
        run_dir, "model.kind=item", *PRIVATE, "train.privacy.noise_multiplier=0.5", "train.privacy.max_grad_norm=0.3",
        "train.privacy.expected_users=12", "train.privacy.seed=11",
    )  # fmt: skip
    trainer = Trainer(cfg)
    try:
        reference = copy.deepcopy(trainer.engine.module)
        stream = trainer.data(trainer.position)
        trainer.train_step(stream)
        params = trainable(reference)
        users = trainer.data.user_step(0)
        assert users.sampled == len(users.batches) > 0
        summed = clipped_user_sum(reference, users.batches, params, 0.3)
        add_noise(summed.grads, 0.5 * 0.3, noise_generator(11, 0))
        optimizer = _optimizer(reference, trainer.tc)
        for p, g in zip(params, summed.grads):
            p.grad = g / (0.25 * 48)
        optimizer.param_groups[0]["lr"] = optimizer.param_groups[1]["lr"] = trainer.tc.lr * lr_lambda(
            trainer.tc, 8
        )(0)
        optimizer.step()
        for (name, mine), theirs in zip(reference.named_parameters(), trainer.engine.module.parameters()):
            torch.testing.assert_close(theirs, mine, rtol=1e-5, atol=1e-6, msg=name)
        # Adam's first step hardly depends on the gradient's scale, the gradient norm the engine saw does
        norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params])).item()
        assert float(trainer.engine.get_global_grad_norm()) == pytest.approx(norm, rel=1e-5)
        assert trainer.privacy.accountant.steps == 1
    finally:
        trainer.engine.destroy()


def test_a_private_run_reports_epsilon_resumes_and_records_it(run_dir: Path, tmp_path: Path) -> None:
    """Eight steps stopped at 3 and resumed: the same losses as without the stop (fixed seed), the
    accountant continues (8 steps, Opacus's epsilon for them), epsilon rises on every train row and
    is on the validation row; the record is in each checkpoint's state and the bundle's manifest
    (a non-private bundle has none); a resume with privacy switched off is refused."""
    from opacus.accountants import RDPAccountant

    from moe_rec.export import export_checkpoint
    from moe_rec.train import train
    from moe_rec.train.checkpoint import CheckpointError

    args = ("model.kind=item", *PRIVATE, "train.privacy.noise_multiplier=0.8", "train.privacy.expected_users=12",
            "train.privacy.seed=3", "train.save_every=3", "train.keep_last=5")  # fmt: skip
    for name in ("full", "split"):
        shutil.copytree(run_dir, tmp_path / name)
    full = train(tiny_config(tmp_path / "full", *args))
    first = train(tiny_config(tmp_path / "split", *args, "train.stop_at=3"))
    rest = train(tiny_config(tmp_path / "split", *args))
    assert first["step"] == 3 and rest["step"] == 8
    torch.testing.assert_close(torch.tensor(first["losses"] + rest["losses"]), torch.tensor(full["losses"]))
    reference = RDPAccountant()
    reference.history = [(0.8, 0.25, 8)]
    record = rest["privacy"]
    assert record["steps"] == 8 and record["history"] == [[0.8, 0.25, 8]]
    assert record["epsilon"] == pytest.approx(reference.get_epsilon(record["delta"]))
    assert (record["unit"], record["delta"], record["users"]) == ("user", pytest.approx(0.1 / 48), 48)
    assert record == full["privacy"]

    rows = [
        json.loads(line) for line in (tmp_path / "split/checkpoints/metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [2, 3, 4, 6, 8]  # log_every 2, and the stop
    eps = [r["privacy/epsilon"] for r in rows if r["kind"] == "train"]
    assert (
        len(eps) == 5
        and all(a < b for a, b in zip(eps, eps[1:]))
        and eps[-1] == pytest.approx(record["epsilon"])
    )
    assert [r["privacy/epsilon"] for r in rows if r["kind"] == "valid"] == [pytest.approx(record["epsilon"])]
    assert all(0 <= r["privacy/clipped_share"] <= 1 for r in rows if r["kind"] == "train")
    states = {
        s: json.loads((tmp_path / f"split/checkpoints/step_{s:08d}/trainer_state.json").read_text())[
            "privacy"
        ]
        for s in (3, 6, 8)
    }
    assert [states[s]["steps"] for s in (3, 6, 8)] == [3, 6, 8] and states[8] == record
    assert states[3]["epsilon"] < states[6]["epsilon"] < record["epsilon"]

    write_catalogue(tmp_path / "split")
    bundle = export_checkpoint(tmp_path / "split/checkpoints", tmp_path / "bundle", tag="latest")
    assert json.loads((bundle / "manifest.json").read_text())["privacy"] == record
    with pytest.raises(CheckpointError, match="trained with train.privacy and this run has it off"):
        train(tiny_config(tmp_path / "split", "model.kind=item", "train.max_steps=10"))


def test_a_plain_run_and_bundle_carry_no_privacy_record(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Privacy off: Opacus is never imported, and no row, checkpoint or manifest has a privacy
    key; a plain checkpoint is not resumed with privacy on."""
    import sys

    from moe_rec.export import export_checkpoint
    from moe_rec.train import train
    from moe_rec.train.checkpoint import CheckpointError

    with monkeypatch.context() as m:
        m.setitem(sys.modules, "opacus", None)  # `import opacus` now raises ImportError
        summary = train(tiny_config(run_dir, "model.kind=item", "train.max_steps=2"))
    assert "privacy" not in summary
    assert "privacy" not in json.loads((run_dir / "checkpoints/step_00000002/trainer_state.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "checkpoints/metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith("privacy/") for r in rows for k in r)
    write_catalogue(run_dir)
    bundle = export_checkpoint(run_dir / "checkpoints", tmp_path / "bundle", tag="latest")
    assert "privacy" not in json.loads((bundle / "manifest.json").read_text())
    with pytest.raises(CheckpointError, match="trained without train.privacy and this run has it on"):
        train(
            tiny_config(
                run_dir, "model.kind=item", *PRIVATE, "train.privacy.noise_multiplier=1", "train.max_steps=4"
            )
        )


# -- what is refused -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(("train.privacy.enabled=true", "train.privacy.noise_multiplier=1"), r"train.grad_accum=2 .*set train.grad_accum=1"),
     (("train.grad_accum=1", "train.privacy.enabled=true", "train.privacy.noise_multiplier=1"),
      r"train.clip=1.0 with train.privacy.enabled: set train.clip=0"),
     ((*PRIVATE, "train.privacy.noise_multiplier=1", "train.micro_batch_tokens=64"), r"train.micro_batch_tokens=64 .*set train.micro_batch_tokens=0"),
     ((*PRIVATE, "train.privacy.noise_multiplier=1", "train.batch_by_service=true"), r"train.batch_by_service=True .*set train.batch_by_service=False"),
     (PRIVATE, r"set exactly one of noise_multiplier \(sigma\) and target_epsilon"),
     ((*PRIVATE, "train.privacy.noise_multiplier=1", "train.privacy.target_epsilon=3"), "set exactly one of"),
     ((*PRIVATE, "train.privacy.noise_multiplier=1", "train.privacy.delta=1"), r"delta must be in \[0, 1\)"),
     ((*PRIVATE, "train.privacy.noise_multiplier=1", "train.privacy.max_grad_norm=0"), "max_grad_norm must be > 0"),
     ((*PRIVATE, "train.privacy.noise_multiplier=1", "train.privacy.accountant=gdp"), r"accountant: must be one of \['rdp', 'prv'\]")],
)  # fmt: skip
def test_settings_a_private_step_cannot_honour_are_refused_at_load(
    tmp_path: Path, overrides: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, *overrides)


def test_zero3_is_refused_naming_the_setting(run_dir: Path) -> None:
    from moe_rec.train.trainer import Trainer

    cfg = tiny_config(
        run_dir, *PRIVATE, "train.privacy.noise_multiplier=1", "train.deepspeed=configs/deepspeed/zero3.json"
    )
    with pytest.raises(
        ConfigError, match=r"train.deepspeed=configs/deepspeed/zero3.json: ZeRO stage 3 with train.privacy"
    ):
        Trainer(cfg)


def test_privacy_is_off_by_default_and_shipped_configs_compose(tmp_path: Path) -> None:
    assert PrivacyConfig() == tiny_config(tmp_path).train.privacy and not PrivacyConfig().enabled
    from moe_rec.config import load_config
    from moe_rec.experiment import ExperimentConfig
    from tests.train.conftest import ROOT

    cfg = load_config(ExperimentConfig, ROOT / "configs/experiments/demo_private.yaml")
    p = cfg.train.privacy
    assert p.enabled and p.target_epsilon == 8 and p.expected_users == 64 and cfg.model.kind == "item"
    assert (cfg.train.clip, cfg.train.grad_accum, cfg.train.micro_batch_tokens) == (0, 1, 0)
    assert (cfg.train.eval_every, cfg.train.patience) == (
        0,
        0,
    )  # best = the last step, not picked by validation
