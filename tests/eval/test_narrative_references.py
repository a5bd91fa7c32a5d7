"""Reference narratives and the calibration baselines on hand-made rows."""

from __future__ import annotations

import torch

from moe_rec.eval.narrative_references import (
    held_out_requests,
    nearest_item_narratives,
    users_last_narratives,
)


def test_held_out_requests_pair_each_request_with_its_held_out_reference_in_order() -> None:
    requests = [
        {"user": "u1", "service": "s", "target_item": "a"},
        {"user": "u2", "service": "s", "target_item": "b"},
        {"user": "u3", "service": "t", "target_item": "c"},
        {"user": "u4", "service": "t", "target_item": "d"},
    ]
    references = [
        {"user": "u4", "service": "t", "target_item": "d", "text": "four", "held_out": True},
        {"user": "u1", "service": "s", "target_item": "a", "text": "one", "held_out": False},  # seen family
        {"user": "u2", "service": "s", "target_item": "b", "text": "two", "held_out": True},
        {"user": "u3", "service": "s", "target_item": "c", "text": "other service", "held_out": True},
    ]
    got = held_out_requests(requests, references, limit=10)
    assert [(r["user"], text) for r, text in got] == [("u2", "two"), ("u4", "four")]
    assert [r["user"] for r, _ in held_out_requests(requests, references, limit=1)] == ["u2"]


def test_nearest_item_narratives_stay_in_the_service_and_prefer_the_item_itself() -> None:
    vectors = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [1.0, 0.0], [0.1, 0.9]])
    services = torch.tensor([0, 0, 0, 1, 1])
    train_targets = [2, 1, 1, 4]  # row 1 twice: its first narrative counts
    texts = ["about 2", "about 1", "about 1 again", "about 4"]
    got = nearest_item_narratives([0, 1, 2, 3], train_targets, texts, vectors, services)
    # row 0 is not a training target: row 1 (cos .99) beats row 2 (cos 0); row 3 (service 1) gets
    # row 4, the only one of its service, though row 1 of service 0 is closer
    assert got == ["about 1", "about 1", "about 2", "about 4"]
    assert nearest_item_narratives([0], [4], ["about 4"], vectors, services) == [None]


def test_users_last_narratives_take_the_latest_position_of_the_user_and_service() -> None:
    train = [
        {"user": "u1", "service": "s", "position": 3, "text": "third"},
        {"user": "u1", "service": "s", "position": 7, "text": "seventh"},
        {"user": "u1", "service": "t", "position": 9, "text": "other service"},
        {"user": "u1", "service": "s", "position": 5, "text": "fifth"},
    ]
    requests = [
        {"user": "u1", "service": "s"},
        {"user": "u2", "service": "s"},
        {"user": "u1", "service": "t"},
    ]
    assert users_last_narratives(requests, train) == ["seventh", None, "other service"]
