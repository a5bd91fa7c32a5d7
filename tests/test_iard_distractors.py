"""tools/iard_distractors.py: which seeker turns become distractor sentences, on hand-made
dialogues and, when ../shared/data is present, on the real IARD file against the held-out
families' templates read with a plain loop."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from moe_rec.data.wording import CRITIQUE_FAMILIES
from tests.tools import load_tool

IARD = Path(__file__).resolve().parents[2] / "shared" / "data" / "iard" / "iard.json"


def _turn(role: str, text: str, *intents: str) -> dict:
    return {"role": role, "utterance_text": text, "sub-intent/action": list(intents)}


def test_small_talk_is_kept_and_asks_mentions_and_held_out_wording_are_not(tmp_path: Path) -> None:
    tool = load_tool("iard_distractors")
    turns = [
        _turn("seeker", "Hi there, can you help me?", "OTH", "IQU"),
        _turn("seeker", "Too scary for me.", "CRI-F"),  # a critique
        _turn("recommender", "How about a comedy then?", "OTH"),
        _turn("seeker", "I loved @123 <Up (2009)> so much", "ACC"),
        _turn("seeker", "Now a bigger size would be nice", "OTH"),  # "now a bigger": seen_it's wording
        _turn("seeker", "I have seen that one before", "OTH"),
        _turn("seeker", "HI THERE, CAN YOU HELP ME?", "OTH"),
        _turn("seeker", "Thanks a lot!... Bye now", "ACC", "OTH"),
        _turn("seeker", "Ok", "OTH"),
    ]
    dialogues = {"d1": {"dialogue_info": {f"S{i}": t for i, t in enumerate(turns)}}}
    path, out = tmp_path / "iard.json", tmp_path / "out" / "small-talk.txt"
    path.write_text(json.dumps(dialogues))
    counts = tool.main(["--iard", str(path), "--out", str(out)])
    assert out.read_text().splitlines() == ["Hi there, can you help me?", "Thanks a lot!", "Bye now"]
    assert counts == {"seeker_turns": 8, "other_intent": 1, "movie_mention": 1, "held_out_overlap": 1,
                      "excluded_word": 1, "duplicate": 1, "length": 1, "kept": 3}  # fmt: skip
    with pytest.raises(SystemExit, match="unknown famil"):
        tool.main(["--iard", str(path), "--out", str(out), "--held-out", "no_such_family"])
    path.write_text("{}}")
    with pytest.raises(SystemExit, match="iard.json"):
        tool.main(["--iard", str(path), "--out", str(out)])


@pytest.mark.skipif(not IARD.exists(), reason="../shared/data/iard is not on this machine")
def test_real_dialogues_share_no_three_words_with_a_held_out_family(tmp_path: Path) -> None:
    tool = load_tool("iard_distractors")
    out = tmp_path / "small-talk.txt"
    tool.main(["--iard", str(IARD), "--out", str(out)])
    sentences = out.read_text().splitlines()
    assert len(sentences) > 200
    templates = []
    for name in ("seen_it", "terse"):
        f = CRITIQUE_FAMILIES[name]
        templates += [*f.openers, *f.closers, *(t for ts in f.clauses.values() for t in ts)]
    words = [re.findall(r"[a-z']+", re.sub(r"\{\w+\}", " ", t.lower())) for t in templates]
    for sentence in sentences:
        mine = re.findall(r"[a-z']+", sentence.lower())
        for w in words:
            for i in range(len(w) - 2):
                for j in range(len(mine) - 2):
                    assert mine[j : j + 3] != w[i : i + 3], (sentence, w)
