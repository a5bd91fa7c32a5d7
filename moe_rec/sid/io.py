"""Files of the semantic-ID stage: atomic writes, checksummed tensors and JSON, one clear error.

Every artefact of this stage (embedding cache shards, the SID table, the trie, the quantiser) is
written to a temporary file and renamed into place, so a crash never leaves half a file under the
real name. Tensor files carry the sha256 of every tensor in their header and are verified on
load, so a damaged file raises :class:`SIDFileError` instead of handing back wrong numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from moe_rec.errors import MoeRecError


class SIDFileError(MoeRecError, ValueError):
    """A missing, unreadable or corrupt file of the semantic-ID stage (names the file)."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        super().__init__(f"{path}: {problem}")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, else remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tensor_digest(t: torch.Tensor) -> str:
    return sha256_bytes(t.contiguous().view(torch.uint8).numpy().data) if t.numel() else sha256_bytes(b"")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write CPU tensors and JSON-able ``meta`` to a safetensors file, atomically, with checksums."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {
        "meta": json.dumps(meta, sort_keys=True),
        "sha256": json.dumps({k: _tensor_digest(v) for k, v in tensors.items()}, sort_keys=True),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def load_tensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors`, verify every checksum; ``what`` names it in errors."""
    path = Path(path)
    if not path.exists():
        raise SIDFileError(path, f"{what} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        meta = json.loads(header["meta"])
        digests = json.loads(header["sha256"])
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise SIDFileError(path, f"{what} is unreadable or corrupt ({e}); rebuild it") from None
    if set(digests) != set(tensors):
        raise SIDFileError(
            path, f"{what} is corrupt (tensors {sorted(tensors)} vs {sorted(digests)}); rebuild it"
        )
    for name, t in tensors.items():
        if _tensor_digest(t) != digests[name]:
            raise SIDFileError(path, f"{what} is corrupt (checksum of {name!r} does not match); rebuild it")
    return tensors, meta


def write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def read_json(path: Path, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise SIDFileError(path, f"{what} not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SIDFileError(path, f"{what} is not valid JSON ({e}); rebuild it") from None
    if not isinstance(data, dict):
        raise SIDFileError(path, f"{what} must hold a JSON object")
    return data
