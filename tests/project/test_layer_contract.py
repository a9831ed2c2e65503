"""The layer contract of DESIGN.md, and no import cycles, checked on the source (AST), not by importing it.

Layers, top to bottom; a module may import its own layer and the layers below, never a layer above:

    app          secure_kd.app (the CLI, the demo, the audit and its report)
    services     federation, attacks, defenses
    apparatus    apparatus (what attacks and defenses both build on: tiny LMs, toy classifiers, ...)
    engine       secure_kd outside secure_kd.app

Inside the services layer, `attacks` and `defenses` never import each other, and `federation` imports
neither (an attack or a defense may use the federation: `attacks.federated` runs one). What attacks and
defenses share is the `apparatus` layer between `services` and `engine`; `federation` does not import it
(its Flower app ships federation/ and secure_kd/ only). Every first-party package must have a place in
LAYERS, so a new one cannot slip past the contract.

What counts as an import: every `import` / `from ... import` statement anywhere in a module, at module
level, under `if TYPE_CHECKING:` (a type-only dependency is still a dependency of the design) and inside
functions (a lazy import defers the cost, not the dependency), plus `importlib.import_module("literal")`.
Registries that import their own entries by computed name (`attacks/__init__.py`) are not visible here;
they stay inside their package.

Cycles: all of the above count for cycles too, function-level and type-only imports included: a cycle
closed by a lazy import still ties two modules together (neither can be understood, tested or moved
without the other); break it by moving the shared definitions into a lower module. An import of a
package's own `__init__` from one of its modules counts like any other. The benchmark scripts
(benchmarks/, benchmarks/experiments/) are checked for cycles among themselves: they run as files, so a
bare `import x` there means the sibling script `x.py`.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Top to bottom. Each entry: (layer name, packages). A module belongs to the layer of the longest package
# prefix it matches (secure_kd.app.cli -> app; secure_kd.models -> engine).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("app", ("secure_kd.app",)),
    ("services", ("federation", "attacks", "defenses")),
    ("apparatus", ("apparatus",)),  # shared by attacks and defenses
    ("engine", ("secure_kd",)),
]
# (importer package, imported package) pairs forbidden although the layers would allow them.
# federation -> apparatus too: the Flower app's FAB ships federation/ and secure_kd/ only (pyproject).
INDEPENDENT: frozenset[tuple[str, str]] = frozenset(
    {
        ("attacks", "defenses"),
        ("defenses", "attacks"),
        ("federation", "attacks"),
        ("federation", "defenses"),
        ("federation", "apparatus"),
    }
)
SCRIPT_DIRS = ("benchmarks", "benchmarks/experiments")
# Top-level directories with an __init__.py that hold data, not code: configs/ is the installed package
# secure_kd.resources.configs (setup.py); test_data_packages_hold_no_code keeps it that way.
DATA_PACKAGES = ("configs",)


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    path: Path
    line: int
    kind: str  # "module" (runs on import), "type-only" (under TYPE_CHECKING) or "lazy" (in a function)

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root)}:{self.line} ({self.kind})"


@dataclass
class Graph:
    root: Path
    modules: dict[str, Path] = field(default_factory=dict)
    imports: list[Import] = field(default_factory=list)


def _module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _raw_imports(tree: ast.Module, module: str, is_package: bool):
    """(dotted name, alternative dotted name or None, line, kind) for every import in the module."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[str, str | None, int, str]] = []

    def visit(node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            child_kind = kind
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                child_kind = "lazy"
            elif isinstance(child, ast.If) and _is_type_checking(child.test) and kind == "module":
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), "type-only")
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), kind)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, None, child.lineno, kind) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*up, child.module] if child.module else up)
                else:
                    base = child.module or ""
                found.extend((f"{base}.{alias.name}", base, child.lineno, kind) for alias in child.names)
            elif (
                isinstance(child, ast.Call)
                and (
                    (isinstance(child.func, ast.Attribute) and child.func.attr == "import_module")
                    or (isinstance(child.func, ast.Name) and child.func.id in ("import_module", "__import__"))
                )
                and child.args
                and isinstance(child.args[0], ast.Constant)
                and isinstance(child.args[0].value, str)
            ):
                found.append((child.args[0].value, None, child.lineno, kind))
            visit(child, child_kind)

    visit(tree, "module")
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def build_graph(root: Path, packages: list[str] | None = None) -> Graph:
    """Every import between first-party modules of the packages under `root` (default: every top-level
    directory with an `__init__.py`)."""
    if packages is None:
        packages = sorted(
            p.parent.name for p in root.glob("*/__init__.py") if p.parent.name not in DATA_PACKAGES
        )
    graph = Graph(root)
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                graph.modules[_module_name(path, root)] = path
    _add_imports(graph, graph.modules, lambda name: _resolve(name, graph.modules))
    return graph


def _add_imports(graph: Graph, modules: dict[str, Path], resolve) -> None:
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for name, alternative, line, kind in _raw_imports(tree, module, path.name == "__init__.py"):
            target = resolve(name) if name in graph.modules or alternative is None else resolve(alternative)
            if target is not None and target != module:
                graph.imports.append(Import(module, target, path, line, kind))


def script_graph(root: Path, directories: tuple[str, ...] = SCRIPT_DIRS) -> Graph:
    """Imports among the scripts of each directory (a bare `import x` there is the sibling `x.py`)."""
    graph = Graph(root)
    for directory in directories:
        scripts = {p.stem: p for p in sorted((root / directory).glob("*.py"))}
        names = {f"{directory}/{stem}": path for stem, path in scripts.items()}
        graph.modules.update(names)

        def resolve(name: str, directory: str = directory, scripts: dict = scripts) -> str | None:
            head = name.split(".")[0]
            return f"{directory}/{head}" if head in scripts else None

        _add_imports(graph, names, resolve)
    return graph


def layer_of(module: str) -> tuple[int, str] | None:
    """(rank from the top, package of the contract) of a module, by its longest matching package."""
    best: tuple[int, str] | None = None
    for rank, (_, packages) in enumerate(LAYERS):
        for package in packages:
            if (module == package or module.startswith(package + ".")) and (
                best is None or len(package) > len(best[1])
            ):
                best = (rank, package)
    return best


def layer_violations(graph: Graph) -> list[str]:
    """One line per import that breaks the contract, and per package the contract does not place."""
    problems = []
    for package in sorted({m.split(".")[0] for m in graph.modules}):
        if layer_of(package) is None:
            problems.append(
                f"package {package!r} has no layer: add it to LAYERS in tests/project/test_layer_contract.py"
            )
    for imp in graph.imports:
        source, target = layer_of(imp.importer), layer_of(imp.target)
        if source is None or target is None:
            continue
        source_name, target_name = LAYERS[source[0]][0], LAYERS[target[0]][0]
        if target[0] < source[0]:
            problems.append(
                f"{imp.where(graph.root)}: {imp.importer} ({source_name}) imports {imp.target} "
                f"({target_name}), a layer above it"
            )
        elif (source[1], target[1]) in INDEPENDENT:
            problems.append(
                f"{imp.where(graph.root)}: {imp.importer} imports {imp.target}: {source[1]} and "
                f"{target[1]} must not depend on each other"
            )
    return problems


def import_cycles(graph: Graph) -> list[str]:
    """Each import cycle (a strongly connected component of two or more modules), with one path through
    it and where each of its imports is."""
    edges: dict[str, dict[str, Import]] = {m: {} for m in graph.modules}
    for imp in graph.imports:
        edges[imp.importer].setdefault(imp.target, imp)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan; the graphs here are a few hundred modules deep at most
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in edges[node]:
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return [_describe_cycle(component, edges, graph.root) for component in sorted(components)]


def _describe_cycle(component: list[str], edges: dict[str, dict[str, Import]], root: Path) -> str:
    members = set(component)
    start = component[0]
    # shortest way back to `start`, breadth first inside the component
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier and start not in previous:
        following = []
        for node in frontier:
            for succ in sorted(edges[node]):
                if succ in members and succ not in previous:
                    previous[succ] = node
                    following.append(succ)
        frontier = following
    path = [start]
    while path[-1] != start or len(path) == 1:
        path.append(previous[path[-1]])
    path.reverse()
    steps = ", ".join(
        f"{a} -> {b} at {edges[a][b].where(root)}" for a, b in zip(path, path[1:], strict=False)
    )
    return f"cycle among {', '.join(component)}: {steps}"


def path_edits(root: Path, directories: tuple[str, ...] = SCRIPT_DIRS) -> list[str]:
    """Where a script edits the import path (`sys.path`, PYTHONPATH) or imports `benchmarks.*` (opacus
    installs a top-level package of that name: such an import would find opacus' one)."""
    found = []
    for directory in directories:
        for path in sorted((root / directory).glob("*.py")):
            where = path.relative_to(root)
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (
                    isinstance(node, ast.Attribute)
                    and node.attr == "path"
                    and getattr(node.value, "id", "") == "sys"
                ):
                    found.append(f"{where}:{node.lineno}: sys.path")
                elif isinstance(node, ast.Constant) and node.value == "PYTHONPATH":
                    found.append(f"{where}:{node.lineno}: PYTHONPATH")
                elif isinstance(node, ast.Import | ast.ImportFrom):
                    names = (
                        [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    )
                    if any(n == "benchmarks" or n.startswith("benchmarks.") for n in names):
                        found.append(f"{where}:{node.lineno}: imports benchmarks.*")
    return found


# --------------------------------------------------------------------------- the real tree


def test_the_packages_keep_the_layer_contract():
    graph = build_graph(ROOT)
    packages = {m.split(".")[0] for m in graph.modules}
    assert {"secure_kd", "federation", "attacks", "defenses", "apparatus"} <= packages
    assert any(m.startswith("secure_kd.app.") for m in graph.modules), "the app layer is secure_kd/app/"
    problems = layer_violations(graph)
    assert not problems, "layer contract (DESIGN.md) broken:\n" + "\n".join(problems)


def test_no_import_cycles_in_the_packages_or_the_benchmarks():
    cycles = import_cycles(build_graph(ROOT)) + import_cycles(script_graph(ROOT))
    assert not cycles, "import cycles (move the shared definitions into a lower module):\n" + "\n".join(
        cycles
    )


def test_data_packages_hold_no_code():
    for package in DATA_PACKAGES:
        modules = sorted(str(p.relative_to(ROOT)) for p in (ROOT / package).rglob("*.py"))
        assert modules == [f"{package}/__init__.py"], f"{package}/ is data: no code there ({modules})"
        tree = ast.parse((ROOT / package / "__init__.py").read_text(encoding="utf-8"))
        assert all(isinstance(n, ast.Expr) for n in tree.body), f"{package}/__init__.py: a docstring only"


def test_the_checker_sees_the_app_layer_reach_the_services():
    """Reference for the checker on the real tree: the app does import the services (lazily, for the
    audit's attacks), so the checker would miss nothing an upward import of the same form would be."""
    graph = build_graph(ROOT)
    reached = {
        (i.importer, i.target, i.kind) for i in graph.imports if i.importer.startswith("secure_kd.app")
    }
    assert ("secure_kd.app.report.audit", "attacks", "lazy") in reached
    assert any(target.startswith("federation") for _, target, _ in reached)


# --------------------------------------------------------------------------- the checker, on planted trees


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


CLEAN = {
    "secure_kd/__init__.py": "",
    "secure_kd/models.py": "import torch\nfrom secure_kd import config\n",
    "secure_kd/config.py": "import pydantic\n",
    "secure_kd/app/__init__.py": "",
    "secure_kd/app/cli.py": (
        "from federation.run import go\nfrom secure_kd.models import x\n\n"
        "def attack():\n    from attacks import get_attack\n    from defenses import get_defense\n"
    ),
    "federation/__init__.py": "",
    "federation/run.py": "from secure_kd.models import x\n",
    "attacks/__init__.py": "",
    "attacks/federated.py": "from federation.run import go\nfrom . import helpers\n",
    "attacks/helpers.py": "from secure_kd.config import y\nfrom apparatus.lm import train\n",
    "defenses/__init__.py": "",
    "defenses/swing.py": "from secure_kd.models import x\nfrom apparatus import lm\n",
    "apparatus/__init__.py": "",
    "apparatus/lm.py": "from secure_kd.models import x\n",
}


def test_a_clean_tree_has_no_findings(tmp_path):
    root = _tree(tmp_path, CLEAN)
    graph = build_graph(root)
    assert len(graph.imports) == 13  # the 13 first-party imports of CLEAN; torch and pydantic are external
    assert layer_violations(graph) == []
    assert import_cycles(graph) == []


def test_the_checker_reports_upward_sideways_and_lazy_imports(tmp_path):
    planted = {
        **CLEAN,
        # engine -> services at module level, engine -> app inside a function, engine -> attacks type-only
        "secure_kd/models.py": "import torch\nfrom federation.run import go\n",
        "secure_kd/config.py": "def f():\n    from secure_kd.app import cli\n",
        "secure_kd/metrics.py": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from attacks.federated import A\n"
        ),
        "secure_kd/loader.py": "import importlib\nimportlib.import_module('defenses.swing')\n",
        # siblings that must stay independent, one relative import among them
        "attacks/helpers.py": "from defenses.swing import z\n",
        "defenses/swing.py": "def g():\n    import attacks.federated\n",
        "federation/run.py": "from attacks import helpers\n",
        # the apparatus reaching up to a defense, and the federation down to the apparatus
        "apparatus/lm.py": "def f():\n    from defenses import swing\n",
        "federation/strategies.py": "from apparatus.lm import f\n",
        "newpkg/__init__.py": "",
    }
    problems = layer_violations(build_graph(_tree(tmp_path, planted)))
    text = "\n".join(problems)
    assert "package 'newpkg' has no layer" in text
    expected = [
        "secure_kd/models.py:2 (module): secure_kd.models (engine) imports federation.run (services)",
        "secure_kd/config.py:2 (lazy): secure_kd.config (engine) imports secure_kd.app.cli (app)",
        "secure_kd/metrics.py:3 (type-only): secure_kd.metrics (engine) imports attacks.federated (services)",
        "secure_kd/loader.py:2 (module): secure_kd.loader (engine) imports defenses.swing (services)",
        "attacks/helpers.py:1 (module): attacks.helpers imports defenses.swing: attacks and defenses",
        "defenses/swing.py:2 (lazy): defenses.swing imports attacks.federated: defenses and attacks",
        "federation/run.py:1 (module): federation.run imports attacks.helpers: federation and attacks",
        "apparatus/lm.py:2 (lazy): apparatus.lm (apparatus) imports defenses.swing (services), a layer above",
        "federation/strategies.py:1 (module): federation.strategies imports apparatus.lm: federation and",
    ]
    for line in expected:
        assert line in text, f"not reported: {line}\n{text}"
    assert len(problems) == len(expected) + 1


def test_the_checker_reports_cycles_through_lazy_and_type_only_imports(tmp_path):
    planted = {
        **CLEAN,
        # federation.run -> federation.strategies (module level) -> federation.run (TYPE_CHECKING)
        "federation/run.py": "from federation.strategies import S\n",
        "federation/strategies.py": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from federation.run import Session\n"
        ),
        # a three-module cycle closed by a function-level import, in the app layer
        "secure_kd/app/audit.py": "def render():\n    from secure_kd.app.html import write\n",
        "secure_kd/app/html.py": "from secure_kd.app.result import R\n",
        "secure_kd/app/result.py": "from secure_kd.app import audit\n",
        # and two benchmark scripts importing each other by bare name
        "benchmarks/a.py": "import b\n",
        "benchmarks/b.py": "from a import helper\n",
        "benchmarks/experiments/c.py": "import a\n",  # another directory: not the `a` above
    }
    root = _tree(tmp_path, planted)
    cycles = import_cycles(build_graph(root))
    assert len(cycles) == 2, cycles
    federation, app = sorted(cycles)
    assert federation.startswith("cycle among federation.run, federation.strategies:")
    assert "federation.strategies -> federation.run at federation/strategies.py:3 (type-only)" in federation
    assert app.startswith("cycle among secure_kd.app.audit, secure_kd.app.html, secure_kd.app.result:")
    assert "secure_kd.app.audit -> secure_kd.app.html at secure_kd/app/audit.py:2 (lazy)" in app
    (scripts,) = import_cycles(script_graph(root))
    assert scripts.startswith("cycle among benchmarks/a, benchmarks/b:")
    assert layer_violations(build_graph(root)) == []  # cycles inside a layer break no layer rule


def test_benchmarks_import_the_installed_package():
    """No benchmark script edits the import path: secure-kd comes from the installed package, a sibling
    helper (`_measure`) from the script's own directory, which Python puts first on the path."""
    assert path_edits(ROOT) == []


def test_the_path_edit_check_finds_them(tmp_path):
    root = _tree(
        tmp_path,
        {
            "benchmarks/a.py": "import sys\nfrom pathlib import Path\nsys.path.insert(0, str(Path('.')))\n",
            "benchmarks/experiments/b.py": "import os\nos.environ['PYTHONPATH'] = '..'\n",
            "benchmarks/experiments/c.py": "from benchmarks import _measure\nimport benchmarks.kd_loss\n",
            "benchmarks/d.py": "import sys\nprint(sys.argv)\nimport _measure\n",
        },
    )
    assert path_edits(root) == [
        "benchmarks/a.py:3: sys.path",
        "benchmarks/experiments/b.py:2: PYTHONPATH",
        "benchmarks/experiments/c.py:1: imports benchmarks.*",
        "benchmarks/experiments/c.py:2: imports benchmarks.*",
    ]
