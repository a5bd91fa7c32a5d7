"""A recommendation request, checked in one place for the Python API and the HTTP service alike.

:class:`RecommendRequest` is the request's shape (types, required fields, no unknown keys, a
non-empty history, ``k >= 1``) and also the HTTP body's OpenAPI schema. What depends on the bundle
(known services and items, ``k <= max_k``) the :class:`~moe_rec.serve.recommender.Recommender`
checks. Either way a bad request is a :class:`RequestError` naming the input at fault.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from moe_rec.errors import MoeRecError
from moe_rec.serve.config import DEFAULT_K

EVENT_KEYS = ("service", "item_id")
MAX_CRITIQUE_CHARS = 500


class RequestError(MoeRecError, ValueError):
    """A bad request. ``field`` names the input at fault, e.g. ``history[3].item_id``, ``service``, ``k``."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class HistoryEvent(BaseModel):
    """One past interaction of the user."""

    model_config = ConfigDict(extra="forbid")
    service: StrictStr = Field(description="the service it happened in", examples=["grocery"])
    item_id: StrictStr = Field(description="the item, unique within its service", examples=["g00004"])


class RecommendRequest(BaseModel):
    """A user's history across services, and what to recommend."""

    model_config = ConfigDict(extra="forbid")
    history: list[HistoryEvent] = Field(
        min_length=1, description="past interactions in every service, oldest first"
    )
    service: StrictStr = Field(description="the service to recommend items of", examples=["marketplace"])
    k: StrictInt = Field(DEFAULT_K, ge=1, description="how many items (at most `max_k`, see /healthz)")
    exclude_seen: StrictBool = Field(True, description="leave out items already in the history")
    user_id: StrictStr | None = Field(
        None, description="the user; hashed to the user bucket of user-routed experts (null: no user)"
    )
    critique: StrictStr | None = Field(
        None,
        max_length=MAX_CRITIQUE_CHARS,
        description='what the user wants changed, in words ("something cheaper", "not this brand"); '
        "needs a bundle trained with critiques",
        examples=["Anything cheaper? Not a fan of that brand."],
    )
    explain: StrictBool = Field(False, description="add a narrative to every item: why it fits, what it is")

    @field_validator("critique")
    @classmethod
    def _has_words(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must hold words (or be null for none)")
        return value


def field_name(loc: Sequence[int | str], root: str = "body") -> str:
    """Pydantic's ``("body", "history", 3, "item_id")`` as ``history[3].item_id`` (``root`` for the
    whole input)."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or root


def parse_request(raw: Any) -> RecommendRequest:
    """A Python caller's request (a mapping of :class:`RecommendRequest`'s fields) checked against
    it. History events may also be ``(service, item_id)`` pairs, and an event mapping's other keys
    are ignored (an HTTP body allows neither).

    Raises:
        RequestError: the first problem, naming its field (``request`` when it is not a mapping).
    """
    if isinstance(raw, Mapping) and isinstance(raw.get("history"), (list, tuple)):
        raw = {**raw, "history": [_event(e) for e in raw["history"]]}
    try:
        return RecommendRequest.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        raise RequestError(field_name(first["loc"], root="request"), first["msg"]) from None


def _event(event: Any) -> Any:
    """A history entry as :class:`HistoryEvent` reads it; anything else is left for it to refuse."""
    if isinstance(event, Mapping):
        return {key: event[key] for key in EVENT_KEYS if key in event}
    if isinstance(event, (tuple, list)) and len(event) == 2:
        return dict(zip(EVENT_KEYS, event))
    return event
