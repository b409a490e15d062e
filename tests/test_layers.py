"""The import graph's floors (docs/layout.md): foundations at the bottom, the config groups' code
above them, the LightningModule and the cross-group checks above that, the entry points on top.
An import from a lower floor to a higher one is an upward import; at most 3 remain."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# a unit is a top-level module or folder of covo; ground floor first
FLOORS = [
    {"infra", "answers", "optim"},
    {"models", "data", "rollout", "rewards", "algorithms", "eval", "metrics", "callbacks"},
    {"module", "launch.settings"},
    {
        "launch.train",
        "launch.eval",
        "launch",
        "cli",
        "analysis",
        "integrations",
        "score",
        "study",
        "report",
        "__init__",
        "__main__",
    },
]
FLOOR = {unit: floor for floor, units in enumerate(FLOORS) for unit in units}
MAX_UPWARD = 3


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """`covo.launch.train` -> `launch.train` (launch's modules sit on two floors),
    `covo.rewards.base` -> `rewards`, `covo` -> `__init__`."""
    parts = module.split(".")[1:]
    if not parts:
        return "__init__"
    if parts[0] == "launch" and len(parts) > 1:
        return f"launch.{parts[1]}"
    return parts[0]


def covo_imports(path: Path) -> set[str]:
    """The covo modules `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(name for name in names if name == "covo" or name.startswith("covo."))
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): covo_imports(path) for path in (SRC / "covo").rglob("*.py")}


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted(
        (importer, imported)
        for importer, targets in graph.items()
        for imported in targets
        if FLOOR[unit(importer)] < FLOOR[unit(imported)]
    )


def test_every_unit_has_a_floor():
    graph = import_graph()
    units = {unit(name) for name in graph} | {unit(t) for ts in graph.values() for t in ts}
    assert units - FLOOR.keys() == set()


def test_unit_names():
    assert unit("covo") == "__init__"
    assert unit("covo.rewards.covo.reward") == "rewards"
    assert unit("covo.launch.train") == "launch.train"
    assert unit("covo.launch") == "launch"


def test_infra_imports_no_run_orchestration():
    """The foundations import neither the run's orchestration nor what it composes."""
    graph = import_graph()
    reaching = {
        (importer, imported)
        for importer, targets in graph.items()
        if unit(importer) == "infra"
        for imported in targets
        if FLOOR[unit(imported)] >= FLOOR["module"]
    }
    assert reaching == set()


def test_at_most_three_upward_imports():
    upward = upward_imports(import_graph())
    assert len(upward) <= MAX_UPWARD, upward


def test_an_upward_import_is_counted():
    graph = {"covo.infra.errors": {"covo.module"}, "covo.module": {"covo.infra.errors"}}
    assert upward_imports(graph) == [("covo.infra.errors", "covo.module")]
