"""The package's layers run one way and no two modules import each other, lazily or not.

cli -> commands -> build -> loop -> config -> (policies, vlm, data, envs, tracking) -> guides
-> errors.
Every ``import`` statement counts, including those inside functions: a lazy import that goes
up a layer is still a dependency on that layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import covr_lightning

SRC = Path(covr_lightning.__file__).parent
RANK = {
    "cli": 7,
    "__main__": 7,
    "commands": 6,
    "build": 5,
    "loop": 4,
    "config": 3,
    "recipe_files": 3,
    "policies": 2,
    "vlm": 2,
    "data": 2,
    "envs": 2,
    "tracking": 2,
    "guides": 1,
    "errors": 0,
    "types": 0,
    "__init__": 0,
    "recipes": 0,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the covr_lightning modules it imports (anywhere in its body)."""
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        name = _module_name(path)
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.startswith("covr_lightning"):
                    folder = SRC.parent / node.module.replace(".", "/")
                    for alias in node.names:
                        if (folder / f"{alias.name}.py").exists() or (folder / alias.name).is_dir():
                            found.add(f"{node.module}.{alias.name}")  # a submodule
                        else:
                            found.add(node.module)  # a name defined in that module
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("covr_lightning"))
        graph[name] = {m for m in found if m != name and m != "covr_lightning"}
    return graph


def _rank(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    return RANK[part]


def test_layers_run_one_way():
    graph = _imports()
    assert len(graph) > 40
    upward = [
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if _rank(target) > _rank(module)
    ]
    assert not upward, upward


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue
            if state.get(target) == 1:
                cycle = path[path.index(target) :] if target in path else path
                raise AssertionError(" -> ".join([*cycle, target]))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
