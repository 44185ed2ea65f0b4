"""A cell computed once per team (``%%dm_cache KEY VAR ...``): the decisions, apart from
IPython, so that any front-end running code cells can use them.

- :func:`stored_variables` checks that an object stored under the key holds the variables;
- :func:`assigned_names` reads which names a cell's code binds at its top level;
- :func:`cell_outputs` decides which variables the cell set: a variable counts only if this
  cell bound it (its code assigns it, or the object under its name changed), so that a value
  left by an earlier cell is never pushed as the cell's result.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .errors import InvalidArgumentError, a


def stored_variables(key: str, stored: Any, names: Sequence[str]) -> dict[str, Any]:
    """The variables ``names`` from ``stored`` (what a cached cell pushed), or a one-line
    error saying why it is not such an object."""
    if not isinstance(stored, dict):
        raise InvalidArgumentError(
            f"{key!r} holds {a(type(stored).__name__)}, not variables stored by %%dm_cache; "
            "choose another key."
        )
    missing = [name for name in names if name not in stored]
    if missing:
        raise InvalidArgumentError(
            f"{key!r} holds {', '.join(map(str, stored)) or 'no variables'}, not "
            f"{', '.join(missing)}; choose another key, or delete this one "
            f"(%dm_delete {key} --remote) to run the cell again."
        )
    return {name: stored[name] for name in names}


def assigned_names(code: str) -> set[str]:
    """The names a cell's (Python) code binds at its top level: assignments, augmented and
    annotated ones, ``for`` and ``with`` targets, imports, ``def`` and ``class``, ``:=``;
    not names bound inside functions or classes it defines. Empty if it does not parse."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return set()
    found: set[str] = set()

    def visit(nodes: Iterable[ast.AST]) -> None:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found.add(node.name)
                continue  # their bodies are their own scopes
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    found.add((alias.asname or alias.name).split(".")[0])
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                found.add(node.id)
            elif isinstance(node, (ast.Lambda, ast.GeneratorExp, ast.ListComp, ast.SetComp,
                                   ast.DictComp)):  # fmt: skip
                # Their own scopes, but a walrus inside a comprehension binds outside it.
                found.update(
                    n.target.id
                    for n in ast.walk(node)
                    if isinstance(n, ast.NamedExpr) and not isinstance(node, ast.Lambda)
                )
                continue
            visit(ast.iter_child_nodes(node))

    visit(tree.body)
    return found


def cell_outputs(
    names: Sequence[str],
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    assigned: set[str],
) -> tuple[dict[str, Any], list[str]]:
    """Which of ``names`` the cell set: ``(values, missing)``. ``before`` holds the names'
    objects before the cell ran (held, so that no new object can take an old one's
    identity), ``after`` the namespace after it, ``assigned`` what its code binds. A name
    counts if the code binds it, or if its object changed (set another way: ``exec``,
    ``globals()[...]``, a magic)."""
    values, missing = {}, []
    for name in names:
        changed = name not in before or after.get(name) is not before[name]
        if name in after and (name in assigned or changed):
            values[name] = after[name]
        else:
            missing.append(name)
    return values, missing
