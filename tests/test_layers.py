"""Data flows one way: a t5qa module may import only modules ranked before it (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "t5qa"

# Lower rank = earlier stage. The cli package is on top and may import everything.
RANKS = {
    "errors": 0, "config": 1, "data": 2, "encode": 3, "stats": 4, "metrics": 5, "fastpath": 5.5, "modeling": 6, "lora": 6.5,
    "predict": 7, "evaluate": 8, "report": 9, "train": 10, "export": 11, "serve": 12, "tune": 13, "demo": 14,
    "cli": 15,
}
EXEMPT = {"__init__", "__main__", "sample_data", "static"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_t5qa_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("t5qa."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "t5qa":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("t5qa."))
    return found


def _sources() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if _module_name(p) not in EXEMPT)


def test_every_module_has_a_rank():
    unknown = sorted({_module_name(p) for p in _sources()} - set(RANKS))
    assert not unknown, f"add these modules to RANKS and docs/ARCHITECTURE.md: {unknown}"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_only_earlier_stages(path: Path):
    me = _module_name(path)
    later = sorted(
        m for m in _imported_t5qa_modules(path)
        if m in RANKS and m != me and RANKS[m] >= RANKS[me] and m != "__version__"
    )
    assert not later, f"{path.name} ({me}, rank {RANKS[me]}) imports later stages: {later}"


def test_checker_detects_a_backward_import(tmp_path: Path):
    bad = tmp_path / "x.py"
    bad.write_text("from t5qa.train import fit\nimport t5qa.serve\n", encoding="utf-8")
    assert _imported_t5qa_modules(bad) == {"train", "serve"}
