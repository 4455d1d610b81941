"""The package's layers import one way: core <- pruning / distill <- pipeline, with no import cycle anywhere and
no module reading another's private names. Walks every ``import`` in hfprune/ with ``ast`` (function-level
imports included: a cycle dodged by a local import is still a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "hfprune"

# module prefix -> layer; a module imports only its own layer and those below it
LAYERS = {
    "hfprune.version": 0,
    "hfprune._moved": 0,
    "hfprune.core": 1,
    "hfprune.data": 1,
    "hfprune.metrics": 1,
    "hfprune.forecast": 1,
    "hfprune.pruning": 2,
    "hfprune.distill": 2,
    "hfprune.perplexity": 2,
    "hfprune.pipeline": 3,
    "hfprune.__main__": 4,
    "hfprune": 4,  # the package's __init__: the public names
}
# side by side on one layer, and independent of each other
SIBLINGS = [("hfprune.pruning", "hfprune.distill")]
# what the core (what a pruned model is) may import from outside the standard library
CORE_THIRD_PARTY = {"torch", "transformers", "safetensors", "huggingface_hub"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py")) if "metrics/" not in p.as_posix()
            or p.name == "__init__.py"}


MODULES = _modules()


def _imports(name: str, path: Path) -> list:
    """``(imported module, [names], line)`` for every import statement; relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names = [a.name for a in node.names]
            # `from . import cost` imports the module hfprune.cost
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            out += [(s, [], node.lineno) for s in subs]
            rest = [n for n in names if f"{target}.{n}" not in MODULES]
            if rest or not subs:
                out.append((target, rest, node.lineno))
    return out


def _layer(name: str) -> tuple:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[best], best


def _edges() -> dict:
    return {name: [(t, names, line) for t, names, line in _imports(name, path)
                   if t == "hfprune" or t.startswith("hfprune.")] for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    for name in MODULES:
        assert any(name == p or name.startswith(p + ".") for p in LAYERS), f"{name} has no layer in LAYERS"


def test_lower_layers_never_import_higher_ones():
    bad = []
    for name, edges in _edges().items():
        level, group = _layer(name)
        for target, _, line in edges:
            t_level, t_group = _layer(target)
            if t_level > level:
                bad.append(f"{MODULES[name].relative_to(PKG.parent)}:{line} ({group}, layer {level}) imports "
                           f"{target} ({t_group}, layer {t_level})")
            for a, b in SIBLINGS:
                if {group, t_group} == {a, b}:
                    bad.append(f"{MODULES[name].relative_to(PKG.parent)}:{line}: {group} imports its sibling {target}")
    assert not bad, "\n".join(bad)


def test_core_imports_only_torch_and_transformers():
    bad = []
    for name, path in MODULES.items():
        if not name.startswith("hfprune.core"):
            continue
        for target, _, line in _imports(name, path):
            top = target.split(".")[0]
            if top == "hfprune" or _is_stdlib(top) or top in CORE_THIRD_PARTY:
                continue
            bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def _is_stdlib(top: str) -> bool:
    import sys

    return top in sys.stdlib_module_names or top == "__future__"


def test_no_import_cycles():
    graph = {name: {t for t, _, _ in edges if t in MODULES} for name, edges in _edges().items()}
    # importing a submodule imports its packages first, but that is not an edge of ours: only explicit imports
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_names_across_modules():
    bad = []
    for name, edges in _edges().items():
        for target, names, line in edges:
            if target == name:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                bad.append(f"{MODULES[name].relative_to(PKG.parent)}:{line} imports {private} from {target}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("old", ["hfprune.apply", "hfprune.cost", "hfprune.plan", "hfprune.modeling.save",
                                 "hfprune.importance.base", "hfprune.callback", "hfprune.run", "hfprune.structure"])
def test_old_import_paths_are_the_new_modules(old):
    import importlib

    from hfprune._moved import current_name

    assert importlib.import_module(old) is importlib.import_module(current_name(old))
