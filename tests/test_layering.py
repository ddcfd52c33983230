"""The package's house rules, read from its source: what may import what, and where rules live.

The layers, from the bottom (docs/architecture.md): a module imports from its own layer or the
ones below, never above. Besides, a stage never imports another stage, the audit or the demo;
nothing but the command line imports the demo; nothing imports the tests; there is no import
circle; run-folder paths and shard formats are spelled in laionface/layout.py only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "laionface"

# (module prefix, layer): the longest prefix that matches a module gives its layer.
LAYERS = (
    ("laionface", 0),
    ("laionface.config", 0),
    ("laionface.layout", 0),
    ("laionface.io", 0),
    ("laionface.detect", 1),
    ("laionface.selection", 1),
    ("laionface.engine", 2),
    ("laionface.dataset.contract", 2),
    ("laionface.stages", 3),
    ("laionface.dataset", 3),
    ("laionface.audit", 4),
    ("laionface.engine.pipeline", 5),
    ("laionface.engine.dryrun", 5),
    ("laionface.demo", 6),
    ("laionface.cli", 6),
    ("laionface.__main__", 6),
)
LONG_FUNCTION = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    matches = [
        (len(prefix), rank)
        for prefix, rank in LAYERS
        if module == prefix or module.startswith(prefix + ".")
    ]
    return max(matches)[1]


def _type_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (annotations only, never run)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            out.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
    return out


def imports(module: str) -> set[str]:
    """Every laionface module `module` imports, at the top or inside a function (not the
    imports for type annotations only)."""
    tree = ast.parse(MODULES[module].read_text())
    skipped = _type_only(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
    return {name for name in found if name.split(".")[0] in ("laionface", "tests")}


GRAPH = {module: imports(module) for module in MODULES}


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "stages" else None


def test_imports_go_down_the_layers():
    upward = [
        f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
        for module, targets in GRAPH.items()
        for target in targets
        if target in MODULES and layer(target) > layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_a_stage_imports_no_other_stage_nor_the_audit_nor_the_demo():
    bad = []
    for module, targets in GRAPH.items():
        stage = stage_of(module)
        if stage is None:
            continue
        for target in targets:
            other = stage_of(target)
            if (other is not None and other != stage) or target.startswith(
                ("laionface.audit", "laionface.demo")
            ):
                bad.append(f"{module} imports {target}")
    assert not bad, "\n".join(bad)


def test_only_the_command_line_imports_the_demo_and_nothing_imports_the_tests():
    bad = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if target.split(".")[0] == "tests"
        or (
            target.startswith("laionface.demo")
            and not module.startswith("laionface.demo")
            and module != "laionface.cli"
        )
    ]
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH.get(module, ())):
            if target not in MODULES:
                continue
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in MODULES:
        if module not in state:
            visit(module)


def test_run_folder_paths_and_shard_formats_are_spelled_in_layout_only():
    rules = ("05d", '"_done"', "'_done'")
    bad = [
        f"{path.relative_to(PACKAGE.parent)}: {rule}"
        for module, path in MODULES.items()
        if module != "laionface.layout"
        for rule in rules
        if rule in path.read_text()
    ]
    assert not bad, "\n".join(bad)


def test_no_function_on_the_product_path_is_over_80_lines():
    long = []
    for module, path in MODULES.items():
        if module.startswith("laionface.demo"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONG_FUNCTION:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert not long, "\n".join(long)


def test_every_stage_is_declared_in_its_own_module():
    from laionface.engine.pipeline import stage_of as declared
    from laionface.layout import STAGE_ORDER

    for name in STAGE_ORDER:
        stage = declared(name)
        assert stage.name == name
        assert stage.settings, f"stage {name} declares no settings"
        assert stage.writes, f"stage {name} declares no output folder"
