"""The model stage: ``MoERecConfig``, the token-level ``MoERecForCausalLM`` (registered with the Auto
classes: ``AutoConfig`` / ``AutoModelForCausalLM`` resolve ``model_type: moe_rec`` once this is
imported) and the item-level ``MoERecForItemPrediction``; :func:`model_class` picks by config."""

from transformers import AutoConfig, AutoModelForCausalLM

from moe_rec.model.cache import MoERecCache
from moe_rec.model.config import MoERecConfig, build_config
from moe_rec.model.item_model import MoERecForItemPrediction
from moe_rec.model.modeling import MoERecForCausalLM, MoERecModel, parameter_report

AutoConfig.register("moe_rec", MoERecConfig, exist_ok=True)
AutoModelForCausalLM.register(MoERecConfig, MoERecForCausalLM, exist_ok=True)


def model_class(config: MoERecConfig) -> type[MoERecForCausalLM] | type[MoERecForItemPrediction]:
    """The item-level model when the config names code positions (``code_token_ranges``), else the
    token-level one."""
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
