"""Console helpers: --json output any JSON parser reads, and docstrings shown as plain text in --help."""

import json

import pytest

from moe_rec.console import plain, print_json, progress, track


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


def test_progress_writes_plain_lines_where_stderr_is_no_terminal(capsys: pytest.CaptureFixture) -> None:
    """Under pytest stderr is captured, as in a nohup log: with no wait between lines every step
    writes its count and the end writes the last one; with a long wait, or for a hidden task,
    nothing is written."""
    with progress(log_every=0.0) as bar:
        task = bar.add_task("reading", total=3)
        for _ in range(3):
            bar.advance(task)
        bar.advance(task)  # past the end: no second last line
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "reading: 1/3 (33 %)",
        "reading: 2/3 (67 %)",
        "reading: 3/3 (100 %)",
    ]
    assert "eta" not in lines[-1] and lines[-1].endswith("elapsed")  # an eta only while it runs
    assert list(track(range(4), "quiet")) == [0, 1, 2, 3]
    with progress(log_every=0.0) as bar:
        task = bar.add_task("hidden", total=2, visible=False)
        bar.advance(task, 2)
    assert capsys.readouterr().err == ""
