"""``ServeConfig`` holds every serving default once: the CLI's flags default to it, and a bad value
is refused when the config is made, naming it."""

from __future__ import annotations

from dataclasses import fields

import pytest

from moe_rec.cli import _parser
from moe_rec.serve.config import DEFAULT_K, ServeConfig


def test_the_cli_flags_default_to_the_serve_config() -> None:
    serve = _parser().parse_args(["serve", "BUNDLE"])
    assert ServeConfig(**{f.name: getattr(serve, f.name) for f in fields(ServeConfig)}) == ServeConfig()
    assert _parser().parse_args(["recommend", "BUNDLE", "--service", "s", "--history", "s:i"]).k == DEFAULT_K


@pytest.mark.parametrize(
    "setting, words",
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_k": 0}, "max_k"),
        ({"max_wait_ms": -1.0}, "max_wait_ms"),
        ({"port": 65536}, "port 65536 is invalid"),
        ({"max_body_bytes": 0}, "max_body_bytes"),
        ({"torch_threads": 0}, "torch_threads"),
        ({"log_level": "loud"}, "log_level"),
    ],
)
def test_a_bad_setting_is_refused_by_name(setting: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        ServeConfig(**setting)
