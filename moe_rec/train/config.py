"""Typed configs of the training stage: which model to build (``model:``) and how to train it
(``train:``), both sections of :class:`moe_rec.experiment.ExperimentConfig`, and
:class:`TrainInputs`, what training reads of that experiment (it composes every stage's config,
so the training stage does not import it).

The DeepSpeed JSON under ``configs/deepspeed/`` holds only what is DeepSpeed's own business (ZeRO
stage, bucket sizes); batch sizes, clipping and precision come from :class:`TrainConfig` and are
written into it at start-up, so one number is never set in two places.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from moe_rec.config import ConfigError, check_keys
from moe_rec.data.critique_config import CritiqueConfig
from moe_rec.eval.config import EvalConfig
from moe_rec.model.choices import ModelSize, MoEBackend, RouterMode
from moe_rec.sid.config import SIDConfig

# MoERecConfig fields the trainer sets itself: from the vocabulary, or from this section's own keys
SET_ELSEWHERE = {
    "vocab_size": "the vocabulary",
    "num_domains": "the vocabulary",
    "router_mode": "model.router_mode",
    "moe_backend": "model.moe_backend",
    "code_token_ranges": "the vocabulary (model.kind=item)",
    "num_items": "the SID table (model.kind=item with item_embedding)",
    "item_text_dim": "the SID stage's text encoder (model.kind=item with item_text)",
    "text_token_range": "the vocabulary's text tokens (model.kind=item, sequences with critiques)",
    "item_word_slots": "the item words' table (model.kind=item with item_words or narrative_copy)",
    "item_term_shape": "the item terms' table (model.kind=item with item_terms)",
}


def model_config_fields() -> list[str]:
    """The keyword arguments ``MoERecConfig.__init__`` names, read from its signature so that a new
    field is an accepted override without a list to keep up to date."""
    from moe_rec.model.config import MoERecConfig  # transformers: imported only when overrides are given

    params = inspect.signature(MoERecConfig.__init__).parameters.values()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.name != "self" and p.kind in named]


@dataclass
class ModelSection:
    # token: one position per code token, beam search (MoERecForCausalLM); item: one position per
    # event, parallel code heads, exact scoring of every item (MoERecForItemPrediction)
    kind: Literal["token", "item"] = "token"
    size: ModelSize = "tiny"  # a named size in moe_rec.model.config.SIZES
    router_mode: RouterMode = "domain_user"
    moe_backend: MoEBackend = "grouped_mm"
    dense: bool = False  # train the all-dense twin (same active parameters per token) instead
    overrides: dict[str, Any] = field(default_factory=dict)  # any other MoERecConfig field

    def __post_init__(self) -> None:
        """Refuse an override MoERecConfig does not take (it would be stored and ignored) or one the
        trainer sets itself, here at config load rather than after the process group is up."""
        if not self.overrides:
            return
        for key in self.overrides:
            if key in SET_ELSEWHERE:
                raise ConfigError(f"model.overrides.{key}: set from {SET_ELSEWHERE[key]}, not an override")
        check_keys(self.overrides, set(model_config_fields()) - SET_ELSEWHERE.keys(), "model.overrides.")


EVERY = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(steps?|epochs?)?\s*")


def parse_every(value: int | str, name: str) -> tuple[float, str]:
    """``500``, ``"500 steps"``, ``"2 epochs"``, ``"0.5epoch"`` -> ``(amount, "steps" | "epochs")``;
    a count of steps must be whole. Raises ``ValueError`` naming ``name`` for anything else."""
    found = EVERY.fullmatch(str(value)) if not isinstance(value, bool) else None
    if found is None:
        raise ValueError(f"{name}: expected steps (500, '500 steps') or epochs ('2 epochs'), got {value!r}")
    amount, unit = float(found.group(1)), "epochs" if (found.group(2) or "").startswith("epoch") else "steps"
    if unit == "steps" and not amount.is_integer():
        raise ValueError(f"{name}: a number of steps must be whole, got {value!r} (or say '{value} epochs')")
    return amount, unit


def every_steps(value: int | str, steps_per_epoch: int, name: str = "every") -> int:
    """Optimizer steps of a cadence in steps or epochs (:func:`parse_every`): epochs are rounded to
    whole steps, at least one; 0 stays 0."""
    amount, unit = parse_every(value, name)
    if unit == "steps" or amount == 0:
        return int(amount)
    return max(1, round(amount * steps_per_epoch))


@dataclass
class WandbConfig:
    project: str = "moe_rec"
    mode: Literal["offline", "online", "disabled"] = "offline"
    name: str | None = None  # run name; default: the run directory's name


@dataclass
class PrivacyConfig:
    """``train.privacy``: user-level differentially private training (:mod:`moe_rec.train.privacy`,
    docs/privacy.md). Off by default; when off none of the other keys is read."""

    enabled: bool = False
    # the noise: set one of the two. noise_multiplier: sigma, the noise std over max_grad_norm;
    # target_epsilon: the sigma that spends this epsilon (at delta) by the run's last step, calibrated
    # at start-up with Opacus for the planned steps
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    delta: float = 0.0  # the delta epsilon is reported at; 0: 0.1 / (users in the train split)
    max_grad_norm: float = 1.0  # C: each sampled user's whole gradient is clipped to this L2 norm
    expected_users: int = (
        256  # users per step on average: each joins a step with probability expected_users / users
    )
    max_windows_per_user: int = 4  # a user's newest training windows that make up their gradient (bounds a
    # step's cost; the guarantee does not need it: the user's whole gradient is clipped as one vector)
    accountant: Literal["rdp", "prv"] = "rdp"  # Opacus's RDP or PRV accountant (both upper bounds)
    seed: int | None = None  # the users sampled and the noise; None: drawn from the OS's entropy at each
    # start (the guarantee assumes nobody can replay them); a number: reproducible, for tests only

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        if (self.noise_multiplier > 0) == (self.target_epsilon > 0):
            raise ConfigError(
                "train.privacy: set exactly one of noise_multiplier (sigma) and target_epsilon, both > 0; "
                f"got noise_multiplier={self.noise_multiplier}, target_epsilon={self.target_epsilon}"
            )
        if not 0 <= self.delta < 1:
            raise ConfigError(f"train.privacy.delta must be in [0, 1) (0: 0.1 / users), got {self.delta}")
        if self.max_grad_norm <= 0:
            raise ConfigError(f"train.privacy.max_grad_norm must be > 0, got {self.max_grad_norm}")
        for name in ("expected_users", "max_windows_per_user"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.privacy.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class TrainConfig:
    deepspeed: Path = Path("configs/deepspeed/zero2.json")  # JSON or YAML; relative: cwd, else repo root
    micro_batch_size: int = 16  # samples per rank per forward (and per validation batch)
    micro_batch_tokens: int = 0  # > 0: train on length-grouped micro batches of at most this many
    # padded tokens (positions, for model.kind=item) instead (samples of similar length together)
    grad_accum: int = 1  # micro batches per optimizer step
    batch_by_service: bool = False  # every optimizer step's micro batches from one service's samples (a
    # sample's service: most of its events'), so each step's gradient is one service's, as in a model
    # per service; the steps of all services shuffled together
    negatives_per_step: bool = False  # item-level models with item_negatives: a step's micro batches
    # share one draw of negatives per service (as one large batch would), instead of one draw each
    teacher_targets: Path | None = None  # item-level models with item_loss=items: a teacher-targets file
    # (tools/teacher_targets.py: one model per service's top K at every training position); the loss
    # adds model.overrides.distill_weight x KL(teacher || model) over them (moe_rec.train.distill)
    critique_word_dropout: float = 0.0  # item-level models with critiques: each word of a training
    # critique sample left out with this probability (at least one kept), drawn anew every epoch, so
    # the model reads a critique by all its words, not by a carrier phrase it saw (docs/critiques.md)
    lr: float = 1e-3  # peak learning rate (after warmup)
    min_lr: float = 1e-4  # cosine floor
    warmup_steps: int = 20  # linear warmup, in optimizer steps
    max_steps: int = 0  # optimizer steps; 0: `epochs` full passes over the train split
    epochs: int = 1
    stop_at: int = 0  # leave after this step, checkpointed (a job's time limit); the LR schedule still
    # spans the whole run, so a resumed run continues exactly where this one stopped (0: never)
    weight_decay: float = 0.01
    clip: float = 1.0  # gradient norm clip (0: off)
    seed: int = 0
    # save_every / eval_every: optimizer steps (100, "100 steps") or epochs ("2 epochs", "0.5 epoch"),
    # epochs turned into steps (rounded, at least 1) once the epoch length is known (in_steps)
    save_every: int | str = 100  # between checkpoints (one is always written at the end)
    keep_last: int = 2  # checkpoints kept besides the best one
    eval_every: int | str = 100  # between validations (0: only at the end)
    max_eval_samples: int = 2048  # validation subsample (first N valid rows; 0: all)
    patience: int = 0  # early stopping: leave after this many validations in a row without a better
    # best_metric (0: never); read from the best checkpoint's step, so a rerun stops there too
    log_every: int = 10  # optimizer steps between log lines
    critique_valid: bool = False  # item-level models with critiques: validation also ranks the valid split's
    # critique requests (sequences/critique_valid, the first max_eval_samples) with their critique and
    # reports valid/critique/<metric> and valid/mixed/<metric> (the mean with the plain one), which
    # best_metric may name (e.g. valid/mixed/ndcg@10: `best` chosen on both)
    best_metric: str = "valid/ndcg@10"  # higher is better; picks the `best` checkpoint. recall@K / ndcg@K
    # rank items by beam search as the test does; valid/token_acc (teacher-forced) is the cheap alternative
    resume: Literal["auto", "never"] = "auto"  # auto: continue from <run_dir>/checkpoints/latest
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    peak_tflops: float = 0.0  # per device, for MFU; 0: from the GPU's name (no MFU on CPU)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)  # user-level DP training (off by default)

    def __post_init__(self) -> None:
        positive = ("micro_batch_size", "grad_accum", "epochs", "keep_last", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if parse_every(self.save_every, "save_every")[0] <= 0:
            raise ValueError(f"save_every must be more than 0 steps or epochs, got {self.save_every!r}")
        parse_every(self.eval_every, "eval_every")  # 0 is allowed: only at the end
        for name in (
            "micro_batch_tokens",
            "warmup_steps",
            "max_steps",
            "stop_at",
            "max_eval_samples",
            "patience",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.critique_word_dropout < 1.0:
            raise ValueError(f"critique_word_dropout must be in [0, 1), got {self.critique_word_dropout}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.privacy.enabled:  # a private step is one Poisson sample of users, clipped per user
            for name, off, why in (
                ("grad_accum", 1, "a step's batch is its sample of users (train.privacy.expected_users)"),
                ("micro_batch_tokens", 0, "a sampled user's windows are one batch"),
                ("batch_by_service", False, "a step's batch is its sample of users"),
                ("teacher_targets", None, "a teacher's targets are read from every user's windows, unclipped"),
                ("critique_word_dropout", 0.0, "a private step's windows are sampled per user, not planned"),
                ("clip", 0.0, "each user's gradient is clipped to train.privacy.max_grad_norm; clipping "
                 "the noisy sum again would distort the noise"),
            ):  # fmt: skip
                if getattr(self, name) != off:
                    raise ConfigError(
                        f"train.{name}={getattr(self, name)} with train.privacy.enabled: set train.{name}={off} "
                        f"({why}); configs/train/private.yaml does"
                    )

    def in_steps(self, steps_per_epoch: int) -> TrainConfig:
        """This config with ``save_every`` and ``eval_every`` in optimizer steps, given the epoch length."""
        return dataclasses.replace(
            self,
            save_every=every_steps(self.save_every, steps_per_epoch, "save_every"),
            eval_every=every_steps(self.eval_every, steps_per_epoch, "eval_every"),
        )


class TrainInputs(Protocol):
    """What training reads of an experiment (:class:`moe_rec.experiment.ExperimentConfig` is
    one): its model, training and evaluation sections and where the run keeps its files. The whole
    experiment is also recorded with the W&B run."""

    run_dir: Path
    model: ModelSection
    train: TrainConfig
    eval: EvalConfig  # validation ranks items as this says (its split set to valid)
    sid: SIDConfig  # its encoder embeds the item texts (model.overrides.item_text)
    critiques: CritiqueConfig  # its price bands name the items' bands (model.overrides.item_words)

    @property
    def data_dir(self) -> Path: ...

    @property
    def embedding_cache(self) -> Path: ...

    @property
    def sid_dir(self) -> Path: ...

    @property
    def sequences_dir(self) -> Path: ...

    @property
    def checkpoint_dir(self) -> Path: ...
