"""Config of the evaluation stage (kept apart from the evaluator so loading a config stays cheap)."""

from __future__ import annotations

from dataclasses import dataclass

from moe_rec.eval.metrics import DEFAULT_KS


@dataclass
class EvalConfig:
    split: str = "test"  # test | valid
    beam_width: int = 20  # beams = items ranked per request (>= the largest K)
    batch_size: int = 128  # requests per beam search (similar history lengths batched together)
    exclude_seen: bool = False  # drop items already in the request's history of that service
    max_samples: int = 0  # evaluate the first N requests only (0: all)
    filter_depth: int = 200  # critique eval: the rule filter reorders this many items of the plain ranking
    # critique eval: a critique request's scores without it count this many times beside its own
    # (default: the model's model.overrides.critique_plain_weight)
    critique_plain_weight: float | None = None

    def __post_init__(self) -> None:
        if self.split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {self.split!r}")
        if self.beam_width < max(DEFAULT_KS):
            raise ValueError(
                f"beam_width={self.beam_width} < {max(DEFAULT_KS)}: Recall@{max(DEFAULT_KS)} needs as many"
            )
        if self.batch_size < 1 or self.max_samples < 0:
            raise ValueError("batch_size >= 1 and max_samples >= 0 are required")
        if self.filter_depth < 10:  # the critique evaluation scores the top 10 (eval.critiques.KS)
            raise ValueError(f"filter_depth={self.filter_depth} < 10: the rule filter must reach the top 10")
        if self.critique_plain_weight is not None and self.critique_plain_weight < 0:
            raise ValueError(f"critique_plain_weight={self.critique_plain_weight} must be >= 0")
