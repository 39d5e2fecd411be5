"""The house rules of docs/architecture.md, read from the code's own import statements.

- A step package (``components/<step>``) imports only ``components.common`` and its own files.
- ``components/common`` imports no step, and nothing in ``components`` imports ``pipelines``.
- No import circles between files.

Every ``import``/``from ... import`` counts, at module level and inside functions (KFP component bodies and
lazy imports are where circles hide). ``from a.b import c`` is an edge to ``a/b/c.py`` when that file exists,
else to ``a/b.py`` (or its ``__init__.py``). A failure names the file, the line and the statement.

    pytest tests/test_architecture.py -q
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("components", "pipelines")
STEPS = ("prepare_data", "sft", "dpo", "evaluate", "register", "predict")


@dataclass(frozen=True)
class Edge:
    source: str  # file, relative to the repo root
    target: str
    line: int
    statement: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: `{self.statement}` -> {self.target}"


def _module_file(root: Path, dotted: str) -> str | None:
    base = root.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(root).as_posix()
    return None


def _package_of(rel: str) -> str:
    """The package a file's relative imports start from: its folder (for ``__init__.py`` too)."""
    return ".".join(rel[:-3].split("/")[:-1])


def import_edges(root: Path, roots: tuple[str, ...] = ROOTS) -> list[Edge]:
    """Every import between the project's own files under ``roots``."""
    edges = []
    for top in roots:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            source = path.read_text()
            for node in ast.walk(ast.parse(source, filename=rel)):
                targets: list[str] = []
                if isinstance(node, ast.Import):
                    targets = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    module = node.module or ""
                    if node.level:  # relative import: resolve against this file's package
                        package = _package_of(rel).split(".")
                        package = package[: len(package) - (node.level - 1)]
                        module = ".".join([*package, module] if module else package)
                    targets = [f"{module}.{alias.name}" if _module_file(root, f"{module}.{alias.name}") else module
                               for alias in node.names]
                else:
                    continue
                for dotted in targets:
                    if dotted.split(".")[0] not in roots:
                        continue
                    target = _module_file(root, dotted)
                    if target and target != rel:
                        statement = ast.get_source_segment(source, node) or dotted
                        edges.append(Edge(rel, target, node.lineno, " ".join(statement.split())))
    return edges


def _room(rel: str) -> str:
    """'pipelines', 'common', a step name, or 'components' (the package's own __init__)."""
    parts = rel.split("/")
    if parts[0] == "pipelines":
        return "pipelines"
    return parts[1] if len(parts) > 2 else "components"


def rule_violations(edges: list[Edge]) -> list[str]:
    problems = []
    for edge in edges:
        source, target = _room(edge.source), _room(edge.target)
        if source == target or source == "pipelines":
            continue
        if target == "pipelines":
            problems.append(f"{edge}: components must not import pipelines (the pipeline layer sits on top)")
        elif source == "common" and target in STEPS:
            problems.append(f"{edge}: common imports step {target!r}; move what both need into common")
        elif source in STEPS and target in STEPS:
            problems.append(f"{edge}: step {source!r} imports step {target!r}; share it through components/common")
    return problems


def import_cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One circle per strongly connected group of files (Tarjan), as the edges that close it. Breaking that
    circle may leave a smaller one in the same group: the test then names the next."""
    graph: dict[str, list[Edge]] = {}
    for edge in edges:
        graph.setdefault(edge.source, []).append(edge)
        graph.setdefault(edge.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:  # recursion depth is bounded by the number of files (a few hundred)
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for edge in graph[node]:
            if edge.target not in index:
                visit(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in on_stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles = []
    for group in groups:
        # Walk inside the group from its first file until a file repeats: that walk is a circle.
        start = min(group)
        path: list[Edge] = []
        seen = {start: 0}
        node = start
        while True:
            edge = next(e for e in graph[node] if e.target in group)
            path.append(edge)
            if edge.target in seen:
                cycles.append(path[seen[edge.target]:])
                break
            seen[edge.target] = len(path)
            node = edge.target
    return cycles


# ---------------------------------------------------------------------------------------------- the rules

def test_steps_import_only_common_and_common_imports_no_step():
    problems = rule_violations(import_edges(REPO))
    assert not problems, "imports that break the house rules (docs/architecture.md):\n  " + "\n  ".join(problems)


def test_no_import_circles_between_files():
    cycles = import_cycles(import_edges(REPO))
    assert not cycles, "import circles:\n" + "\n".join(
        "  " + "\n    ".join(str(e) for e in cycle) for cycle in cycles)


# ------------------------------------------------------------------------------- the checker can fail

def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.fixture
def toy(tmp_path):
    return _tree(tmp_path, {
        "components/__init__.py": "",
        "components/common/__init__.py": "",
        "components/common/util.py": "def helper():\n    from components.sft import core\n",
        "components/sft/__init__.py": "",
        "components/sft/core.py": "from components.common import util\nfrom components.dpo.core import run\n",
        "components/dpo/__init__.py": "",
        "components/dpo/core.py": "def run():\n    from . import config\n",
        "components/dpo/config.py": "from components.dpo import core\nimport pipelines.cli\n",
        "pipelines/__init__.py": "",
        "pipelines/cli.py": "import os\n",
        "pipelines/run.py": "from components.sft.core import *\n",
    })


def test_checker_names_each_broken_rule_with_its_line(toy):
    problems = rule_violations(import_edges(toy))
    assert any(p.startswith("components/common/util.py:2: `from components.sft import core`") and "common imports step 'sft'" in p
               for p in problems), problems
    assert any(p.startswith("components/sft/core.py:2: `from components.dpo.core import run`") for p in problems), problems
    assert any(p.startswith("components/dpo/config.py:2: `import pipelines.cli`") for p in problems), problems
    assert len(problems) == 3, problems  # sft -> common and pipelines -> sft are allowed


def test_checker_finds_circles_through_in_function_and_relative_imports(toy):
    cycles = import_cycles(import_edges(toy))
    files = sorted({e.source for cycle in cycles for e in cycle})
    # common/util <-> sft/core (in-function), dpo/core <-> dpo/config (relative, in-function)
    assert files == ["components/common/util.py", "components/dpo/config.py", "components/dpo/core.py",
                     "components/sft/core.py"], cycles
