"""Console output shared by the CLI and long steps.

What a command was asked for (its results: metrics, recommendations, stats) goes to stdout,
through :data:`results` or :func:`print_json`; what it is doing (progress bars, log lines,
errors) goes to stderr, through :data:`console`. So ``moe-rec eval ... --json | jq`` works.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

console = Console(stderr=True)  # progress, log lines, errors
results = Console()  # a command's results, on whatever sys.stdout is when it prints


def print_json(data: Any) -> None:
    """``data`` as one JSON document on stdout (a command's ``--json``); a NaN or infinite number
    (a mean over no requests) is written as ``null``, so that any JSON parser reads it."""
    sys.stdout.write(json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def plain(text: str) -> str:
    """``text`` without reST markup (double back-quotes, roles such as :class:), for ``--help``."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return re.sub(r"``([^`]+)``", r"\1", text)


def progress() -> Progress:
    """A progress display with count, elapsed time and ETA (quiet when stderr is not a terminal)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar."""
    with progress() as bar:
        task = bar.add_task(description, total=total if total is not None else _len(items))
        for x in items:
            yield x
            bar.advance(task)


def _len(items: Iterable[object]) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None
