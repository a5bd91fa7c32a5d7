"""The serving stage: :class:`Recommender` answers top-k requests from an export bundle, batching
concurrent requests into one constrained beam search, as a :class:`ServeConfig` says. Never
imports DeepSpeed.

Importing the package is cheap: the names below load their module (and the model) when first used,
so the CLI reads :class:`ServeConfig`'s defaults without loading torch's model stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moe_rec import lazy_getattr

if TYPE_CHECKING:
    from moe_rec.serve.config import ServeConfig
    from moe_rec.serve.recommender import Answer, Recommendation, Recommender
    from moe_rec.serve.request import RequestError

_MODULE_OF = {
    "Answer": "recommender",
    "Recommendation": "recommender",
    "Recommender": "recommender",
    "RequestError": "request",
    "ServeConfig": "config",
}

__getattr__ = lazy_getattr(__name__, _MODULE_OF)


__all__ = ["Answer", "Recommendation", "Recommender", "RequestError", "ServeConfig"]
