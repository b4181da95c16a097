"""Helpers shared by the command modules: flags generated from the config dataclasses, output formatting.

Flags are generated from the dataclasses so that a YAML key, a flag and a Python argument are always the
same setting with the same default and the same help text (the field's docstring in config.py).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import sys
import typing
from typing import Any, Iterable, Sequence


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it in the dataclass body."""
    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _flag_fields(cls: type) -> list[tuple[str, Any, str, Any]]:
    """(name, annotation, help, default) for every scalar field, nested dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    out = []
    nested = []
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            nested.extend(_flag_fields(annotation))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        out.append((f.name, annotation, docs.get(f.name, ""), default))
    # A nested field with the same name as an outer one would be set through
    # the outer flag; one flag per name.
    own = {name for name, *_ in out}
    return out + [entry for entry in nested if entry[0] not in own]


def add_config_flags(parser: argparse.ArgumentParser, cls: type, *, exclude: Iterable[str] = (),
                     group_title: str | None = None) -> None:
    """Add one --flag per config field (default None, so unset flags never override a YAML file)."""
    excluded = set(exclude)
    target: Any = parser.add_argument_group(group_title) if group_title else parser
    for name, annotation, help_text, default in _flag_fields(cls):
        if name in excluded:
            continue
        flag = "--" + name.replace("_", "-")
        shown = ",".join(default) if isinstance(default, tuple) else default
        text = f"{help_text} (default: {shown})"
        kind = str(annotation)
        if kind.startswith("bool") or annotation is bool:
            target.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif kind.startswith("int") or annotation is int:
            target.add_argument(flag, type=int, default=None, metavar="N", help=text)
        elif kind.startswith("float") or annotation is float:
            target.add_argument(flag, type=float, default=None, metavar="X", help=text)
        else:
            target.add_argument(flag, type=str, default=None, help=text)


# The DataConfig fields that say how to read a file (as opposed to how to clean or split it).
DATA_COLUMN_FLAGS = ("format", "context_column", "question_column", "answer_column", "id_column", "hf_split",
                     "no_answer_values")


def add_data_column_flags(parser: argparse.ArgumentParser, group_title: str = "data columns",
                          without: tuple[str, ...] = ()) -> None:
    """Flags that map a user's file to contexts, questions, answers and ids (--context-column, ...); `without`
    leaves some out (a command whose own flag has the name)."""
    from t5qa.config import DataConfig

    excluded = [name for name in DataConfig.__dataclass_fields__ if name not in DATA_COLUMN_FLAGS or name in without]
    add_config_flags(parser, DataConfig, exclude=excluded, group_title=group_title)


def config_overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The config fields the user set on the command line."""
    values = vars(args)
    return {name: values[name] for name, *_ in _flag_fields(cls) if values.get(name) is not None}


def print_json(obj: Any) -> None:
    """Machine-readable output on stdout."""
    json.dump(obj, sys.stdout, indent=2, ensure_ascii=False, default=str)
    sys.stdout.write("\n")


def print_table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> None:
    """A plain aligned text table on stdout."""
    all_rows = [list(map(str, header))] if header else []
    all_rows += [[str(c) for c in row] for row in rows]
    if not all_rows:
        return
    widths = [max(len(r[i]) for r in all_rows if i < len(r)) for i in range(max(len(r) for r in all_rows))]
    for k, row in enumerate(all_rows):
        print("  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip())
        if header and k == 0:
            print("  ".join("-" * w for w in widths))
