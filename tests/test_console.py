"""Console helpers: --json output any JSON parser reads, and docstrings shown as plain text in --help."""

import json

import pytest

from moe_rec.console import plain, print_json


def test_print_json_writes_one_strict_document(capsys: pytest.CaptureFixture) -> None:
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    print_json(
        {"test/ndcg@10": 0.25, "test/macro/ndcg@10": float("nan"), "ranks": [1.0, float("inf")], "n": 3}
    )
    out, err = capsys.readouterr()
    assert json.loads(out, parse_constant=refuse) == {
        "test/ndcg@10": 0.25, "test/macro/ndcg@10": None, "ranks": [1.0, None], "n": 3,
    }  # fmt: skip
    assert err == ""


def test_plain_drops_rest_markup() -> None:
    text = "The ``moe-rec`` CLI raises :class:`~moe_rec.errors.MoeRecError` via :func:`main` (``key=value``)."
    assert plain(text) == "The moe-rec CLI raises moe_rec.errors.MoeRecError via main (key=value)."
