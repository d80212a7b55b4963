"""The package's import graph has no cycle, and only the training loop imports the checkpoint module.

Read from the source with `ast`, not by importing: every `import` counts, wherever it stands (inside a function or
under `if TYPE_CHECKING:` too), so a cycle cannot hide in a deferred import.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ssl", "scripts")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the project's modules it imports}; `from a.b import c` imports a.b, and a.b.c when c is a module."""
    modules = {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}: relative import"  # the project spells imports out in full
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {module for module in imported if module in modules and module != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search: a cycle is an edge back onto the current path)."""
    path: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        for imported in sorted(graph[module]):
            cycle = visit(imported)
            if cycle:
                return cycle
        path.pop()
        done.add(module)
        return None

    return next((cycle for module in sorted(graph) if (cycle := visit(module))), None)


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"ssl.files", "ssl.checkpoint", "ssl.train", "ssl.models.export"} <= graph.keys()  # it read the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_only_the_training_loop_imports_the_checkpoint_module():
    graph = import_graph()
    assert sorted(module for module, imported in graph.items() if "ssl.checkpoint" in imported) == ["ssl.train"]


def test_safe_writing_is_at_the_bottom():
    assert import_graph()["ssl.files"] <= {"ssl.errors"}
