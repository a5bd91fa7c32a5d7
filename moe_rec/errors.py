"""The base of every error moe_rec raises for input a user can fix (a config, data, a checkpoint or
bundle, a request), as opposed to a bug.

``moe-rec`` reports a :class:`MoeRecError` in one line with exit code 2 and lets any other
exception show its traceback, so each stage's own error class derives from it as well as from
the built-in it always was (``ValueError``, ``LookupError``), which callers may still catch.
"""

from __future__ import annotations


class MoeRecError(Exception):
    """Bad input; the message says what is wrong and where."""
