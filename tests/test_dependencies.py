"""Every module the package imports at run time is a declared base dependency (or the standard
library), and every declared base dependency is imported somewhere: a package that only arrives
through the test extras, or through another package's dependencies, cannot carry the main job."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Declared dependencies that no module imports by name, and why they are declared.
USED_INDIRECTLY = {
    "jaxlib": "jax's compiled backend; declared for its version bounds",
}


def _requirement_name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> set[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return {_requirement_name(d) for d in deps}


def _imported_top_modules() -> dict[str, str]:
    """Top-level module name -> first file importing it, over every module of cada_jax."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "cada_jax").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                found.setdefault(n.split(".")[0], str(path.relative_to(ROOT)))
    return found


def _distributions(module: str) -> set[str]:
    return {d.lower().replace("_", "-") for d in md.packages_distributions().get(module, [])}


def test_every_runtime_import_is_declared():
    declared = _declared()
    missing = []
    for mod, where in _imported_top_modules().items():
        if mod == "cada_jax" or mod in sys.stdlib_module_names or mod == "__future__":
            continue
        dists = _distributions(mod)
        assert dists, f"{where}: imports {mod!r}, which no installed distribution provides"
        if not dists & declared:
            missing.append(f"{where}: imports {mod!r} (from {sorted(dists)}), not in pyproject's dependencies")
    assert not missing, "\n".join(missing)


def test_every_declared_dependency_is_used():
    used = set()
    for mod in _imported_top_modules():
        used |= _distributions(mod)
    unused = sorted(_declared() - used - set(USED_INDIRECTLY))
    assert not unused, f"declared in pyproject.toml but never imported by cada_jax: {unused}; drop them or say why in USED_INDIRECTLY"


def test_fast_moving_dependencies_have_upper_bounds_and_are_locked():
    with open(ROOT / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    bounded = {_requirement_name(d): d for d in deps}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "transformers", "datasets", "tokenizers"):
        assert "<" in bounded[name], f"pyproject.toml: {bounded[name]!r} needs an upper bound"
    lock = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            lock[name.lower().replace("_", "-")] = version
    for name in bounded:
        assert name in lock, f"requirements.lock has no pin for {name}; run make lock"
        if name in ("jax", "flax", "transformers", "numpy"):
            assert md.version(name) == lock[name], f"{name} {md.version(name)} is installed but requirements.lock pins {lock[name]}"
