"""The config of a whole run, composed of each stage's config, and where a run keeps its files.

``configs/experiments/*.yaml`` fill this tree (usually by ``include:``-ing ``configs/data/*`` and
``configs/sid/*``); the CLI loads it with dotted overrides (``data.source=amazon2014``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from moe_rec.baselines.config import SASRecConfig
from moe_rec.data.config import DataConfig
from moe_rec.data.critique_config import CritiqueConfig
from moe_rec.data.sequences import SequenceConfig
from moe_rec.eval.config import EvalConfig
from moe_rec.sid.config import SIDConfig
from moe_rec.train.config import ModelSection, TrainConfig


@dataclass
class ExperimentConfig:
    run_dir: Path = Path("runs/default")  # everything a run writes goes under here
    data: DataConfig = field(default_factory=DataConfig)
    # critiques and narratives from item metadata (`moe-rec run` builds them with critiques.enabled)
    critiques: CritiqueConfig = field(default_factory=CritiqueConfig)
    sid: SIDConfig = field(default_factory=SIDConfig)
    sequences: SequenceConfig = field(default_factory=SequenceConfig)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)  # moe-rec eval --baseline sasrec

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "data"

    @property
    def critiques_dir(self) -> Path:
        return self.run_dir / "critiques"

    @property
    def narratives_dir(self) -> Path:
        return self.run_dir / "narratives"

    @property
    def sid_dir(self) -> Path:
        return self.run_dir / "sids"

    @property
    def sequences_dir(self) -> Path:
        return self.run_dir / "sequences"

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def eval_dir(self) -> Path:
        return self.run_dir / "eval"

    @property
    def embedding_cache(self) -> Path:
        """Embeddings are keyed by model and text, so one cache serves every run."""
        if self.sid.encoder.cache_dir is not None:
            return self.sid.encoder.cache_dir
        root = os.environ.get("MOE_REC_CACHE") or Path.home() / ".cache" / "moe_rec"
        return Path(root) / "embeddings"
