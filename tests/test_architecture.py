"""Folders are the stages: every stage of ``hetmoe_compile.STAGES`` is one package, at the top only ``__init__`` and
``__main__``, docs/ARCHITECTURE.md's stage table lists the same packages in the same order, imports run one way
along that order and form no cycle."""

import ast
import re
from pathlib import Path

import hetmoe_compile

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hetmoe_compile"
DOC = ROOT / "docs" / "ARCHITECTURE.md"
STAGES = hetmoe_compile.STAGES


def _table() -> list[tuple[str, list[str]]]:
    """The stage table of docs/ARCHITECTURE.md, first stage first: ``[(stage, [package folders named])]``."""
    rows = []
    section = DOC.read_text().split("\n## Stages\n", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("stage", "---"):
            rows.append((cells[0], re.findall(r"`(\w+)/`", cells[1])))
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


def _stage(name: str) -> int:
    """Index of a module's stage (its first package below the top); the top's own modules come after every stage."""
    parts = name.split(".")
    return STAGES.index(parts[1]) if len(parts) > 1 and parts[1] in STAGES else len(STAGES)


def test_the_tree_is_the_stages():
    packages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert packages == sorted(STAGES)
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "__main__.py"]
    assert not [p for p in PACKAGE.glob("*") if p.is_dir() and p.name != "__pycache__" and p.name not in STAGES]


def test_the_table_is_the_tree():
    rows = _table()
    assert [s for s, _ in rows] == list(STAGES), "the stage table's rows are the stages, in order"
    assert [pkgs for _, pkgs in rows] == [[s] for s in STAGES], "each row names its one package folder"


def test_imports_run_one_way():
    backward = sorted(
        f"{m} -> {t}"
        for m, targets in GRAPH.items()
        for t in targets
        if t != "hetmoe_compile" and _stage(t) > _stage(m)
    )
    assert backward == [], "imports against the stage order of hetmoe_compile.STAGES"


def test_runtime_imports_only_base():
    outside = sorted(
        f"{m} -> {t}"
        for m, targets in GRAPH.items()
        if m.startswith("hetmoe_compile.runtime")
        for t in targets
        if _stage(t) > STAGES.index("runtime") or t == "hetmoe_compile"
    )
    assert outside == [] and STAGES.index("runtime") == 1  # torch-free: nothing but base comes before it


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


def test_the_checks_catch_what_they_claim():
    """The import reader sees function-level imports (the kind the cycles hid in), and the stage of a module is
    its package's."""
    assert "hetmoe_compile.cost.budget" in GRAPH["hetmoe_compile.compose.pipeline"]  # imported inside place_scores
    assert "hetmoe_compile.analog.simulate" not in GRAPH["hetmoe_compile.transforms.hpd.projection_split"]
    assert _stage("hetmoe_compile.eval.sweep.jobs") == STAGES.index("eval") > _stage("hetmoe_compile.compose.api")


def test_the_cli_is_thin():
    """One module per command, each declaring its arguments (``add_parser``) and running it (``run``, at most 40
    lines); no test reaches into the CLI's private names."""
    from hetmoe_compile.cli.app import COMMANDS

    for name, module in COMMANDS.items():
        path = Path(module.__file__)
        functions = {n.name: n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
        assert {"add_parser", "run"} <= set(functions), name
        run = functions["run"]
        assert run.end_lineno - run.lineno + 1 <= 40, f"{path.name}: run() has {run.end_lineno - run.lineno + 1} lines"
    private = re.compile(r"from hetmoe_compile\.cli[\w.]* import [^\n]*\b_\w+|\bcli\w*\._\w+\(")
    offenders = [p.name for p in (ROOT / "tests").glob("*.py") if private.search(p.read_text())]
    assert offenders == [] or offenders == ["test_architecture.py"]
