"""The serving stage: :class:`Recommender` answers top-k requests from an export bundle, batching
concurrent requests into one constrained beam search. Never imports DeepSpeed."""

from moe_rec.serve.recommender import Recommendation, Recommender, RequestError

__all__ = ["Recommendation", "Recommender", "RequestError"]
