"""Data flows one way: a t5qa module may import only modules ranked before it (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "t5qa"

# Lower rank = earlier stage. The cli package is on top and may import everything.
RANKS = {
    "errors": 0, "config": 1, "rundir": 2, "shards": 2, "data": 3, "encode": 4, "encode_cache": 5, "stream": 5, "stats": 5, "metrics": 6, "noanswer": 6, "grounding": 6, "analysis": 7,
    "fastpath": 7,
    "modeling": 8, "lora": 9, "predict": 10, "evaluate": 11, "report": 12, "modelcard": 12, "checkpoint": 13, "optim": 13, "hub": 13, "tracking": 13,
    "train": 14, "export": 15, "api": 16, "serve": 17, "tune": 18, "tune_decoding": 18, "demo": 19, "cli": 20,
}
# Inside a package, the same rule between its rooms (a package's __init__ only gathers their names).
SUBRANKS = {
    "data": {"records": 0, "readers": 1, "clean": 2, "split": 2},
    "fastpath": {"classes": 0, "dropout": 1, "linear": 1, "norm": 1, "clip": 1, "allocator": 1, "decoding": 2,
                 "proof": 2,
                 "answering": 3},
    "serve": {"batcher": 0, "metrics": 0, "middleware": 0, "runner": 0, "schemas": 1, "app": 2},
}
EXEMPT = {"__init__", "__main__", "sample_data", "static"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_t5qa_modules(path: Path, depth: int = 1) -> set[str]:
    """The t5qa modules `path` imports, named to `depth` parts ("train"; with depth 2, "data.readers")."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()

    def name(dotted: str) -> str:
        return ".".join(dotted.split(".")[1:1 + depth])

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("t5qa."):
            parts = node.module.split(".")
            if len(parts) - 1 < depth:  # from t5qa.data import records
                found.update(f"{parts[1]}.{alias.name}" for alias in node.names)
            else:
                found.add(name(node.module))
        elif isinstance(node, ast.ImportFrom) and node.module == "t5qa":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(name(a.name) for a in node.names if a.name.startswith("t5qa."))
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


def _package_sources() -> list[Path]:
    return sorted(p for package in SUBRANKS for p in (SRC / package).glob("*.py") if p.stem != "__init__")


def test_every_room_of_a_package_has_a_rank():
    unknown = sorted(f"{p.parent.name}.{p.stem}" for p in _package_sources() if p.stem not in SUBRANKS[p.parent.name])
    assert not unknown, f"add these rooms to SUBRANKS and docs/ARCHITECTURE.md: {unknown}"


@pytest.mark.parametrize("path", _package_sources(), ids=lambda p: str(p.relative_to(SRC)))
def test_rooms_of_a_package_import_only_earlier_rooms(path: Path):
    package, me = path.parent.name, path.stem
    ranks = SUBRANKS[package]
    later = sorted(
        m for m in _imported_t5qa_modules(path, depth=2)
        if m.startswith(f"{package}.") and m.split(".")[1] in ranks and m.split(".")[1] != me
        and ranks[m.split(".")[1]] >= ranks[me]
    )
    assert not later, f"{package}/{path.name} (rank {ranks[me]}) imports later rooms: {later}"


def test_checker_detects_a_backward_import(tmp_path: Path):
    bad = tmp_path / "x.py"
    bad.write_text("from t5qa.train import fit\nimport t5qa.serve\n", encoding="utf-8")
    assert _imported_t5qa_modules(bad) == {"train", "serve"}
    room = tmp_path / "y.py"
    room.write_text("from t5qa.data.clean import load_dataset\nfrom t5qa.data import split\n", encoding="utf-8")
    assert _imported_t5qa_modules(room, depth=2) == {"data.clean", "data.split"}
