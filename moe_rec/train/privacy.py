"""User-level differentially private training (``train.privacy``): which users a step sees, their
clipped gradients plus calibrated Gaussian noise, and the accountant that turns the steps taken
into an (epsilon, delta) guarantee. docs/privacy.md says the same for users of the option.

The protected unit is the user. A user has several training windows (``sequences build`` writes a
window every ``train_stride`` events, so a long history gives several, and each event can sit in
several windows), so a guarantee per window or per event would say little about a person. Each
step therefore:

1. **samples users, not windows**: every user of the train split joins the step independently
   with probability ``q = expected_users / users`` (Poisson sampling), drawn from a generator
   seeded by (privacy seed, step);
2. **forms one example per sampled user**: the user's newest ``max_windows_per_user`` windows
   (``sequences build`` writes them newest first) in one batch, whose loss is the model's own
   (the mean next-item loss over the batch's positions plus the routers' auxiliary losses,
   computed on this user's tokens alone);
3. **clips that user's whole gradient** (every parameter at once) to L2 norm ``C =
   max_grad_norm``: ``g_u * min(1, C / (||g_u|| + 1e-6))``;
4. **adds noise once**: ``sum_u clip(g_u) + N(0, (sigma C)^2 I)``, divided by the *expected*
   number of users ``q * users`` (never the number drawn, which depends on who is in the data).

Adding or removing one user, with all of their windows and events, changes the sum in step 3 by
at most ``C`` in L2 norm, whatever their number of windows or events, and that user enters each
step with probability ``q`` independently: the Poisson-subsampled Gaussian mechanism, whose
composition over the steps taken Opacus's accountants (RDP or PRV) bound. So the reported epsilon
is user-level. ``max_windows_per_user`` only bounds the cost of a step.

Per-user gradients come from a loop: one forward and ``torch.autograd.grad`` per sampled user on
the plain module. It is exact for every module we have (the MoE layer's data-dependent routing and
``grouped_mm`` experts, the item model's heads), where Opacus's per-sample hooks know none of our
layers and would clip per window, not per user. Opacus does the accounting and the noise
calibration (``opacus.accountants``, imported only when privacy is on).

DeepSpeed keeps the optimizer, ZeRO and checkpoints: each rank computes its share of the users'
clipped sum, rank 0 adds the noise, and the result goes through ``engine.backward`` of a
surrogate loss ``sum_p <p, g_p>`` (whose gradient is ``g``), so the engine's all-reduce (an
average over ranks, undone by scaling by the world size) and ZeRO 0/1/2 partitioning apply as for
any gradient. ZeRO-3 is refused: it partitions the parameters themselves, so a plain module's
per-user ``autograd.grad`` has no full weights to differentiate.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch

from moe_rec.config import ConfigError
from moe_rec.train.config import PrivacyConfig
from moe_rec.train.data import Collator, DataPosition, ItemCollator

SUPPORTED_ZERO_STAGES = (0, 1, 2)
UNIT = "user"
CLIP_EPS = 1e-6  # in the clip factor C / (||g|| + eps), as Opacus writes it: a clipped norm stays below C


def check_engine(ds_config: dict[str, Any], path: Any) -> None:
    """Refuse a DeepSpeed setup the private step cannot run under, naming the setting.

    Raises:
        ConfigError: ZeRO-3 (partitioned parameters), fp16 (a dynamic loss scale would rescale
            the noise), or a gradient clip left on in the DeepSpeed JSON.
    """
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if stage not in SUPPORTED_ZERO_STAGES:
        raise ConfigError(
            f"train.deepspeed={path}: ZeRO stage {stage} with train.privacy: per-user gradients need whole "
            f"parameters on every rank, which ZeRO-3 partitions; use ZeRO {'/'.join(map(str, SUPPORTED_ZERO_STAGES))} "
            f"(configs/deepspeed/zero2.json)"
        )
    if ds_config.get("fp16", {}).get("enabled"):
        raise ConfigError(
            f"train.deepspeed={path}: fp16 with train.privacy: use bf16 or fp32 (train.precision)"
        )
    if ds_config.get("gradient_clipping"):
        raise ConfigError(f"train.deepspeed={path}: gradient_clipping with train.privacy: set train.clip=0")


def private_seed(configured: int | None, device: torch.device | str = "cpu") -> int:
    """The seed of the users drawn and of the noise: ``configured``, or 63 bits of the OS's entropy
    (``os.urandom``), the same on every rank (rank 0's, broadcast from ``device``: NCCL's need a GPU)."""
    import torch.distributed as dist

    if configured is not None:
        return configured
    seed = torch.tensor([int.from_bytes(os.urandom(8), "little") >> 1], dtype=torch.int64, device=device)
    if dist.is_initialized():
        dist.broadcast(seed, src=0)
    return int(seed.item())


def default_delta(users: int) -> float:
    """The delta when ``train.privacy.delta`` is 0: well below 1 / users (a mechanism that publishes
    one random user's data outright is (0, 1/users)-DP, so delta must be smaller than that)."""
    return 0.1 / users


@dataclass
class UserStep:
    """One private step's share of this rank: every rank drew the same ``sampled`` users, and runs
    ``batches``, one per user (that user's windows), of the users dealt to it."""

    sampled: int  # users in the step, all ranks
    batches: list[dict[str, torch.Tensor]]


class UserSampledData:
    """The train split as users, each of their newest ``max_windows_per_user`` windows, and the
    Poisson sample of users of every step (the same on every rank; user ``i`` of a step's sample
    goes to rank ``i % world_size``).

    It streams like :class:`~moe_rec.train.data.ShardedTrainData`: ``steps_per_epoch`` (``1 / q``
    steps see every user once on average) and ``(position after the step, UserStep)`` from a
    :class:`DataPosition` on.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        *,
        expected_users: int,
        max_windows_per_user: int,
        rank: int,
        world_size: int,
        seed: int,
        collator: Collator | ItemCollator,
    ) -> None:
        self.dataset, self.collator = dataset, collator
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.rows = user_rows(dataset.with_format("arrow")["user"].to_pylist(), max_windows_per_user)
        self.users = len(self.rows)
        if self.users == 0:
            raise ValueError("the train split has no users")
        self.sample_rate = min(1.0, expected_users / self.users)
        self.expected_users = self.sample_rate * self.users  # what a step's sum is divided by
        self.steps_per_epoch = max(1, round(1 / self.sample_rate))

    def sample(self, step: int) -> np.ndarray:
        """The users (indices into :attr:`rows`) of global step ``step``: each with probability ``q``."""
        rng = np.random.default_rng([self.seed, step])
        return np.flatnonzero(rng.random(self.users) < self.sample_rate)

    def step_of(self, position: DataPosition) -> int:
        return position.epoch * self.steps_per_epoch + position.step

    def user_step(self, step: int) -> UserStep:
        drawn = self.sample(step)
        mine = drawn[self.rank :: self.world_size]
        return UserStep(len(drawn), [self.collator(self.dataset.select(self.rows[u])) for u in mine])

    def __call__(self, start: DataPosition) -> Iterator[tuple[DataPosition, UserStep]]:
        """Endless ``(position after this step, this rank's users)`` from ``start`` on."""
        epoch, step = start.epoch, start.step
        while True:
            if step >= self.steps_per_epoch:
                epoch, step = epoch + 1, 0
            batch = self.user_step(self.step_of(DataPosition(epoch, step)))
            step += 1
            yield DataPosition(epoch, step), batch


def user_rows(users: Sequence[str], max_windows: int) -> list[list[int]]:
    """Row indices of each user's first ``max_windows`` rows in table order (``sequences build``
    writes a user's windows together, newest first), users in sorted order."""
    rows: dict[str, list[int]] = {}
    for i, user in enumerate(users):
        mine = rows.setdefault(user, [])
        if len(mine) < max_windows:
            mine.append(i)
    return [rows[u] for u in sorted(rows)]


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters a private step differentiates (each once: tied weights are one)."""
    return [p for p in module.parameters() if p.requires_grad]


@dataclass
class ClippedSum:
    """What :func:`clipped_user_sum` returns: the summed clipped gradients (one per parameter, in
    float32 or the parameter's wider dtype) and each user's gradient norm before clipping."""

    grads: list[torch.Tensor]
    norms: list[float]


def clipped_user_sum(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    params: Sequence[torch.nn.Parameter],
    max_grad_norm: float,
    on_output: Callable[[Any, dict[str, torch.Tensor]], None] | None = None,
) -> ClippedSum:
    """``sum_u clip(grad loss_u)`` over users ``u``, one batch each: a forward and an
    ``autograd.grad`` per user, that user's whole gradient clipped to ``max_grad_norm`` (L2 over
    every parameter). ``on_output(out, batch)`` sees each user's model output (the trainer's
    statistics) before the next user runs. Parameters no user's loss reaches get zeros."""
    sums = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in params]
    norms = []
    for batch in batches:
        out = model(**batch)
        grads = torch.autograd.grad(out.loss, params, allow_unused=True)
        present = [g for g in grads if g is not None]
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g, dtype=sums[0].dtype) for g in present])
        )
        factor = (max_grad_norm / (norm + CLIP_EPS)).clamp(max=1.0)
        for total, g in zip(sums, grads):
            if g is not None:
                total.add_(g.to(total.dtype) * factor)
        norms.append(float(norm))
        if on_output is not None:
            on_output(out, batch)
    return ClippedSum(sums, norms)


def noise_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of step ``step``'s noise (its own stream, apart from the users' sampling)."""
    state = np.random.SeedSequence([seed, step, 1]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) >> 1)


def add_noise(grads: Sequence[torch.Tensor], std: float, generator: torch.Generator) -> None:
    """``grads += N(0, std^2)`` elementwise, in place."""
    for g in grads:
        g.add_(torch.normal(0.0, std, g.shape, generator=generator, dtype=g.dtype, device=g.device))


def surrogate_loss(params: Sequence[torch.nn.Parameter], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_p <p, g_p>``: its gradient with respect to every ``p`` is ``g_p``, so its backward
    hands ``g`` to whatever reduces gradients (the DeepSpeed engine)."""
    return sum((p * g.to(p.dtype)).sum() for p, g in zip(params, grads))


def calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Opacus's ``get_noise_multiplier``: the smallest sigma (to 0.01 in epsilon) whose ``steps``
    Poisson-subsampled steps at rate ``sample_rate`` spend at most ``target_epsilon`` at ``delta``."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():  # the search's trial sigmas may hit RDP's largest order: not the answer
        warnings.filterwarnings("ignore", "Optimal order is the largest alpha")
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps,
            accountant=accountant,
        )  # fmt: skip
    return float(sigma)


class Accountant:
    """Opacus's accountant (``rdp`` or ``prv``) of the steps taken, and epsilon at ``delta``.

    Its state is Opacus's own history, ``[(noise multiplier, sample rate, steps), ...]``, saved with
    each checkpoint so that a resumed run goes on counting."""

    def __init__(self, mechanism: str, delta: float) -> None:
        from opacus.accountants import create_accountant

        self.mechanism, self.delta = mechanism, delta
        self.accountant = create_accountant(mechanism)
        self._cached: tuple[list, float] = ([], 0.0)  # (history, its epsilon)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.accountant.history)

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self) -> float:
        """Epsilon spent so far at :attr:`delta` (0 before the first step); computed once per history."""
        if self._cached[0] != self.accountant.history:
            eps = self.accountant.get_epsilon(delta=self.delta) if self.steps else 0.0
            self._cached = (list(self.accountant.history), float(eps))
        return self._cached[1]

    def history(self) -> list[list[float]]:
        return [[float(s), float(q), int(n)] for s, q, n in self.accountant.history]

    def load_history(self, history: Sequence[Sequence[float]]) -> None:
        self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]


class UserLevelDP:
    """The mechanism of one run: its sigma (given, or calibrated for the planned steps), delta,
    clip and accountant, and the step that turns this rank's users into its share of the
    privatized gradient.

    Args:
        cfg: ``train.privacy``.
        data: the run's user-sampled train split (users, sample rate).
        total_steps: the steps the run plans (sigma is calibrated for them).
        seed: :func:`private_seed`'s.
        rank, world_size: data-parallel coordinates (noise on rank 0; the sum scaled by the world
            size, which the engine's average over ranks divides back out).
    """

    def __init__(
        self,
        cfg: PrivacyConfig,
        data: UserSampledData,
        *,
        total_steps: int,
        seed: int,
        rank: int,
        world_size: int,
    ) -> None:
        self.cfg, self.data, self.seed = cfg, data, seed
        self.rank, self.world_size = rank, world_size
        self.delta = cfg.delta or default_delta(data.users)
        self.planned_steps = total_steps
        self.noise_multiplier = cfg.noise_multiplier or calibrate(
            cfg.target_epsilon, self.delta, data.sample_rate, total_steps, cfg.accountant
        )
        self.accountant = Accountant(cfg.accountant, self.delta)

    def planned_epsilon(self) -> float:
        """Epsilon after the run's planned steps, from a fresh accountant."""
        plan = Accountant(self.cfg.accountant, self.delta)
        plan.load_history([[self.noise_multiplier, self.data.sample_rate, self.planned_steps]])
        return plan.epsilon()

    def gradient(
        self,
        model: torch.nn.Module,
        params: Sequence[torch.nn.Parameter],
        batches: Iterable[dict[str, torch.Tensor]],
        step: int,
        on_output: Callable[[Any, dict[str, torch.Tensor]], None] | None = None,
    ) -> tuple[list[torch.Tensor], list[float]]:
        """This rank's share of step ``step``'s privatized gradient (the shares' mean over ranks is
        ``(sum_u clip(g_u) + noise) / (q users)``) and its users' norms before clipping; counts the
        step in the accountant (every rank does, so each holds the same history)."""
        clipped = clipped_user_sum(model, batches, params, self.cfg.max_grad_norm, on_output)
        if self.rank == 0:
            std = self.noise_multiplier * self.cfg.max_grad_norm
            add_noise(clipped.grads, std, noise_generator(self.seed, step, clipped.grads[0].device))
        scale = self.world_size / self.data.expected_users
        self.accountant.step(self.noise_multiplier, self.data.sample_rate)
        return [g.mul_(scale) for g in clipped.grads], clipped.norms

    def record(self) -> dict[str, Any]:
        """The privacy record of the model as trained so far (the checkpoint's and the bundle's)."""
        import opacus

        return {
            "unit": UNIT,
            "epsilon": self.accountant.epsilon(),
            "delta": self.delta,
            "accountant": self.cfg.accountant,
            "library": f"opacus {opacus.__version__}",
            "noise_multiplier": self.noise_multiplier,
            "target_epsilon": self.cfg.target_epsilon or None,
            "max_grad_norm": self.cfg.max_grad_norm,
            "sample_rate": self.data.sample_rate,
            "expected_users": self.data.expected_users,
            "users": self.data.users,
            "max_windows_per_user": self.cfg.max_windows_per_user,
            "steps": self.accountant.steps,
            "history": self.accountant.history(),  # Opacus's (sigma, q, steps) entries; resume reads it
        }

    def resume(self, record: dict[str, Any]) -> None:
        """Continue the accounting of a checkpoint's :meth:`record`."""
        self.accountant.load_history(record["history"])

    def log_values(self) -> dict[str, float]:
        return {"privacy/epsilon": self.accountant.epsilon(), "privacy/delta": self.delta}


def clip_stats(norms: Sequence[float], max_grad_norm: float) -> dict[str, float]:
    """The users' gradient norms before clipping as log values: their mean and the share clipped
    (for tuning ``max_grad_norm``; like the loss, an unprotected number for the operator)."""
    if not norms:
        return {"privacy/user_grad_norm": math.nan, "privacy/clipped_share": math.nan}
    return {
        "privacy/user_grad_norm": float(np.mean(norms)),
        "privacy/clipped_share": float(np.mean([n > max_grad_norm for n in norms])),
    }
