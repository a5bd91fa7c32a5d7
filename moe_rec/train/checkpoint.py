"""Checkpoint layout, validation, pruning and consolidation.

``<run_dir>/checkpoints/`` holds one directory per checkpoint, named by its tag (``step_00000100``),
written by ``engine.save_checkpoint`` plus our ``trainer_state.json`` (data position, step, metrics)
and one ``rng_rank<r>.pt`` per rank. ``trainer_state.json`` is written last, so its presence marks
a complete checkpoint; only then is the ``latest`` pointer (a file holding the tag, as DeepSpeed
writes it) moved to it. ``best`` points at the checkpoint with the best validation metric and is
never pruned. Anything inconsistent on resume is a :class:`CheckpointError` naming the file —
a run never silently starts over.

:func:`consolidate` turns any ZeRO stage's shards into one fp32 state dict that
``MoERecForCausalLM.load_state_dict`` accepts (the tied ``lm_head`` restored from the embedding).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_rec.errors import MoeRecError
from moe_rec.model import MoERecConfig, MoERecForCausalLM, MoERecForItemPrediction, model_class

STATE_FILE = "trainer_state.json"
LATEST = "latest"
BEST = "best"
MODEL_CONFIG_FILE = "config.json"  # the MoERecConfig of the checkpointed model
VOCAB_FILE = "vocab.json"  # the token layout it was trained on


class CheckpointError(MoeRecError, ValueError):
    """A checkpoint that is missing, partial or unreadable."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    """The optimizer step of a checkpoint tag (:func:`tag_for` backwards)."""
    try:
        return int(tag.removeprefix("step_"))
    except ValueError:
        raise CheckpointError(f"{tag!r} is not a checkpoint tag (step_XXXXXXXX)") from None


def write_pointer(ckpt_dir: Path, name: str, tag: str) -> None:
    """Atomically point ``<ckpt_dir>/<name>`` at ``tag``."""
    tmp = ckpt_dir / f".{name}.tmp"
    tmp.write_text(tag)
    os.replace(tmp, ckpt_dir / name)


def read_pointer(ckpt_dir: Path, name: str) -> str | None:
    """The tag ``<ckpt_dir>/<name>`` points at, ``None`` when there is no such pointer."""
    path = ckpt_dir / name
    if not path.exists():
        return None
    try:
        tag = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint pointer: {e}") from None
    if not tag:
        raise CheckpointError(f"{path}: empty checkpoint pointer")
    return tag


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rank_state(tag_dir: Path, rank: int) -> None:
    torch.save(rng_state(), tag_dir / f"rng_rank{rank}.pt")


def finish(ckpt_dir: Path, tag: str, state: dict[str, Any]) -> None:
    """Rank 0, after every rank has written its part: record every file's size with the trainer
    state (which marks ``tag`` complete) and point ``latest`` at it."""
    tag_dir = ckpt_dir / tag
    files = {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file()}
    (tag_dir / STATE_FILE).write_text(json.dumps({**state, "files": files}, indent=1))
    write_pointer(ckpt_dir, LATEST, tag)


def verify(ckpt_dir: Path, tag: str, world_size: int) -> dict[str, Any]:
    """Check that checkpoint ``tag`` is complete for ``world_size`` ranks; return its trainer state."""
    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir / LATEST} points at {tag!r}, but {tag_dir} does not exist")
    state_file = tag_dir / STATE_FILE
    if not state_file.exists():
        raise CheckpointError(f"{tag_dir}: partial checkpoint, {STATE_FILE} is missing (interrupted save?)")
    try:
        state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{state_file}: unreadable: {e}") from None
    if state.get("world_size") != world_size:
        raise CheckpointError(
            f"{tag_dir} was written by {state.get('world_size')} ranks; resuming with {world_size} "
            f"would change the data order (start a new run_dir, or consolidate and fine-tune)"
        )
    for name, size in state.get("files", {}).items():
        path = tag_dir / name
        if not path.exists():
            raise CheckpointError(f"{tag_dir}: partial checkpoint, {name} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(f"{tag_dir}: {name} is {path.stat().st_size} bytes, was written as {size}")
    return state


def resume_tag(ckpt_dir: Path) -> str | None:
    """The tag to resume from: ``latest``; ``None`` for a fresh run; an error when checkpoints
    exist without a ``latest`` pointer (ambiguous, so not guessed)."""
    tag = read_pointer(ckpt_dir, LATEST)
    if tag is None and ckpt_dir.is_dir() and any(p.name.startswith("step_") for p in ckpt_dir.iterdir()):
        raise CheckpointError(
            f"{ckpt_dir} holds checkpoints but no '{LATEST}' pointer; write the tag to resume from into "
            f"{ckpt_dir / LATEST} or set train.resume=never with a fresh run_dir"
        )
    return tag


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints, sparing ``best`` and ``latest``."""
    keep = {read_pointer(ckpt_dir, BEST), read_pointer(ckpt_dir, LATEST)}
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and (p / STATE_FILE).exists())
    for tag in tags[:-keep_last]:
        if tag not in keep:
            shutil.rmtree(ckpt_dir / tag)


def resolve_tag(ckpt_dir: Path, tag: str | None = None) -> str:
    """A tag directory's name, given one or a pointer (``latest``, the default, or ``best``)."""
    tag = tag or LATEST
    if tag in (LATEST, BEST):
        pointer = read_pointer(Path(ckpt_dir), tag)
        if pointer is None:
            raise CheckpointError(f"{ckpt_dir}: no '{tag}' pointer")
        tag = pointer
    return tag


def load_model(ckpt_dir: Path, tag: str | None = None) -> MoERecForCausalLM | MoERecForItemPrediction:
    """The checkpointed model (token- or item-level, as its saved config says), consolidated to
    fp32, built from the config saved beside it, in eval mode (no dropout: every caller ranks or
    writes with it)."""
    tag = resolve_tag(ckpt_dir, tag)
    config_file = Path(ckpt_dir) / tag / MODEL_CONFIG_FILE
    if not config_file.exists():
        raise CheckpointError(f"{config_file} is missing: the checkpoint does not say which model it holds")
    config = MoERecConfig.from_json_file(str(config_file))
    model = model_class(config)(config)
    state = consolidate(ckpt_dir, tag)
    if not hasattr(model, "lm_head"):  # the item-level model's heads are tied to the embedding itself
        state.pop("lm_head.weight")
    model.load_state_dict(state)
    return model.eval()


def consolidate(ckpt_dir: Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """One fp32 state dict from a ZeRO checkpoint, with the tied ``lm_head.weight`` filled in so
    ``MoERecForCausalLM.load_state_dict(..., strict=True)`` takes it. ``tag``: a tag directory's
    name or a pointer (``latest``, the default, or ``best``)."""
    if not torch.cuda.is_available():  # as the trainer does; else DeepSpeed warns that it found no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = resolve_tag(ckpt_dir, tag)
    with _quiet():
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    state = {
        k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()
    }  # int buffers stay
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide what DeepSpeed's ``zero_to_fp32`` prints as it works (lines on stdout, where a command's
    results go, and a progress bar per shard on stderr); a warning raised meanwhile is shown after."""
    with warnings.catch_warnings(record=True) as caught:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
