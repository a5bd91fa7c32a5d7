"""The model stage: ``MoERecConfig`` and ``MoERecForCausalLM``, registered with the Auto classes
(``AutoConfig`` / ``AutoModelForCausalLM`` resolve ``model_type: moe_rec`` once this is imported)."""

from transformers import AutoConfig, AutoModelForCausalLM

from moe_rec.model.cache import MoERecCache
from moe_rec.model.config import MoERecConfig, build_config
from moe_rec.model.modeling import MoERecForCausalLM, MoERecModel, parameter_report

AutoConfig.register("moe_rec", MoERecConfig, exist_ok=True)
AutoModelForCausalLM.register(MoERecConfig, MoERecForCausalLM, exist_ok=True)

__all__ = [
    "MoERecCache",
    "MoERecConfig",
    "MoERecForCausalLM",
    "MoERecModel",
    "build_config",
    "parameter_report",
]
