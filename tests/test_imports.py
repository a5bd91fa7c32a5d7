"""Stage order: a ``moe_rec`` module imports only its own stage and the stages before it (the order
is in ``moe_rec/__init__.py``). Imports inside functions and under ``TYPE_CHECKING`` count too: a
cycle hidden there still ties two stages together. Read from the source with ``ast``, nothing is
imported."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import moe_rec

ROOT = Path(moe_rec.__file__).parent
# Lowest first; the package itself (its version) is below everything. config and console are the
# helpers of every stage; eval precedes train, whose validation ranks items with eval's code;
# experiment, stages and cli compose every stage, so no stage imports them.
ORDER = ["moe_rec", "errors", "config", "console", "data", "sid", "model", "eval", "baselines", "train", "export",
         "serve", "experiment", "stages", "cli"]  # fmt: skip


def _stage(module: str) -> str:
    """``moe_rec.eval.exact`` -> ``eval``; ``moe_rec`` -> ``moe_rec``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, module)`` of every ``moe_rec`` module ``path`` imports, wherever the import is."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}:{node.lineno}: a relative import; moe_rec imports absolutely"
            # `from moe_rec import cli` imports the module moe_rec.cli
            names = [f"{node.module}.{a.name}" if _is_module(f"{node.module}.{a.name}") else node.module
                     for a in node.names]  # fmt: skip
        else:
            continue
        yield from ((node.lineno, name) for name in names if name.split(".")[0] == "moe_rec")


def _is_module(name: str) -> bool:
    path = ROOT.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _sources() -> list[Path]:
    """Every module but ``__main__`` ones: run as scripts (launchers), never imported."""
    return [p for p in sorted(ROOT.rglob("*.py")) if p.name != "__main__.py"]


def test_every_stage_has_a_place_in_the_order() -> None:
    assert {_stage(_module(p)) for p in _sources()} == set(ORDER)


def test_no_stage_imports_a_later_stage() -> None:
    rank = {stage: i for i, stage in enumerate(ORDER)}
    wrong = []
    for path in _sources():
        here = _stage(_module(path))
        for line, module in _imports(path):
            if rank[_stage(module)] > rank[here]:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line} ({here}) imports {module}")
    assert not wrong, "later stages imported:\n" + "\n".join(wrong)
