"""tools/context_share.py: requests that see fewer of their service's events than a one-service
model, counted on hand-made histories against a hand count, interleaved and asked_last."""

from __future__ import annotations

import subprocess
import sys

from moe_rec.data.sequences import SequenceBuilder, SequenceConfig, build_samples
from tests.data.test_sequences import CODES, ROWS, VOCAB, _table
from tests.tools import TOOLS, load_tool


def test_a_shared_cap_is_counted_and_asked_last_loses_nothing() -> None:
    tool = load_tool("context_share")
    table = _table([r for r in ROWS if r[0] == "u"])  # u: a1..a4, b1..b3, no timestamps
    history = tool.own_history(table.to_pylist(), "test")
    assert history[("u", "a")] == 3 and history[("u", "b")] == 2  # train + valid before the test
    found = {}
    for order in ("interleave", "asked_last"):
        builder = SequenceBuilder(VOCAB, CODES, SequenceConfig(max_events=2, order=order))
        requests = list(build_samples(table, builder, "test"))
        found[order] = tool.missing(requests, history, VOCAB, max_events=2)
    # interleaved, the last 2 of a1 b1 a2 b2 are a2 b2: b's request sees 1 of its 2 events
    assert found["interleave"] == {"a": (1, 0, 0), "b": (1, 1, 1)}
    assert found["asked_last"] == {"a": (1, 0, 0), "b": (1, 0, 0)}


def test_a_run_without_sequences_is_a_clear_error(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, str(TOOLS / "context_share.py"), str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 2 and "sequences build" in done.stderr
