"""tools/compare_predictions.py: each request's NDCG@k from saved predictions, grouped by the user's
services, the target's training events and the user's history, against a hand count."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.tools import TOOLS, load_tool

TOOL = TOOLS / "compare_predictions.py"


def _events(tmp_path: Path) -> Path:
    rows = []
    # u1: beauty only, 3 training events (item x twice across users); u2: beauty and toys
    for user, service, items in (
        ("u1", "beauty", ["x", "y", "z"]),
        ("u2", "beauty", ["x"] * 6),
        ("u2", "toys", ["t"]),
    ):
        rows += [{"user": user, "service": service, "item_id": i, "split": "train"} for i in items]
        rows += [{"user": user, "service": service, "item_id": "v", "split": "valid"},
                 {"user": user, "service": service, "item_id": "x", "split": "test"}]  # fmt: skip
    path = tmp_path / "events"
    path.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), path / "part-00000.parquet")
    return path


def _predictions(path: Path, ranked: dict[tuple[str, str], list[str]]) -> Path:
    with path.open("w") as f:
        for i, ((user, service), items) in enumerate(ranked.items()):
            f.write(
                json.dumps({"request": i, "user": user, "service": service, "target": "x", "ranked": items})
                + "\n"
            )
    return path


def test_groups_hold_the_mean_ndcg_of_their_requests(tmp_path: Path) -> None:
    tool = load_tool("compare_predictions")
    a = _predictions(tmp_path / "a.jsonl", {("u1", "beauty"): ["q", "x"], ("u2", "beauty"): ["x"],
                                            ("u2", "toys"): ["t", "q", "r"]})  # fmt: skip
    b = _predictions(tmp_path / "b.jsonl", {("u1", "beauty"): ["x"], ("u2", "beauty"): ["q", "r", "x"]})
    got_a, got_b = tool.read_predictions(a, k=2), tool.read_predictions(b, k=2)
    assert got_a[("u1", "beauty", "x")] == pytest.approx(1 / math.log2(3))
    assert got_a[("u2", "toys", "x")] == 0.0 and got_b[("u2", "beauty", "x")] == 0.0  # past k = 2
    events = pq.read_table(_events(tmp_path)).to_pylist()
    groups = tool.groupings(events)
    by_services = tool.compare(got_a, got_b, groups["services of the user"])
    # u2's toys request is in A only: left out
    assert by_services == {"beauty": {"1": (1, pytest.approx(1 / math.log2(3)), 1.0), "2": (1, 1.0, 0.0)}}
    # x has 1 + 6 beauty training events (5-19); u1 has 3 beauty training events, u2 six
    assert tool.compare(got_a, got_b, groups["target's training events"]) == {
        "beauty": {"5-19": (2, pytest.approx((1 / math.log2(3) + 1) / 2), 0.5)}
    }
    assert set(tool.compare(got_a, got_b, groups["user's training events in the service"])["beauty"]) == {
        "1-4",
        "5-9",
    }

    out = subprocess.run([sys.executable, str(TOOL), "--events", str(tmp_path / "events"), "--a", str(a),
                          "--b", str(b), "--k", "2"], capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "only in A 1" in out and "1: 1 0.6309 / 1.0000 (-37 %)" in out


def test_a_malformed_line_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user": "u", "service": "s", "target": "x", "ranked": []}\n{"user": "u"}\n')
    out = subprocess.run([sys.executable, str(TOOL), "--events", str(_events(tmp_path)), "--a", str(bad),
                          "--b", str(bad)], capture_output=True, text=True)  # fmt: skip
    assert out.returncode != 0 and f"{bad}:2: not a prediction row" in out.stderr
