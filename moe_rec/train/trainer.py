"""The training loop: a DeepSpeed engine (ZeRO 1/2/3) around ``MoERecForCausalLM``, warmup +
cosine LR, periodic validation, checkpoints with exact resume, rank-0 logging.

Order of a run: read ``vocab.json`` and the splits (a missing run directory fails here, before any
process group) -> join the process group (gloo with ``DS_ACCELERATOR=cpu`` on a CPU machine, NCCL
on GPUs) -> build the model from the vocabulary's sizes -> ``deepspeed.initialize`` with a client
``torch.optim.AdamW`` -> resume from ``latest`` (``train.resume: auto``) -> steps. The
loss is the model's own (``lm_loss + aux_loss``). One optimizer step consumes ``grad_accum`` micro
batches per rank; logs, validation and checkpoints count optimizer steps. With ``train.privacy``
a step is instead a Poisson sample of users, each user's gradient clipped, noise added once
(:meth:`Trainer.private_step`, :mod:`moe_rec.train.privacy`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
import yaml

from moe_rec.config import ConfigError, to_dict
from moe_rec.console import console, progress
from moe_rec.data import store
from moe_rec.data.cold_start import read_cold_items
from moe_rec.data.positions import code_token_ranges
from moe_rec.data.schema import DataError
from moe_rec.data.vocab import Vocabulary
from moe_rec.eval.exact import ServiceCatalogue, evaluate_exact
from moe_rec.eval.metrics import MACRO, all_reduce_
from moe_rec.model import MoERecConfig, build_config, model_class, parameter_report
from moe_rec.sid.build import table_text_embeddings
from moe_rec.sid.table import META_FILE, SIDTable
from moe_rec.train import checkpoint as ckpt
from moe_rec.train.config import ModelSection, TrainConfig, TrainInputs
from moe_rec.train.data import (
    Collator,
    CritiqueWordDropout,
    DataPosition,
    ItemCollator,
    ShardedTrainData,
    load_split,
)
from moe_rec.train.distill import TeacherTargets
from moe_rec.train.extensions import check_build_locks, skip_shm_op
from moe_rec.train.metrics import (
    CRITIQUE_SCOPES,
    RankZeroLogger,
    eval_rows,
    evaluate,
    flops_per_token,
    mixed_metrics,
    peak_flops,
    retrieval,
    validation_keys,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def model_config(
    section: ModelSection,
    vocab: Vocabulary,
    num_items: int = 0,
    text_dim: int = 0,
    word_slots: int = 0,
    term_shape: list[int] | None = None,
) -> MoERecConfig:
    """The decoder for ``vocab``: a named size, the vocabulary's token count and service slots, and
    for the item-level model (``kind: item``) the token range of each code position and, with a
    per-item term (``item_embedding``), the catalogue's ``num_items`` (and with ``item_text`` the
    text embeddings' width ``text_dim``, with item words (:func:`uses_item_words`) the subwords per field
    ``word_slots``, with ``item_terms`` the terms' table's ``term_shape``)."""
    ranges = {"code_token_ranges": code_token_ranges(vocab)} if section.kind == "item" else {}
    if section.overrides.get("item_embedding"):
        ranges["num_items"] = num_items
    if section.kind == "item" and section.overrides.get("item_text"):
        ranges["item_text_dim"] = text_dim
    if section.kind == "item" and uses_item_words(section.overrides):
        ranges["item_word_slots"] = word_slots
    if section.kind == "item" and section.overrides.get("item_terms"):
        ranges["item_term_shape"] = term_shape
    if section.kind == "item" and vocab.text_size:  # sequences with critiques and narratives
        ranges["text_token_range"] = [vocab.text_offset, vocab.size]
    try:
        cfg = build_config(
            section.size,
            vocab_size=vocab.size,
            num_domains=vocab.service_slots,
            router_mode=section.router_mode,
            moe_backend=section.moe_backend,
            **ranges,
            **section.overrides,
        )
    except ValueError as e:  # a model.overrides value the model refuses, e.g. top-k above num_experts
        raise ConfigError(f"model: {e}") from None
    return cfg.dense_twin() if section.dense else cfg


def uses_item_words(overrides: dict) -> bool:
    """Whether a model with these ``model.overrides`` holds the catalogue's item words: critiques
    are matched against them (``item_words``), narratives copy them (``narrative_copy``)."""
    return bool(overrides.get("item_words") or overrides.get("narrative_copy"))


def _item_words(cfg: TrainInputs, sids: SIDTable, vocab: Vocabulary, terms: bool = False) -> torch.Tensor:
    """(N, F, L) the catalogue's words (:mod:`moe_rec.data.item_words`) in the run's subwords, or
    with ``terms`` its distinctive title terms (N, K, L)."""
    from moe_rec.data.item_words import item_terms, item_words
    from moe_rec.data.text_tokenizer import TextTokenizer

    if not vocab.text_size:
        raise ConfigError(
            "model.overrides.item_words and narrative_copy need sequences with critiques (critiques.enabled); "
            "without critiques set both to false"
        )
    items, keys, bands = _catalogue_attributes(cfg, sids)
    tokenizer = TextTokenizer.load(cfg.sequences_dir)
    return (item_terms if terms else item_words)(items, keys, tokenizer, vocab.text_offset, **bands)


def _word_dropout(cfg: TrainInputs, vocab: Vocabulary) -> CritiqueWordDropout | None:
    """train.critique_word_dropout over the run's subwords, or None when it is 0."""
    from moe_rec.data.text_tokenizer import TextTokenizer

    p = cfg.train.critique_word_dropout
    if not p:
        return None
    if cfg.model.kind != "item" or not vocab.text_size:
        raise ConfigError(
            "train.critique_word_dropout needs an item-level model (model.kind: item) trained on "
            "sequences with critiques (critiques.enabled)"
        )
    return CritiqueWordDropout(p, TextTokenizer.load(cfg.sequences_dir).word_starts(), vocab.text_offset)


def _teacher_targets(path: Path, config: MoERecConfig, samples: int, items: int) -> TeacherTargets:
    """train.teacher_targets loaded and checked against the run: an item-level model trained on
    the items loss, a file made for this train split (as many samples) and this catalogue."""
    if getattr(config, "item_loss", None) != "items":
        raise ConfigError(
            "train.teacher_targets needs an item-level model with model.overrides.item_loss=items "
            "(the KL is taken over items)"
        )
    targets = TeacherTargets.load(path)
    if len(targets) != samples:
        raise DataError(
            f"{path}: teacher targets for {len(targets)} train samples, the train split has {samples}; "
            "make them again (tools/teacher_targets.py) for these sequences"
        )
    if len(targets.rows) and int(targets.rows.max()) >= items:
        raise DataError(f"{path}: teacher targets name catalogue rows past the SID table's {items} items")
    return targets


def _catalogue_attributes(cfg: TrainInputs, sids: SIDTable) -> tuple[pa.Table, list[tuple[str, str]], dict]:
    """The prepared items, the ``(service, item_id)`` of each SID-table row (in order) and the
    critiques' price-band settings: what every per-item table of :mod:`moe_rec.data.item_words` reads."""
    items = store.load_table(cfg.data_dir, store.ITEMS_DIR)
    keys = [(sids.services[int(s)], item) for s, item in zip(sids.service_index, sids.item_ids, strict=True)]
    return (
        items,
        keys,
        {"num_bands": cfg.critiques.price_bands, "min_band_items": cfg.critiques.min_band_items},
    )


def lr_lambda(train: TrainConfig, total_steps: int) -> Any:
    """Multiplier of ``train.lr`` after ``step`` optimizer steps: linear warmup, cosine to ``min_lr``."""

    def f(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        progress_ = min(1.0, (step - train.warmup_steps) / max(1, total_steps - train.warmup_steps))
        floor = train.min_lr / train.lr if train.lr else 0.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress_))

    return f


def deepspeed_config(train: TrainConfig, world_size: int, bf16: bool) -> dict[str, Any]:
    """The JSON under ``configs/deepspeed/`` with our batch sizes, clipping and precision written in."""
    path = train.deepspeed
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    if not path.exists():
        raise FileNotFoundError(f"DeepSpeed config {train.deepspeed} not found (also not under {REPO_ROOT})")
    ds = yaml.safe_load(path.read_text())  # JSON is YAML
    ds.update(
        train_micro_batch_size_per_gpu=train.micro_batch_size,
        gradient_accumulation_steps=train.grad_accum,
        train_batch_size=train.micro_batch_size * train.grad_accum * world_size,
        gradient_clipping=train.clip,
        bf16={"enabled": bf16},
        fp16={"enabled": False},
        wandb={"enabled": False},  # our own rank-0 logger; DeepSpeed's step counter would clash
        zero_allow_untested_optimizer=True,  # the client AdamW
        steps_per_print=10**9,
    )
    return ds


def init_distributed() -> tuple[int, int, torch.device]:
    """Join (or, started as a plain process, create a one-rank) process group; returns rank, world
    size and this rank's device. Must run before ``deepspeed`` is imported on a CPU machine. On a
    CPU, several ranks first clear a stale build lock of DeepSpeed's shared-memory op, and one
    rank starts without building that op (:mod:`moe_rec.train.extensions`)."""
    single = "RANK" not in os.environ
    if single:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
    gpu = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    builds_shm_op = not gpu and int(os.environ["WORLD_SIZE"]) > 1  # one process needs no shared memory
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    cache = Path(os.environ.get("MOE_REC_CACHE") or Path.home() / ".cache" / "moe_rec")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions"))  # CPU shm op, built once
    if builds_shm_op:
        check_build_locks(Path(os.environ["TORCH_EXTENSIONS_DIR"]), local_rank)
    import deepspeed

    if not gpu and not builds_shm_op:
        skip_shm_op()
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    device = torch.device("cuda", local_rank) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device


def _optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases and other vectors."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(0.9, 0.95))


@dataclass
class StepStats:
    """What the loop records of a micro batch and, summed, of an optimizer step or a log window.
    Every field is a sum until :meth:`reduced` turns the losses and the entropy into means per
    micro batch; the token counts stay sums (throughput and attention FLOPs read them)."""

    loss: float = 0.0  # lm_loss + aux_loss, the loss back-propagated
    lm_loss: float = 0.0
    aux_loss: float = 0.0  # the router losses, weighted by their coefficients
    load_balancing_loss: float = 0.0
    z_loss: float = 0.0
    router_entropy: float = 0.0  # mean over MoE layers
    tokens: float = 0.0  # real (not padding) tokens
    token_length: float = 0.0  # real tokens x padded length, for the attention FLOPs
    text_loss: float = 0.0  # the narrative loss, summed over the micro batches that had narratives
    text_batches: float = 0.0  # how many did

    MEANS: ClassVar[tuple[str, ...]] = (
        "loss", "lm_loss", "aux_loss", "load_balancing_loss", "z_loss", "router_entropy",
    )  # fmt: skip

    @classmethod
    def of_micro_batch(cls, out: Any, batch: dict[str, torch.Tensor]) -> StepStats:
        """One micro batch's, with one device sync (``batch`` is still on the CPU); a loss the
        model did not return (a dense model's router losses) counts as 0."""
        zero = out.loss.new_zeros(())
        losses = [out.loss, out.lm_loss, out.aux_loss, out.load_balancing_loss, out.z_loss, out.text_loss]
        entropy = out.router_entropy.mean() if out.router_entropy is not None else zero
        on_device = torch.stack([*(x if x is not None else zero for x in losses), entropy]).detach()
        loss, lm, aux, lb, z, text, ent = on_device.double().cpu().tolist()
        mask = batch["attention_mask"]  # (B, T)
        tokens = float(mask.sum().item())
        had_text = float(out.text_loss is not None)
        return cls(loss, lm, aux, lb, z, ent, tokens, tokens * mask.shape[1], text, had_text)

    def __add__(self, other: StepStats) -> StepStats:
        return StepStats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def reduced(self, micro_batches: int) -> StepStats:
        """Summed over ranks, every field in one float64 ``all_reduce``; the losses and the entropy
        then divided by ``micro_batches`` (those of every rank) into means."""
        packed = torch.tensor(dataclasses.astuple(self), dtype=torch.float64)
        all_reduce_(packed)
        total = StepStats(*packed.tolist())
        return dataclasses.replace(
            total, **{name: getattr(total, name) / micro_batches for name in self.MEANS}
        )

    def mean(self, steps: int) -> StepStats:
        """Every field divided by ``steps``: a log window's mean step."""
        return StepStats(*(v / steps for v in dataclasses.astuple(self)))


@dataclass
class _LogWindow:
    """The optimizer steps since the last log line: their summed statistics, count and seconds."""

    stats: StepStats = dataclasses.field(default_factory=StepStats)
    steps: int = 0
    seconds: float = 0.0  # training only, not validation or saving

    def add(self, stats: StepStats, seconds: float) -> None:
        self.stats += stats
        self.steps += 1
        self.seconds += seconds


class Trainer:
    """One training run of ``cfg`` on this rank (every rank builds one)."""

    def __init__(self, cfg: TrainInputs) -> None:
        vocab_path = cfg.sequences_dir / "vocab.json"
        if not vocab_path.exists():
            raise DataError(
                f"{vocab_path} not found: no sequences in run_dir {cfg.run_dir}; build them first with "
                f"`moe-rec sequences build --config <experiment> run_dir={cfg.run_dir}`"
            )
        if not (cfg.sid_dir / META_FILE).exists():
            raise DataError(
                f"{cfg.sid_dir / META_FILE} not found: validation ranks items by their semantic IDs; build them "
                f"with `moe-rec sids build --config <experiment> run_dir={cfg.run_dir}`"
            )
        self.cfg, self.tc = cfg, cfg.train
        self.vocab = Vocabulary.from_dict(json.loads(vocab_path.read_text()))
        self.sids = SIDTable.load(cfg.sid_dir)
        if self.sids.vocabulary() != dataclasses.replace(
            self.vocab, text_size=0
        ):  # the text tokens come after
            raise DataError(
                f"the SID table in {cfg.sid_dir} does not match {vocab_path}; rebuild the sequences"
            )
        known = validation_keys(self.vocab.services, self.tc.critique_valid)
        if self.tc.best_metric not in known:
            raise ConfigError(
                f"train.best_metric={self.tc.best_metric!r} is not a validation metric; known: "
                + ", ".join(k for k in known if k.count("/") == 1)
                + " (and the same per service, e.g. valid/<service>/ndcg@10)"
            )
        train_ds = load_split(cfg.sequences_dir, "train")
        valid_ds = load_split(cfg.sequences_dir, "valid")
        self.item_text = None  # (N, D_text) with item_text: the SID stage's embeddings, by table row
        if cfg.model.kind == "item" and cfg.model.overrides.get(
            "item_text"
        ):  # the token model has no item term
            items = store.load_table(cfg.data_dir, store.ITEMS_DIR)
            self.item_text = table_text_embeddings(
                items, self.sids, cfg.sid, cfg.embedding_cache, cfg.sid_dir
            )
        text_dim = self.item_text.shape[1] if self.item_text is not None else 0
        self.item_words = None  # (N, F, L) with item_words: each item's subwords per field, by table row
        if cfg.model.kind == "item" and uses_item_words(cfg.model.overrides):
            self.item_words = _item_words(cfg, self.sids, self.vocab)
        word_slots = self.item_words.shape[2] if self.item_words is not None else 0
        self.item_terms = None  # (N, K, L) with item_terms: each item's distinctive title terms
        if cfg.model.kind == "item" and cfg.model.overrides.get("item_terms"):
            self.item_terms = _item_words(cfg, self.sids, self.vocab, terms=True)
        term_shape = list(self.item_terms.shape[1:]) if self.item_terms is not None else None
        self.model_config = model_config(
            cfg.model, self.vocab, len(self.sids), text_dim, word_slots, term_shape
        )
        if self.tc.negatives_per_step and not (
            cfg.model.kind == "item" and getattr(self.model_config, "item_negatives", 0)
        ):
            raise ConfigError(
                "train.negatives_per_step needs an item-level model with sampled negatives "
                "(model.kind: item, model.overrides.item_negatives > 0)"
            )

        self.rank, self.world_size, self.device = init_distributed()
        import deepspeed

        self.item_level = cfg.model.kind == "item"
        lengths = None
        if self.item_level:
            self.collator: Collator | ItemCollator = ItemCollator(
                self.vocab, self.model_config.num_user_buckets
            )
            lengths = ShardedTrainData.item_positions(train_ds, self.vocab)
        else:
            self.collator = Collator(self.model_config.num_user_buckets)
        privacy = self.tc.privacy
        if privacy.enabled:  # a step is a Poisson sample of users (moe_rec.train.privacy)
            from moe_rec.train.privacy import UserSampledData, private_seed

            self.private_seed = private_seed(privacy.seed, self.device)
            self.data: ShardedTrainData | UserSampledData = UserSampledData(
                train_ds,
                expected_users=privacy.expected_users,
                max_windows_per_user=privacy.max_windows_per_user,
                rank=self.rank,
                world_size=self.world_size,
                seed=self.private_seed,
                collator=self.collator,
            )
        else:
            self.data = ShardedTrainData(
                train_ds,
                micro_batch_size=self.tc.micro_batch_size,
                micro_batch_tokens=self.tc.micro_batch_tokens,
                grad_accum=self.tc.grad_accum,
                rank=self.rank,
                world_size=self.world_size,
                seed=self.tc.seed,
                collator=self.collator,
                positions_per_sample=lengths,
                sample_services=ShardedTrainData.main_services(train_ds)
                if self.tc.batch_by_service
                else None,
                word_dropout=_word_dropout(cfg, self.vocab),
            )
        if self.tc.teacher_targets is not None:
            self.data.targets = _teacher_targets(
                self.tc.teacher_targets, self.model_config, len(train_ds), len(self.sids)
            )
        self.tc = self.tc.in_steps(self.data.steps_per_epoch)  # save_every / eval_every in epochs -> steps
        self.total_steps = self.tc.max_steps or self.tc.epochs * self.data.steps_per_epoch
        n_valid = min(self.tc.max_eval_samples or len(valid_ds), len(valid_ds))
        self.valid_requests = valid_ds.select(range(n_valid)).to_list()
        self.critique_valid_requests = self._critique_valid_requests(cfg) if self.tc.critique_valid else []
        self.retrieval_cfg = dataclasses.replace(cfg.eval, split="valid")
        if self.item_level:  # exact scoring of every item of the asked service
            self.catalogue = ServiceCatalogue(self.sids, self.device)
        else:  # beam search, and the same requests teacher-forced
            self.eval_rows = eval_rows(self.valid_requests, self.vocab)
            self.sid_trie = self.sids.trie().to(self.device)
        self.probe = self.collator(train_ds.select(range(self.tc.micro_batch_size)))

        random.seed(self.tc.seed)
        np.random.seed(self.tc.seed)
        torch.manual_seed(self.tc.seed)
        model = model_class(self.model_config)(self.model_config)
        self.cold = read_cold_items(cfg.sequences_dir)  # the cold-start benchmark's held-out items
        if self.item_level and self.model_config.item_loss == "items":  # the softmax runs over the catalogue
            trained = torch.ones(len(self.sids.codes), dtype=torch.bool)
            if self.cold:
                trained[self.sids.rows(*map(list, zip(*sorted(self.cold))))] = False
            model.set_train_catalogue(
                self.sids.codes, self.sids.service_index + self.vocab.service_offset, trained
            )
        if self.item_text is not None:
            model.set_item_text(self.item_text)
        if self.item_words is not None:
            model.set_item_words(self.item_words)
        if self.item_terms is not None:
            model.set_item_terms(self.item_terms)
        if self.model_config.item_price_bins or self.model_config.item_amounts:
            from moe_rec.data.item_words import item_amount_bins, item_price_bins

            items, keys, bands = _catalogue_attributes(cfg, self.sids)
            if self.model_config.item_price_bins:
                bins = item_price_bins(items, keys, self.model_config.item_price_bins, **bands)
                model.set_item_price_bins(bins)
            if self.model_config.item_amounts:
                model.set_item_amount_bins(item_amount_bins(items, keys, **bands))
        self.params = parameter_report(model)
        self.peak_flops = peak_flops(self.tc.peak_tflops)  # per device; None: no MFU
        bf16 = self.tc.precision == "bf16" or (self.tc.precision == "auto" and self.device.type == "cuda")
        ds_config = deepspeed_config(self.tc, self.world_size, bf16)
        self.privacy = None  # UserLevelDP: the mechanism and accountant of a private run
        if privacy.enabled:
            from moe_rec.train.privacy import UserLevelDP, check_engine

            check_engine(ds_config, self.tc.deepspeed)
            self.privacy = UserLevelDP(
                privacy, self.data, total_steps=self.total_steps, seed=self.private_seed, rank=self.rank,
                world_size=self.world_size,
            )  # fmt: skip
        optimizer = _optimizer(model, self.tc)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.tc, self.total_steps))
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        self.ckpt_dir = cfg.checkpoint_dir
        self.logger = RankZeroLogger(
            rank=self.rank,
            run_dir=cfg.run_dir,
            metrics_path=self.ckpt_dir / "metrics.jsonl",
            project=self.tc.wandb.project,
            mode=self.tc.wandb.mode,
            name=self.tc.wandb.name or cfg.run_dir.name,
            config={**to_dict(cfg), "model_config": self.model_config.to_dict(), "params": self.params},
        )
        self.step = 0
        self.position = DataPosition()
        self.best: dict[str, Any] = {"tag": None, "value": -math.inf}
        self.saved_step = -1
        self.user_norms = torch.zeros(3, dtype=torch.float64)  # private runs: sum of norms, clipped, users
        n_moe = self.model_config.ffn_types.count("moe")
        # tokens per (MoE layer, service, expert) since the last validation, which logs it
        self.expert_load = torch.zeros(n_moe, self.model_config.num_domains, self.model_config.num_experts)

    # -- checkpoints ---------------------------------------------------------------------------

    def resume(self) -> None:
        """Continue from ``latest`` if there is one (``resume: auto``); errors name what is wrong."""
        if self.tc.resume == "never":
            return
        tag = ckpt.resume_tag(self.ckpt_dir)
        if tag is None:
            return
        state = ckpt.verify(self.ckpt_dir, tag, self.world_size)
        recorded = state.get("privacy")
        if (recorded is not None) != (self.privacy is not None):
            trained = "with" if recorded is not None else "without"
            raise ckpt.CheckpointError(
                f"{self.ckpt_dir / tag} was trained {trained} train.privacy and this run has it "
                f"{'off' if recorded is not None else 'on'}: a run keeps one setting from its first step "
                f"(start a new run_dir, or set train.resume=never there)"
            )
        if recorded is not None:
            self.privacy.resume(recorded)
        try:
            path, _ = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
            rng = torch.load(self.ckpt_dir / tag / f"rng_rank{self.rank}.pt", weights_only=False)
        except Exception as e:  # a truncated or foreign file: say which checkpoint
            raise ckpt.CheckpointError(f"{self.ckpt_dir / tag}: cannot load checkpoint: {e}") from e
        if path is None:
            raise ckpt.CheckpointError(f"{self.ckpt_dir / tag}: DeepSpeed found no loadable checkpoint")
        ckpt.set_rng_state(rng)
        self.step = state["step"]
        self.position = DataPosition(**state["position"])
        self.best = state["best"]
        self.saved_step = self.step
        dist.barrier()
        if self.rank == 0:
            console.print(f"resumed from {self.ckpt_dir / tag} at step {self.step}")

    def save(self, metrics: dict[str, float] | None = None) -> str:
        """Checkpoint the current step into its own tag directory; move ``latest`` (and ``best`` when
        ``metrics`` improve on it), then prune to ``keep_last``."""
        tag = ckpt.tag_for(self.step)
        if metrics is not None and metrics.get(self.tc.best_metric, -math.inf) > self.best["value"]:
            self.best = {"tag": tag, "value": metrics[self.tc.best_metric]}
        if self.saved_step == self.step:
            if self.rank == 0 and self.best["tag"] == tag:
                ckpt.write_pointer(self.ckpt_dir, ckpt.BEST, tag)
            return tag
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, save_latest=False)
        ckpt.save_rank_state(self.ckpt_dir / tag, self.rank)
        dist.barrier()
        if self.rank == 0:  # the model config and vocabulary make a checkpoint self-describing
            self.model_config.to_json_file(self.ckpt_dir / tag / ckpt.MODEL_CONFIG_FILE)
            (self.ckpt_dir / tag / ckpt.VOCAB_FILE).write_text(json.dumps(self.vocab.to_dict(), indent=1))
            state = {
                "step": self.step,
                "position": {"epoch": self.position.epoch, "step": self.position.step},
                "best": self.best,
                "world_size": self.world_size,
                "zero_stage": self.engine.zero_optimization_stage(),
            }
            if self.privacy is not None:  # (epsilon, delta), the mechanism, and the accountant's history
                state["privacy"] = self.privacy.record()
            ckpt.finish(self.ckpt_dir, tag, state)
            if self.best["tag"] == tag:
                ckpt.write_pointer(self.ckpt_dir, ckpt.BEST, tag)
            ckpt.prune(self.ckpt_dir, self.tc.keep_last)
        dist.barrier()
        self.saved_step = self.step
        return tag

    # -- the loop ------------------------------------------------------------------------------

    def _probe(self) -> dict[str, Any]:
        """This rank's loss and logits (first two rows) on a fixed train batch, not reduced: equal on
        every rank iff the weights are; a consolidated checkpoint must reproduce them."""
        with torch.no_grad():
            self.engine.eval()
            out = self.engine(**{k: v.to(self.device) for k, v in self.probe.items()})
            self.engine.train()
        return {"batch": self.probe, "loss": out.loss.item(), "logits": out.logits[:2].float().cpu()}

    def _critique_valid_requests(self, cfg: TrainInputs) -> list[dict[str, Any]]:
        """train.critique_valid: the first max_eval_samples critique requests of the valid split."""
        import datasets

        from moe_rec.data.text_samples import CRITIQUE_SPLITS

        split_dir = cfg.sequences_dir / CRITIQUE_SPLITS["valid"]
        if not self.item_level or not any(split_dir.glob("*.parquet")):
            raise ConfigError(
                f"train.critique_valid needs an item-level model (model.kind=item) and critique requests in "
                f"{split_dir} (sequences built with critiques.enabled)"
            )
        rows = datasets.Dataset.from_parquet(str(split_dir / "*.parquet"))
        return rows.select(range(min(self.tc.max_eval_samples or len(rows), len(rows)))).to_list()

    def validate(self) -> dict[str, float]:
        if self.item_level:
            ranking = evaluate_exact(
                self.engine.module,
                self.sids,
                self.valid_requests,
                self.retrieval_cfg,
                prefix="valid",
                catalogue=self.catalogue,
                show_progress=False,
                cold=self.cold,
            )
            metrics = {k: v for k, v in ranking.items() if not k.endswith("/count") and f"/{MACRO}/" not in k}
            if (
                self.critique_valid_requests
            ):  # train.critique_valid: overall only, and the mean with the plain
                ranking = evaluate_exact(
                    self.engine.module, self.sids, self.critique_valid_requests, self.retrieval_cfg,
                    prefix="valid/critique", catalogue=self.catalogue, show_progress=False,
                )  # fmt: skip
                critique = {
                    k: v for k, v in ranking.items() if k.count("/") == 2 and not k.endswith("/count")
                }
                metrics.update(critique)
                metrics.update(mixed_metrics(metrics, critique))
        else:
            metrics = evaluate(
                self.engine, self.eval_rows, self.vocab, self.collator, self.tc.micro_batch_size
            )
            metrics.update(
                retrieval(self.engine, self.valid_requests, self.sids, self.sid_trie, self.retrieval_cfg)
            )
        spent = self.privacy.log_values() if self.privacy is not None else {}
        self.logger.log({**metrics, **spent}, self.step, kind="valid")
        if self.rank == 0:
            shown = {  # overall, not per service
                k: v for k, v in metrics.items()
                if k.count("/") == 1 or k.split("/")[1] in CRITIQUE_SCOPES and k.count("/") == 2
            }  # fmt: skip
            line = "  ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items()))
            console.print(f"step {self.step}  {line}{_epsilon(spent)}")
        return metrics

    def plan(self, stop: int) -> str:
        """One line for the log: the steps this process will run, the validation set per service and
        the wall-clock start (a resumed run's log then says when each part ran)."""
        per_service = Counter(r["service"] for r in self.valid_requests)
        services = ", ".join(f"{s} {per_service[s]:,}" for s in self.vocab.services if per_service[s])
        when = f"at step {self.total_steps:,}"
        if self.tc.eval_every:
            when = f"every {self.tc.eval_every:,} steps and {when}"
        return (
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}  steps {self.step:,} -> {stop:,} of {self.total_steps:,} "
            f"(an epoch is {self.data.steps_per_epoch:,}); validation {when} on "
            f"{len(self.valid_requests):,} requests ({services or 'none'})"
        )

    def fit(self) -> dict[str, Any]:
        """Train from ``self.step`` to the stop step (``train.stop_at`` or the end); returns a summary:
        the step reached, the start-up plan, seconds, every step's loss, the last validation
        metrics, the probe (:meth:`_probe`) and the last logged throughput."""
        stop = min(self.total_steps, self.tc.stop_at or self.total_steps)
        stream = self.data(self.position)
        plan = self.plan(stop)
        if self.rank == 0:
            console.print(plan)
            if self.privacy is not None:
                console.print(self.privacy_plan())
        window, tokens_per_s = _LogWindow(), 0.0
        losses: list[float] = []
        metrics: dict[str, float] = {}
        started = time.perf_counter()
        with progress() if self.rank == 0 else _NullBar() as bar:
            task = bar.add_task("train", total=stop, completed=self.step)
            while self.step < stop and not self.patience_spent():
                t0 = time.perf_counter()  # throughput counts training steps only, not eval or saving
                stats = self.train_step(stream)
                losses.append(stats.loss)
                window.add(stats, time.perf_counter() - t0)
                bar.update(task, completed=self.step, description=f"train loss {stats.loss:.3f}")
                if self.step % self.tc.log_every == 0 or self.step == stop:
                    tokens_per_s = self.log_window(window, stop)
                    window = _LogWindow()
                metrics = self.validate_and_save(stop, metrics)
        if self.patience_spent() and self.rank == 0:
            console.print(
                f"early stop at step {self.step:,}: no better {self.tc.best_metric} in {self.tc.patience} "
                f"validations since {self.best['tag']}"
            )
        return {
            "step": self.step,
            "stopped_early": self.patience_spent(),
            "plan": plan,
            "seconds": time.perf_counter() - started,
            "losses": losses,
            "valid": metrics,
            "probe": self._probe(),
            "tokens_per_s": tokens_per_s,
        }

    def train_step(self, stream: Iterator[tuple[DataPosition, Any]]) -> StepStats:
        """One optimizer step: this rank's ``grad_accum`` micro batches forward and backward (the
        engine steps the optimizer after the last), the expert load added up for the next
        validation; returns the step's statistics reduced over ranks. A private run's step is
        :meth:`private_step`."""
        if self.privacy is not None:
            return self.private_step(stream)
        position, micro = next(stream)
        stats = StepStats()
        if self.tc.negatives_per_step:  # the same seed on every rank: one draw for the global batch
            self.engine.module.draw_negatives_from(self.tc.seed * 1_000_003 + self.step)
        for mb in micro:
            out = self.engine(**{k: v.to(self.device) for k, v in mb.items()})
            self.engine.backward(out.loss)
            self.engine.step()
            stats += StepStats.of_micro_batch(out, mb)
            if out.expert_load is not None:
                self.expert_load += out.expert_load.detach().float().cpu()
        self.step, self.position = self.step + 1, position
        return stats.reduced(self.world_size * self.tc.grad_accum)

    def private_step(self, stream: Iterator[tuple[DataPosition, Any]]) -> StepStats:
        """One step of user-level DP (:mod:`moe_rec.train.privacy`): this rank's sampled users one
        at a time (forward, gradient, clip to ``max_grad_norm``), noise on rank 0, the result
        handed to the engine through a surrogate loss whose gradient it is, then the optimizer
        step. The statistics are means over the step's users."""
        from moe_rec.train.privacy import surrogate_loss, trainable

        position, users = next(stream)
        stats = StepStats()

        def record(out: Any, batch: dict[str, torch.Tensor]) -> None:
            nonlocal stats
            stats += StepStats.of_micro_batch(out, batch)
            if out.expert_load is not None:
                self.expert_load += out.expert_load.detach().float().cpu()

        params = trainable(self.engine.module)
        batches = ({k: v.to(self.device) for k, v in b.items()} for b in users.batches)
        grads, norms = self.privacy.gradient(self.engine.module, params, batches, self.step, record)
        self.engine.backward(surrogate_loss(params, grads))
        self.engine.step()
        clipped = sum(n > self.tc.privacy.max_grad_norm for n in norms)
        self.user_norms += torch.tensor([sum(norms), clipped, len(norms)], dtype=torch.float64)
        self.step, self.position = self.step + 1, position
        return stats.reduced(max(users.sampled, 1))

    def privacy_plan(self) -> str:
        """One line for the log: the private run's users, sampling rate, noise and planned epsilon."""
        dp, data = self.privacy, self.data
        how = f"target {dp.cfg.target_epsilon:g}" if dp.cfg.target_epsilon else "given"
        return (
            f"user-level DP: {data.users:,} users, each in a step with q {data.sample_rate:.4g} ({data.expected_users:.1f} "
            f"expected), <= {dp.cfg.max_windows_per_user} windows each, clip C {dp.cfg.max_grad_norm:g}, noise sigma "
            f"{dp.noise_multiplier:.4g} ({how}); epsilon {dp.planned_epsilon():.3g} at delta {dp.delta:.3g} after "
            f"{self.total_steps:,} steps ({dp.cfg.accountant}, Opacus)"
        )

    def log_window(self, window: _LogWindow, stop: int) -> float:
        """Log the window's mean losses, the LR, the gradient norm and throughput (rank 0 prints a
        line); returns tokens per second over the window."""
        engine = self.engine
        mean = window.stats.mean(window.steps)
        tokens_per_s = window.stats.tokens / window.seconds
        fpt = flops_per_token(
            self.model_config,
            self.params["active_per_token"],
            window.stats.token_length / window.stats.tokens,
        )
        log = {
            "train/loss": mean.loss,
            "train/lm_loss": mean.lm_loss,
            "train/aux_loss": mean.aux_loss,
            "train/load_balancing_loss": mean.load_balancing_loss,
            "train/z_loss": mean.z_loss,
            "train/router_entropy": mean.router_entropy,
            "train/lr": engine.get_lr()[0],
            "train/grad_norm": _item(engine.get_global_grad_norm()),
            "perf/tokens_per_s": tokens_per_s,
            "perf/step_seconds": window.seconds / window.steps,
            "perf/tflops_per_device": fpt * tokens_per_s / self.world_size / 1e12,
            "train/epoch": self.position.epoch,
        }
        if self.peak_flops is not None:
            log["perf/mfu"] = fpt * tokens_per_s / self.world_size / self.peak_flops
        if mean.text_batches:  # the narrative loss, over the micro batches that had one
            log["train/text_loss"] = mean.text_loss / mean.text_batches
        spent = {}
        if self.privacy is not None:  # epsilon so far, and the users' gradient norms before clipping
            all_reduce_(self.user_norms)
            total, clipped, users = self.user_norms.tolist()
            spent = self.privacy.log_values()
            log.update(spent, **{"privacy/user_grad_norm": total / max(users, 1),
                                 "privacy/clipped_share": clipped / max(users, 1)})  # fmt: skip
            self.user_norms.zero_()
        self.logger.log(log, self.step, kind="train")
        if self.rank == 0:
            console.print(
                f"step {self.step}/{stop}  loss {log['train/loss']:.4f}  lm {log['train/lm_loss']:.4f}  "
                + (f"text {log['train/text_loss']:.4f}  " if "train/text_loss" in log else "")
                + f"lr {log['train/lr']:.2e}  grad {log['train/grad_norm']:.2f}  {tokens_per_s:,.0f} tok/s"
                + _epsilon(spent)
            )
        return tokens_per_s

    def validate_and_save(self, stop: int, metrics: dict[str, float]) -> dict[str, float]:
        """The cadence after a step: validate every ``eval_every`` steps and at the last step of
        the run (logging the expert load first, and saving at once when ``best_metric`` improves),
        checkpoint every ``save_every`` steps and at ``stop``. Returns the newest validation
        metrics (``metrics``, the previous ones, when this step did not validate)."""
        tc = self.tc
        evaluating = (tc.eval_every and self.step % tc.eval_every == 0) or self.step == self.total_steps
        if evaluating:
            all_reduce_(self.expert_load)
            self.logger.log_expert_load(self.expert_load, self.vocab.services, self.step)
            self.expert_load.zero_()
            metrics = self.validate()
            if metrics.get(tc.best_metric, -math.inf) > self.best["value"]:
                self.save(metrics)
        if self.step % tc.save_every == 0 or self.step == stop or self.patience_spent():
            self.save(metrics if evaluating else None)
        return metrics

    def patience_spent(self) -> bool:
        """Early stopping (``train.patience``): this step validated, and the ``patience`` validations
        before it and including it found nothing better than the best checkpoint."""
        tc = self.tc
        if not (tc.patience and tc.eval_every) or self.step % tc.eval_every:
            return False
        best_step = int(self.best["tag"].removeprefix("step_")) if self.best["tag"] else 0
        return self.step - best_step >= tc.patience * tc.eval_every


class _NullBar:
    """The progress bar of ranks other than 0."""

    def __enter__(self) -> _NullBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        return None


def _epsilon(spent: dict[str, float]) -> str:
    """``"  epsilon 1.23 (delta 1e-05)"`` of a private run's log values; ``""`` without."""
    if not spent:
        return ""
    return f"  epsilon {spent['privacy/epsilon']:.3g} (delta {spent['privacy/delta']:.3g})"


def _item(x: torch.Tensor | float | None) -> float:
    if x is None:
        return 0.0
    return x.item() if isinstance(x, torch.Tensor) else float(x)


def train(cfg: TrainInputs) -> dict[str, Any]:
    """Train ``cfg`` on this rank (resuming per ``train.resume``); returns a summary dict."""
    trainer = Trainer(cfg)
    try:
        trainer.resume()
        summary = trainer.fit()
        if trainer.privacy is not None:  # the final (epsilon, delta) in the W&B run's summary
            trainer.logger.summarize({**trainer.privacy.log_values(), "privacy/steps": trainer.step})
    finally:
        trainer.logger.finish()
    summary.update(
        checkpoint=str(cfg.checkpoint_dir / ckpt.tag_for(trainer.step)),
        best=trainer.best,
        wandb=trainer.logger.location(),
        metrics_jsonl=str(cfg.checkpoint_dir / "metrics.jsonl"),
        rank=trainer.rank,
        world_size=trainer.world_size,
    )
    if trainer.privacy is not None:
        summary["privacy"] = trainer.privacy.record()
    if trainer.rank == 0:
        console.print(f"trained to step {trainer.step:,} in {summary['seconds']:,.0f} s")
        if trainer.privacy is not None:
            record = summary["privacy"]
            console.print(
                f"privacy: ({record['epsilon']:.3g}, {record['delta']:.3g})-DP per user after {record['steps']:,} "
                f"steps ({record['accountant']}, {record['library']}); stored in every checkpoint's {ckpt.STATE_FILE}"
            )
        console.print(f"checkpoint: {summary['checkpoint']} (best: {trainer.best['tag']})")
        console.print(f"W&B: {summary['wandb']}; metrics: {summary['metrics_jsonl']}")
    trainer.engine.destroy()
    return summary
