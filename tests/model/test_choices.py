"""The router modes, MoE backends and model sizes are listed once (``moe_rec.model.choices``): the
size table, the backend dispatch and the experiment config all take theirs from there, and the
config reads them without loading the model."""

from __future__ import annotations

import subprocess
import sys
import typing

from moe_rec.model import build_config
from moe_rec.model.choices import MODEL_SIZES, MOE_BACKENDS, ROUTER_MODES, ModelSize, MoEBackend, RouterMode
from moe_rec.model.config import SIZES
from moe_rec.model.moe import _BACKENDS
from moe_rec.train.config import ModelSection


def test_every_listed_size_and_backend_has_its_implementation() -> None:
    assert tuple(SIZES) == MODEL_SIZES
    assert tuple(_BACKENDS) == MOE_BACKENDS
    for size in MODEL_SIZES:
        for mode in ROUTER_MODES:
            assert build_config(size, router_mode=mode).router_mode == mode


def test_the_model_section_offers_the_same_choices() -> None:
    hints = typing.get_type_hints(ModelSection)
    assert (hints["size"], hints["router_mode"], hints["moe_backend"]) == (ModelSize, RouterMode, MoEBackend)


def test_loading_an_experiment_config_does_not_load_the_model() -> None:
    code = (
        "import sys\n"
        "from moe_rec.config import load_config\n"
        "from moe_rec.experiment import ExperimentConfig\n"
        "load_config(ExperimentConfig, None, ['model.size=small', 'model.router_mode=token'])\n"
        "assert 'transformers' not in sys.modules and 'moe_rec.model.modeling' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
