"""Readers of each data source. Every reader ends in the same events and catalogue tables
(:mod:`moe_rec.data.histories`); the helpers here are the few steps they all share."""

from __future__ import annotations

from collections.abc import Sequence

from moe_rec.data.schema import DataError, ReadReport


def select_services(source: str, available: Sequence[str], requested: Sequence[str] | None) -> list[str]:
    """The requested services (sorted), or all available ones; an unknown name is a DataError."""
    unknown = sorted(set(requested or ()) - set(available))
    if unknown:
        raise DataError(f"unknown service(s) {unknown} for {source}; available: {list(available)}")
    return sorted(requested) if requested else list(available)


def reject_rows(report: ReadReport, n: int, reason: str, where: str, detail: str) -> None:
    """Count the ``n`` events of one unusable line as read and rejected (strict mode raises)."""
    for _ in range(n):
        report.rows_read += 1
        report.reject(reason, where, detail)
