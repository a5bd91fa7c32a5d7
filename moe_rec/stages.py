"""Which steps of ``moe-rec run`` a rerun can skip.

The data-building commands (``data prepare``, ``sids build``, ``sequences build``) write a stamp
into their output directory when they finish: the fingerprint of what made the output, that
is its config section, the fingerprint of the stage before it, and for the data stage the size
and modification time of every source file. ``moe-rec run`` skips a stage whose stamp matches
the fingerprint it would write now, so a rerun with the same config goes straight to training
(which resumes from its latest checkpoint), and a change reruns that stage and every one after
it. A stage killed half-way leaves no stamp (the stamp goes last), so it is redone. Evaluation and
export take seconds and always run.
"""

from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path
from typing import Any

from moe_rec.config import to_dict
from moe_rec.data.config import DataConfig
from moe_rec.experiment import ExperimentConfig

STAMP_FILE = "stage.json"


def fingerprint(*parts: Any) -> str:
    """sha256 of the JSON of ``parts`` (configs as plain data, upstream fingerprints, file stats)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def source_files(data: DataConfig) -> list[list[Any]]:
    """``[path, size, mtime_ns]`` of every file the data stage reads (none for synthetic data)."""
    if data.source == "files":
        paths = [
            Path(p) for pattern in (*data.files.events, *data.files.catalogue) for p in glob.glob(pattern)
        ]
    elif data.path is not None and Path(data.path).is_dir():
        paths = [p for p in Path(data.path).rglob("*") if p.is_file()]
    else:
        paths = []
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(paths)]


def read(out_dir: Path) -> str | None:
    """The fingerprint stamped into ``out_dir``, or None (no stamp, or an unreadable one)."""
    try:
        return json.loads((Path(out_dir) / STAMP_FILE).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def mark(out_dir: Path, print_: str) -> None:
    """Stamp ``out_dir`` as made by ``print_`` (call once the stage has finished)."""
    (Path(out_dir) / STAMP_FILE).write_text(json.dumps({"fingerprint": print_}) + "\n")


def data_print(cfg: ExperimentConfig) -> str:
    """What ``data prepare`` output depends on: the data config and the source files."""
    return fingerprint("data", to_dict(cfg.data), source_files(cfg.data))


def sids_print(cfg: ExperimentConfig, data_dir: Path) -> str:
    """What ``sids build`` output depends on: the SID config (less where embeddings are cached)
    and the prepared data it read."""
    sid = to_dict(cfg.sid)
    sid["encoder"].pop("cache_dir", None)
    return fingerprint("sids", sid, read(data_dir))


def sequences_print(cfg: ExperimentConfig) -> str:
    """What ``sequences build`` output depends on: its config, the data and the semantic IDs. The
    privacy audit's keys are left out while off, so runs stamped before they existed keep their stamp."""
    seq = to_dict(cfg.sequences)
    if not seq["holdout_users"]:
        del seq["holdout_users"]
    if not seq["canaries"]["count"]:
        del seq["canaries"]
    return fingerprint("sequences", seq, read(cfg.data_dir), read(cfg.sid_dir))
