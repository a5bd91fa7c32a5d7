"""The serving stage: :class:`Recommender` answers top-k requests from an export bundle, batching
concurrent requests into one constrained beam search, as a :class:`ServeConfig` says. Never
imports DeepSpeed.

Importing the package is cheap: the names below load their module (and the model) when first used,
so the CLI reads :class:`ServeConfig`'s defaults without loading torch's model stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)


__all__ = ["Answer", "Recommendation", "Recommender", "RequestError", "ServeConfig"]
