"""The package's shape: stage packages whose ``__init__`` files import nothing, no import cycle between modules
(imports inside functions count too), and a torch-free serving path."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import REPO

PACKAGE = REPO / "src" / "lesionkit"
STAGES = ("data", "model", "train", "evaluate", "serve", "bench", "commands")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """The lesionkit modules that module ``name`` imports, anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from lesionkit.data import metadata` names a module; `from lesionkit.files import x` a name in one.
            targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found - {"lesionkit"} if name != "lesionkit" else found


GRAPH = {name: imports(name) for name in MODULES}


def test_the_stages_are_packages():
    assert all((PACKAGE / stage / "__init__.py").is_file() for stage in STAGES)
    assert not [p.name for p in PACKAGE.glob("*.py")
                if p.stem not in ("__init__", "__main__", "cli", "config", "files", "allocator")]


@pytest.mark.parametrize("stage", STAGES)
def test_package_inits_import_nothing(stage):
    tree = ast.parse((PACKAGE / stage / "__init__.py").read_text())
    assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_no_import_cycle():
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target] if target in path else [name, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def top_level_imports(name: str) -> set[str]:
    """Third-party packages imported at module level (a function's own imports run only when it does)."""
    found = set()
    for node in ast.parse(MODULES[name].read_text()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_the_onnx_serving_path_never_imports_torch_at_module_level():
    modules = {"lesionkit.commands.predict", "lesionkit.serve.onnx_classifier", "lesionkit.serve.predict"}
    loaded = set().union(*(reachable_at_top(m) for m in modules))
    heavy = {m: top_level_imports(m) & {"torch", "torchvision", "timm", "lightning", "pandas"} for m in loaded}
    assert not {m: h for m, h in heavy.items() if h}


def reachable_at_top(start: str) -> set[str]:
    """Modules imported at module level, transitively: what importing ``start`` loads."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.parse(MODULES[name].read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module in MODULES:
                todo.append(node.module)
            elif isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names if alias.name in MODULES]
    return seen


def test_every_command_is_a_module_with_arguments_and_run():
    from lesionkit.cli import COMMANDS

    commands = {p.stem for p in (PACKAGE / "commands").glob("*.py")} - {"__init__"}
    assert {module for module, _ in COMMANDS.values()} == commands
    for module in commands:
        tree = ast.parse((PACKAGE / "commands" / f"{module}.py").read_text())
        assert {"add_arguments", "run"} <= {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
