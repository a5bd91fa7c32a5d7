"""Fixtures shared by the data tests: the real-data folder and plain-Python checks of the tables.

The checks are handed out as fixtures (functions) so test modules never import this file.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest

from moe_rec.data.schema import ReadReport

REAL_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the project; tests that need it skip when it is absent."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data not found at {REAL_DATA}")
    return REAL_DATA


def _histories(events: pa.Table) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in events.to_pylist():
        out[row["user"], row["service"]].append(row)
    return dict(out)


def _expected_splits(n: int) -> list[str]:
    if n == 1:
        return ["train"]
    if n == 2:
        return ["train", "test"]
    return ["train"] * (n - 2) + ["valid", "test"]


def _assert_balanced(report: ReadReport) -> None:
    assert report.rows_read == report.rows_kept + report.rows_rejected, report.to_dict()


@pytest.fixture(scope="session")
def histories() -> Callable[[pa.Table], dict[tuple[str, str], list[dict]]]:
    """``events -> {(user, service): rows in table order}``."""
    return _histories


@pytest.fixture(scope="session")
def expected_splits() -> Callable[[int], list[str]]:
    """Leave-one-out written out case by case: ``n -> splits`` of an n-event history."""
    return _expected_splits


@pytest.fixture(scope="session")
def assert_balanced() -> Callable[[ReadReport], None]:
    """Nothing lost silently: every row read was kept or rejected."""
    return _assert_balanced
