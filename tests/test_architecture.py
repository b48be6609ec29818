"""The layout in docs/ARCHITECTURE.md holds: every module has a stage, imports run one way, no cycles."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hetmoe_compile"
DOC = ROOT / "docs" / "ARCHITECTURE.md"


def _stages() -> list[tuple[str, list[str]]]:
    """The stage table of docs/ARCHITECTURE.md, first stage first: ``[(stage, [top-level module names])]``."""
    rows = []
    section = DOC.read_text().split("\n## Stages\n", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and "`" in cells[1] and cells[0] not in ("stage", "---"):
            rows.append((cells[0], re.findall(r"`([\w]+)`", cells[1])))
    return rows


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path) -> set[str]:
    """Package modules ``name`` imports anywhere in its file (module level or in functions)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        out.update(t for t in targets if t in MODULES and t != name)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _stage_of() -> dict[str, int]:
    index = {m: i for i, (_, mods) in enumerate(_stages()) for m in mods}
    out = {}
    for name in MODULES:
        top = name.split(".")[1] if "." in name else "__init__"
        if top not in index:
            pytest.fail(f"{name} has no stage in docs/ARCHITECTURE.md's stage table")
        out[name] = index[top]
    return out


def test_the_stage_table_is_read():
    names = [s for s, _ in _stages()]
    assert names[0] == "base" and names[-1] == "cli" and len(names) >= 10


def test_every_module_has_a_stage_and_imports_run_one_way():
    stage = _stage_of()
    backward = sorted(
        f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets if t != "hetmoe_compile" and stage[t] > stage[m]
    )
    assert backward == [], "imports against the stage order of docs/ARCHITECTURE.md"


def test_no_module_imports_the_package_top():
    assert sorted(m for m, t in GRAPH.items() if "hetmoe_compile" in t and m != "hetmoe_compile.__main__") == []


def test_no_import_cycles():
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for t in sorted(GRAPH[node]):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t) :] + [t]))
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[node] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [])
    assert cycles == []


def test_the_checks_catch_what_they_claim(tmp_path):
    """The import reader sees function-level imports (the kind the cycles hid in)."""
    assert "hetmoe_compile.cost.budget" in GRAPH["hetmoe_compile.pipeline"]  # imported inside place_scores
    assert "hetmoe_compile.analog.simulate" not in GRAPH["hetmoe_compile.hpd.projection_split"]
