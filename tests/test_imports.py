"""The package's import structure: no cycles (DESIGN.md: data flows one way), no private names in
notebooks."""

import ast
from pathlib import Path

import nbformat
import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "minigpt"
CHAPTERS = Path(__file__).resolve().parent.parent / "chapters"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every minigpt module ``path`` imports, at any depth (function-level imports and ``importlib``
    calls too)."""
    found = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = ast.unparse(node.func)
            if function.endswith(("import_module", "__import__")) and isinstance(
                node.args[0].value, str
            ):
                # importlib.import_module("minigpt.pissa") is an import too
                names = [node.args[0].value]
        found |= {name for name in names if name in known}
    return found - {module_name(path)}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, known) for p in paths}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "active"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "active":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def test_the_cycle_finder_finds_cycles(tmp_path):
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    hidden = tmp_path / "minigpt" / "lora.py"
    hidden.parent.mkdir()
    hidden.write_text(
        "def f():\n    import importlib\n    importlib.import_module('minigpt.pissa')\n"
    )
    global PACKAGE
    saved, PACKAGE = PACKAGE, hidden.parent
    try:
        assert imported_modules(hidden, {"minigpt.pissa", "minigpt.lora"}) == {"minigpt.pissa"}
    finally:
        PACKAGE = saved


def test_the_package_has_no_import_cycle():
    assert find_cycles(import_graph()) == []


def test_adapters_sit_after_the_methods_and_lora_never_imports_them():
    graph = import_graph()
    assert {"minigpt.lora", "minigpt.pissa", "minigpt.dora"} <= graph["minigpt.adapters"]
    for module in ("minigpt.lora", "minigpt.pissa", "minigpt.dora"):
        assert "minigpt.adapters" not in graph[module] and "minigpt.lab.runs" not in graph[module]
    assert not graph["minigpt.lora"] & {"minigpt.pissa", "minigpt.dora"}


def private_imports(source: str) -> list[str]:
    """``module.name`` for every name starting with "_" that ``source`` imports from minigpt."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minigpt"):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id == "minigpt":
                found.append(ast.unparse(node))
    return found


def test_private_import_finder():
    assert private_imports("from minigpt.train import (\n    History,\n    _autocast,\n)") == [
        "minigpt.train._autocast"
    ]
    assert private_imports("import minigpt.quant\nminigpt.quant._blocks(w, 4)") == [
        "minigpt.quant._blocks"
    ]
    assert private_imports("from minigpt.lora import LoRALayer\nfrom os import _exit") == []


@pytest.mark.parametrize("path", sorted(CHAPTERS.glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.stem)
def test_notebooks_import_no_private_names_from_minigpt(path):
    """What a student is told to import is API: a leading underscore would say otherwise."""
    found = []
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "code":
            source = "\n".join(
                ln for ln in cell.source.splitlines() if not ln.lstrip().startswith(("%", "!"))
            )
            try:
                found += private_imports(source)
            except SyntaxError:
                continue
    assert found == []


# each may import only earlier ones
LAYERS = (
    "core",
    "minigpt.lab",
    "minigpt.course",
    "minigpt.classroom",
)


def layer_of(module: str) -> int:
    for index, prefix in enumerate(LAYERS[1:], start=1):
        if module == prefix or module.startswith(prefix + "."):
            return index
    return 0


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} imports {target}"
        for module, targets in sorted(graph.items())
        if module != "minigpt.__main__"
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]


def test_the_layer_rule_finds_an_upward_import():
    assert layering_violations({"minigpt.lora": {"minigpt.lab.runs"}}) == [
        "minigpt.lora imports minigpt.lab.runs"
    ]
    assert layering_violations({"minigpt.lab.runs": {"minigpt.classroom.grader"}}) != []
    assert (
        layering_violations({"minigpt.classroom.grader": {"minigpt.lab.runs", "minigpt.lora"}})
        == []
    )


def test_taught_modules_never_import_the_lab_the_course_or_the_classroom():
    assert layering_violations(import_graph()) == []


def test_no_module_is_longer_than_600_lines():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 600
    }
    assert long == {}
