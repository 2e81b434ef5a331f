"""Imports run downward only, and never in a cycle: every import in cada_jax/ (those inside
functions too) checked against the layer table of docs/architecture.md."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "cada_jax"
DOC = ROOT / "docs" / "architecture.md"

# Known exceptions: (importing module, imported module) pairs, and sorted tuples of a cycle's
# modules. Empty: keep it so; fix the import instead.
ALLOWED_UPWARD: set[tuple[str, str]] = set()
ALLOWED_CYCLES: set[tuple[str, ...]] = set()


def layer_table() -> dict[str, tuple[int, str]]:
    """{module prefix: (level, layer name)} from the table under '## Layers' in the doc."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    table: dict[str, tuple[int, str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].isdigit():
            continue
        for mod in re.findall(r"`([\w.]+)`", cells[2]):
            assert mod not in table, f"{DOC.name}: {mod} appears twice in the layer table"
            table[mod] = (int(cells[0]), cells[1].split(":")[0])
    assert table, f"{DOC}: no layer table (rows '| level | layer | `modules` |') under '## Layers'"
    return table


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def layer_of(module: str, table) -> tuple[int, str] | None:
    best = max((p for p in table if module == p or module.startswith(p + ".")), key=len, default=None)
    return None if best is None else table[best]


def imports_of(path: Path, modules: dict[str, Path]):
    """(line, imported cada_jax module) for every import statement in `path`, at any depth."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "cada_jax":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "cada_jax":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield node.lineno, sub if sub in modules else base


def import_graph():
    modules = all_modules()
    edges: dict[str, dict[str, str]] = {m: {} for m in modules}  # importer -> {imported: "file:line"}
    for mod, path in modules.items():
        for line, target in imports_of(path, modules):
            if target != mod and target in modules:
                edges[mod].setdefault(target, f"{path.relative_to(ROOT)}:{line}")
    return modules, edges


def test_every_module_has_a_layer():
    table = layer_table()
    missing = [m for m in all_modules() if layer_of(m, table) is None]
    assert not missing, f"modules with no row in {DOC.relative_to(ROOT)}'s layer table: {missing}; add them"


def test_imports_run_downward_only():
    table = layer_table()
    _, edges = import_graph()
    bad = []
    for mod, targets in edges.items():
        lo, lname = layer_of(mod, table)
        for target, where in targets.items():
            hi, hname = layer_of(target, table)
            if hi > lo and (mod, target) not in ALLOWED_UPWARD:
                bad.append(f"{where}: {mod} ({lname}, level {lo}) imports {target} ({hname}, level {hi})")
    assert not bad, "upward imports (move the helper down instead):\n" + "\n".join(sorted(bad))


def _cycles(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    _, edges = import_graph()
    bad = []
    for comp in _cycles(edges):
        if tuple(comp) in ALLOWED_CYCLES:
            continue
        members = set(comp)
        links = [f"{where}: {a} imports {b}" for a in comp for b, where in sorted(edges[a].items()) if b in members]
        bad.append("cycle among " + ", ".join(comp) + ":\n  " + "\n  ".join(links))
    assert not bad, "import cycles:\n" + "\n".join(bad)


def test_the_checker_sees_upward_imports_and_cycles(tmp_path):
    """The walk finds imports inside functions and relative ones; the cycle search finds a loop."""
    src = tmp_path / "probe.py"
    src.write_text("def f():\n    from cada_jax.eval import runner\n    import cada_jax.cli\n")
    found = [t for _, t in imports_of_file(src)]
    assert found == ["cada_jax.eval.runner", "cada_jax.cli"]
    assert _cycles({"a": {"b": ""}, "b": {"c": ""}, "c": {"a": ""}, "d": {"a": ""}}) == [["a", "b", "c"]]
    table = layer_table()
    assert layer_of("cada_jax.cada.pipeline", table)[0] > layer_of("cada_jax.cada.generate", table)[0]
    assert layer_of("cada_jax.models.decoder", table)[0] < layer_of("cada_jax.sampling", table)[0]


def imports_of_file(path: Path):
    """`imports_of` for a file outside the package (treated as a top-level module)."""
    modules = all_modules()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("cada_jax"):
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cada_jax"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                yield node.lineno, sub if sub in modules else node.module
