"""The import graph keeps the layering that docs/design.md writes down.

The layer table is read from docs/design.md itself, so the page and the code cannot drift:
every module of the package belongs to one layer, no import (including those written inside
functions) points to a higher layer, the imports form no cycle, and no module imports another
module's private (underscore) name.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "imtm"
DESIGN = ROOT / "docs" / "design.md"

#: Imports that break the layering today, each with the reason it is tolerated: an entry here is
#: a debt with an owner, and the test fails once the import is gone so that the entry goes too.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}
#: Imports within one layer that close a cycle today (same terms as KNOWN_UPWARD).
KNOWN_CYCLE: dict[tuple[str, str], str] = {}
KNOWN_PRIVATE: dict[tuple[str, str], str] = {}


def layer_table() -> list[tuple[int, list[str]]]:
    """``[(layer, [module prefixes])]`` from the table under the ``layers`` marker of docs/design.md."""
    text = DESIGN.read_text()
    start = text.index("<!-- layers:")
    rows = []
    for line in text[start:].splitlines()[1:]:
        if not line.strip():
            if rows:
                break
            continue
        m = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if m:
            rows.append((int(m.group(1)), re.findall(r"`([\w.]+)`", m.group(2))))
        elif rows and not line.startswith("|"):
            break
    assert rows, "docs/design.md has no layer table after its '<!-- layers:' marker"
    return rows


def package_modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def imports_of(module: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every import of an imtm module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        targets: list[tuple[str, str | None]] = []
        if isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                targets.append((full, None) if full in mods else (base, a.name))
        for target, name in targets:
            if target != "imtm" and not target.startswith("imtm."):
                continue
            while target not in mods and "." in target:
                target = target.rpartition(".")[0]
            if target != module:
                out.append((target, name, node.lineno))
    return out


def layer_of(module: str, table) -> int | None:
    best, best_len = None, -1
    for layer, prefixes in table:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = layer, len(prefix)
    return best


@pytest.fixture(scope="module")
def graph():
    mods = package_modules()
    return mods, {m: imports_of(m, p, mods) for m, p in mods.items()}


def test_the_layer_table_is_read_and_covers_every_module(graph):
    mods, _ = graph
    table = layer_table()
    assert [layer for layer, _ in table] == sorted(layer for layer, _ in table)
    assert layer_of("imtm.functional.pooling", table) < layer_of("imtm.components.pooling", table)
    assert layer_of("imtm.matcher", table) < layer_of("imtm.cli", table)
    unplaced = sorted(m for m in mods if layer_of(m, table) is None)
    assert not unplaced, f"modules in no layer of docs/design.md: {unplaced}; add them to its table"


def test_no_import_points_up_the_layers(graph):
    mods, edges = graph
    table = layer_table()
    upward, seen = [], set()
    for module, imported in edges.items():
        for target, _, line in imported:
            if layer_of(target, table) > layer_of(module, table):
                seen.add((module, target))
                if (module, target) not in KNOWN_UPWARD:
                    upward.append(
                        f"{mods[module].relative_to(ROOT)}:{line} imports {target} "
                        f"(layer {layer_of(target, table)} > {layer_of(module, table)})"
                    )
    assert not upward, "imports against docs/design.md's layers:\n" + "\n".join(upward)
    stale = sorted(set(KNOWN_UPWARD) - seen)
    assert not stale, f"these imports are gone: remove them from KNOWN_UPWARD: {stale}"


def test_the_imports_form_no_cycle_beyond_the_known_ones(graph):
    _, edges = graph
    known = set(KNOWN_UPWARD) | set(KNOWN_CYCLE)
    present = {(m, t) for m, imported in edges.items() for t, _, _ in imported}
    stale = sorted(set(KNOWN_CYCLE) - present)
    assert not stale, f"these imports are gone: remove them from KNOWN_CYCLE: {stale}"
    adjacency = {
        m: {t for t, _, _ in imported if (m, t) not in known} for m, imported in edges.items()
    }
    # Tarjan's strongly connected components, iteratively (the graph is small, but recursion is not needed).
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    counter = 0
    for root in adjacency:
        if root in index:
            continue
        work = [(root, iter(sorted(adjacency[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(adjacency.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_name_is_imported_across_modules(graph):
    mods, edges = graph
    found, seen = [], set()
    for module, imported in edges.items():
        for target, name, line in imported:
            if (
                name
                and name.startswith("_")
                and not name.startswith("__")
                and not target.rpartition(".")[2].startswith("_")
            ):
                seen.add((module, name))
                if (module, name) not in KNOWN_PRIVATE:
                    found.append(f"{mods[module].relative_to(ROOT)}:{line} imports {target}.{name}")
    assert not found, (
        "private names imported from another module (move the helper to an underscore "
        "module with a public name):\n" + "\n".join(found)
    )
    stale = sorted(set(KNOWN_PRIVATE) - seen)
    assert not stale, f"these imports are gone: remove them from KNOWN_PRIVATE: {stale}"


def test_the_check_sees_an_upward_import(tmp_path):
    # The checker itself must be able to fail: a block that imports the Matcher is caught.
    mods = {"imtm.components.x": tmp_path / "x.py", "imtm.matcher": tmp_path / "m.py"}
    mods["imtm.components.x"].write_text(
        "def f():\n    from imtm.matcher import Matcher\n    from imtm.matcher import _private\n"
    )
    mods["imtm.matcher"].write_text("")
    imported = imports_of("imtm.components.x", mods["imtm.components.x"], mods)
    assert [(t, n) for t, n, _ in imported] == [
        ("imtm.matcher", "Matcher"),
        ("imtm.matcher", "_private"),
    ]
    table = layer_table()
    assert layer_of("imtm.matcher", table) > layer_of("imtm.components.x", table)
