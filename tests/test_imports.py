"""The import graph of ``src/bioprop`` is a DAG that follows the layers of the architecture.

Every ``import`` statement of every module counts, function-local ones included; only imports under
``if TYPE_CHECKING:`` (never executed) are left out. A module ``a.b`` importing ``from a import c`` counts as an
edge to ``a.c`` when that is a module, else to ``a``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bioprop

ROOT = Path(bioprop.__file__).resolve().parent

#: The layers, lowest first; a module belongs to the layer of its longest listed prefix. A module may import
#: modules of its own layer or of lower layers only (and the graph must have no cycle anyway).
LAYERS: list[tuple[str, ...]] = [
    ("bioprop.registry", "bioprop.seeding"),  # import nothing from bioprop
    ("bioprop.functional", "bioprop.redraw", "bioprop.learned", "bioprop.mirror", "bioprop.data",
     "bioprop.models"),  # the autograd ops, the rules' helpers, and the model / data set leaves
    ("bioprop.rules", "bioprop.rules_controls"),  # the registry, the rule bases, the policies
    ("bioprop.layers",),
    ("bioprop.selection",),
    ("bioprop.convert",),
    ("bioprop.direct", "bioprop.optim"),
    ("bioprop.metrics",),
    ("bioprop",),  # the public API: re-exports everything above
    ("bioprop.engine", "bioprop.detection"),
    ("bioprop.report",),
    ("bioprop.experiments",),
    ("bioprop.cli", "bioprop.demo"),
    ("bioprop.__main__",),
]

#: Edges that may break the layering (none: an entry needs a reason, and a test fails once it is stale).
ALLOWED_FOR_NOW: set[tuple[str, str]] = set()


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return skipped


def import_graph() -> dict[str, set[str]]:
    """``{module: the bioprop modules it imports}`` from the source text."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skipped = _type_checking_nodes(tree)
        package = name if is_package else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    candidate = f"{source}.{alias.name}"
                    targets.add(candidate if candidate in modules else source)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def layer_of(module: str) -> int:
    best, level = "", -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, level = prefix, index
    if level < 0:
        raise AssertionError(f"module {module} is in no layer of LAYERS; add it")
    return level


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first = last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _without_allowed(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: {t for t in targets if (m, t) not in ALLOWED_FOR_NOW} for m, targets in graph.items()}


def test_find_cycle_finds_a_cycle_and_accepts_a_dag() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_import_graph_has_no_cycle() -> None:
    cycle = find_cycle(_without_allowed(import_graph()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_lower_layers_never_import_higher_ones() -> None:
    upward = sorted((m, t) for m, targets in _without_allowed(import_graph()).items() for t in targets
                    if layer_of(t) > layer_of(m))
    assert not upward, "imports from a lower layer into a higher one: " + "; ".join(f"{m} -> {t}" for m, t in upward)


def test_allowed_edges_still_exist() -> None:
    """An entry of ALLOWED_FOR_NOW that no longer exists must be removed, so that it cannot come back."""
    graph = import_graph()
    stale = sorted(edge for edge in ALLOWED_FOR_NOW if edge[1] not in graph.get(edge[0], set()))
    assert not stale, f"remove from ALLOWED_FOR_NOW: {stale}"


@pytest.mark.parametrize("module", ["bioprop.convert", "bioprop.rules", "bioprop.selection", "bioprop.layers"])
def test_the_rule_core_does_not_import_direct_feedback(module: str) -> None:
    graph = import_graph()
    reach, todo = set(), [m for m in graph if m == module or m.startswith(module + ".")]
    while todo:
        current = todo.pop()
        if current not in reach:
            reach.add(current)
            todo.extend(graph.get(current, ()))
    assert not any(m == "bioprop.direct" or m.startswith("bioprop.direct.") for m in reach)


def test_no_module_outside_the_rule_definitions_compares_a_rule_name() -> None:
    """``x.name == "wm"`` (or ``getattr(x, "name", ...) == "wm"``) with a registered rule name is rule knowledge
    outside the rule; rules declare flags instead."""
    names = set(bioprop.list_rules())
    found = []
    for module, (path, _) in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            reads_name = any((isinstance(s, ast.Attribute) and s.attr == "name") or
                             (isinstance(s, ast.Call) and ast.unparse(s.func) == "getattr" and len(s.args) > 1
                              and isinstance(s.args[1], ast.Constant) and s.args[1].value == "name")
                             for s in sides)
            rule_constant = any(isinstance(s, ast.Constant) and s.value in names for s in sides)
            if reads_name and rule_constant:
                found.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "rule names compared outside the rules: " + "; ".join(found)
