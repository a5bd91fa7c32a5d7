"""moe_rec: one generative recommender for several services.

Stages, in data-flow order: ``data`` (read, validate, split, sequences) -> ``sid`` (semantic IDs)
-> ``model`` -> ``train`` / ``eval`` -> ``export`` -> ``serve``. A stage imports only the stages
before it, in this order: ``data``, ``sid``, ``model``, ``eval``, ``baselines``, ``train`` (its
validation ranks with ``eval``), ``export`` (reads ``train``'s checkpoints), ``serve``. Below them
``errors``, ``config`` and ``console``; above them ``experiment`` (every stage's config), ``stages`` and
``cli``. ``tests/test_imports.py`` checks it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__version__ = "0.1.0"


def lazy_getattr(package: str, module_of: dict[str, str]) -> Callable[[str], Any]:
    """A package's module ``__getattr__`` that imports ``name`` from ``package.<module_of[name]>``
    when first used, so importing the package itself stays cheap (PEP 562)."""

    def getattr_(name: str) -> Any:
        if name not in module_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module_of[name]}"), name)

    return getattr_
