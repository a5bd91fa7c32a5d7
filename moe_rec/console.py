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
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
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


LOG_EVERY = 60.0  # seconds between the plain progress lines of a log file


class _Progress(Progress):
    """rich's progress display; where stderr is no terminal (a ``nohup`` log), one plain line per
    task at most every ``log_every`` seconds instead (count, elapsed, eta), and a last one when a
    task that logged ends, so a long background step is not silent for its whole run; a hidden task
    (``visible=False``) writes nothing."""

    def __init__(self, *columns: Any, log_every: float, **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self._log_every = log_every
        self._last: dict[TaskID, float] = {}  # task -> when its last line was written
        self._ended: set[TaskID] = set()  # tasks whose last line is written

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)

    def _log(self, task_id: TaskID) -> None:
        task = self._tasks[task_id]
        if not self.disable or not task.visible or task_id in self._ended:
            return  # a bar shows it, it is hidden (e.g. another rank's), or its last line is written
        last = self._last.get(task_id)
        now = time.monotonic()
        due = now - (last if last is not None else task.start_time or now) >= self._log_every
        if not (due or (task.finished and last is not None)):
            return
        self._last[task_id] = now
        if task.finished:
            self._ended.add(task_id)
        share = f" ({100 * task.completed / task.total:.0f} %)" if task.total else ""
        total = f"/{task.total:g}" if task.total is not None else ""
        remaining = task.time_remaining
        eta = f", eta {_clock(remaining)}" if remaining is not None and not task.finished else ""
        console.print(f"{task.description}: {task.completed:g}{total}{share}, {_clock(task.elapsed or 0.0)} "
                      f"elapsed{eta}", markup=False, highlight=False)  # fmt: skip


def _clock(seconds: float) -> str:
    """``seconds`` as h:mm:ss."""
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def progress(log_every: float = LOG_EVERY) -> Progress:
    """A progress display with count, elapsed time and ETA; where stderr is not a terminal, a plain
    line every ``log_every`` seconds instead (see :class:`_Progress`)."""
    return _Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
        log_every=log_every,
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
