"""tools/expert_load.py: the router row it picks and its distance from the services' mean load,
against a plain loop over hand-written shares."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.tools import load_tool

expert_load = load_tool("expert_load")


def _shares(rng: random.Random, layers: int, services: int, experts: int) -> list:
    out = []
    for _ in range(layers):
        rows = []
        for _ in range(services):
            raw = [rng.random() for _ in range(experts)]
            rows.append([x / sum(raw) for x in raw])
        out.append(rows)
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_specialisation_at_the_best_step_matches_a_plain_loop(
    tmp_path: Path, seed: int, capsys: pytest.CaptureFixture
) -> None:
    rng = random.Random(seed)
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    loads = {step: _shares(rng, 2, 3, 4) for step in (10, 20, 30)}
    lines = [json.dumps({"step": 5, "kind": "train", "train/loss": 1.0})]
    lines += [json.dumps({"step": s, "kind": "router", "services": ["a", "b", "c"], "router/expert_load": v})
              for s, v in loads.items()]  # fmt: skip
    (ckpt / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (ckpt / "best").write_text("step_00000020\n")
    assert expert_load.main([str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 20
    load = loads[20]
    for layer in range(2):
        for s in range(3):
            mean = [sum(load[layer][t][e] for t in range(3)) / 3 for e in range(4)]
            tv = 0.5 * sum(abs(load[layer][s][e] - mean[e]) for e in range(4))
            assert out["specialisation"][layer][s] == pytest.approx(tv, abs=1e-12)
    assert expert_load.main([str(tmp_path), "--step", "30", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 30
    assert expert_load.main([str(tmp_path), "--step", "15"]) == 2
    assert "steps with one: [10, 20, 30]" in capsys.readouterr().err
