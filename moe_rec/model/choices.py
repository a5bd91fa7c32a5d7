"""The names a model config picks from, each list written once: router modes, MoE backends and
model sizes.

This module imports nothing but ``typing``, so the experiment config validates ``model.size``,
``model.router_mode`` and ``model.moe_backend`` against these without loading the model.
"""

from __future__ import annotations

from typing import Literal, get_args

RouterMode = Literal["token", "domain", "domain_user"]  # the signals the router reads (router.py)
MoEBackend = Literal["loop", "grouped_mm", "megablocks"]  # how the routed experts run (moe.py)
ModelSize = Literal["tiny", "small", "base"]  # the named builders (config.py: SIZES)

ROUTER_MODES: tuple[str, ...] = get_args(RouterMode)
MOE_BACKENDS: tuple[str, ...] = get_args(MoEBackend)
MODEL_SIZES: tuple[str, ...] = get_args(ModelSize)
