"""The model stage: ``MoERecConfig``, the token-level ``MoERecForCausalLM`` (registered with the Auto
classes: ``AutoConfig`` / ``AutoModelForCausalLM`` resolve ``model_type: moe_rec`` once it is
imported) and the item-level ``MoERecForItemPrediction``; :func:`model_class` picks by config.

Importing the package is cheap: the names below load their module (and ``transformers``) when
first used, so a config can name the choices of :mod:`moe_rec.model.choices` without the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moe_rec import lazy_getattr

if TYPE_CHECKING:
    from moe_rec.model.cache import MoERecCache
    from moe_rec.model.config import MoERecConfig, build_config
    from moe_rec.model.item_model import MoERecForItemPrediction
    from moe_rec.model.modeling import MoERecForCausalLM, MoERecModel, parameter_report

_MODULE_OF = {
    "MoERecCache": "cache",
    "MoERecConfig": "config",
    "build_config": "config",
    "MoERecForItemPrediction": "item_model",
    "MoERecForCausalLM": "modeling",
    "MoERecModel": "modeling",
    "parameter_report": "modeling",
}

__getattr__ = lazy_getattr(__name__, _MODULE_OF)


def model_class(config: MoERecConfig) -> type[MoERecForCausalLM] | type[MoERecForItemPrediction]:
    """The item-level model when the config names code positions (``code_token_ranges``), else the
    token-level one."""
    from moe_rec.model.item_model import MoERecForItemPrediction
    from moe_rec.model.modeling import MoERecForCausalLM

    return MoERecForItemPrediction if config.code_token_ranges else MoERecForCausalLM


__all__ = [
    "MoERecCache",
    "MoERecConfig",
    "MoERecForCausalLM",
    "MoERecForItemPrediction",
    "MoERecModel",
    "build_config",
    "model_class",
    "parameter_report",
]
