"""The package's import graph: no cycle, and every import points the right way.

Imports inside functions count too. The package is in layers (``LAYERS``); a module
imports only modules of its own layer or of a layer it may use (``MAY_IMPORT``):

- core: the library without any scheduler or login-node flow -- ``states``, ``errors``,
  ``files``, ``processes``, ``config``, ``templates``, ``frames``, ``physics``, ``splits``,
  ``store.*``, ``dataset_prep``, ``dataset_files``, ``pacemaker.*``, ``evaluation``,
  ``registry``, ``warm_start``, ``run_folder``, ``example_data``, ``validate.*`` and the package itself.
  It never imports ``scheduler``, ``submission``, ``generation``, ``jobs``, ``active`` or ``cli``.
- backend: ``scheduler`` and ``scheduler.*`` (local and SLURM); core only.
- compute: ``jobs``, the bodies the backends run on compute nodes; core only. The backends
  run it without importing it (they run any callable); ``submission`` alone, where the
  login side hands the bodies to the scheduler, and the test helpers import it.
- login: ``submission``, ``generation``, ``preflight``, ``demo``, ``active`` and ``active.*``
  (prepare, claim, submit, follow, select, label, loop); core, backend and login.
- cli: ``cli`` and ``cli.*``; anything but ``jobs``. Nothing outside it imports it.
- testing: ``testing.*`` (fault injectors, reference codes); anything.

And no module is over ``MAX_LINES`` lines; ``autopipec-hpc --version`` imports neither
``ase.io`` nor ``pandas``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

PACKAGE = "autopipec_hpc"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts}


def imported_modules(name: str, path: Path) -> set[str]:
    """The package modules ``name`` imports anywhere in its source (module level or in functions).
    ``from X import y`` counts as an import of ``X.y`` where that is a module, else of ``X``."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


def import_graph() -> dict[str, set[str]]:
    return {name: imported_modules(name, path) for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "autopipec_hpc.scheduler.local" in graph["autopipec_hpc.scheduler"]  # imported in scheduler_for
    assert "autopipec_hpc.evaluation" in graph["autopipec_hpc.jobs"]  # from autopipec_hpc import evaluation
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_the_package_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# -- directions ------------------------------------------------------------------------------

CORE = [
    "autopipec_hpc", "autopipec_hpc.states", "autopipec_hpc.errors", "autopipec_hpc.files",
    "autopipec_hpc.processes", "autopipec_hpc.config", "autopipec_hpc.templates", "autopipec_hpc.frames",
    "autopipec_hpc.physics", "autopipec_hpc.splits", "autopipec_hpc.store", "autopipec_hpc.store.*",
    "autopipec_hpc.dataset_prep", "autopipec_hpc.dataset_files", "autopipec_hpc.pacemaker",
    "autopipec_hpc.pacemaker.*", "autopipec_hpc.evaluation", "autopipec_hpc.registry",
    "autopipec_hpc.warm_start", "autopipec_hpc.run_folder", "autopipec_hpc.example_data",
    "autopipec_hpc.validate", "autopipec_hpc.validate.*",
    "autopipec_hpc.levels",
]
LAYERS: dict[str, list[str]] = {
    "core": CORE,
    "backend": ["autopipec_hpc.scheduler", "autopipec_hpc.scheduler.*"],
    "compute": ["autopipec_hpc.jobs"],
    "login": ["autopipec_hpc.submission", "autopipec_hpc.generation", "autopipec_hpc.preflight",
              "autopipec_hpc.demo", "autopipec_hpc.active", "autopipec_hpc.active.*"],
    "cli": ["autopipec_hpc.cli", "autopipec_hpc.cli.*"],
    "testing": ["autopipec_hpc.testing", "autopipec_hpc.testing.*"],
}
MAY_IMPORT: dict[str, set[str]] = {
    "core": {"core"},
    "backend": {"core", "backend"},
    "compute": {"core", "compute"},
    "login": {"core", "backend", "login"},
    "cli": {"core", "backend", "login", "cli"},
    "testing": set(LAYERS),
}
MAX_LINES = 450
# The one import across the layers above: the hand-over of the job bodies to the scheduler.
HANDOVER = ("autopipec_hpc.submission", "autopipec_hpc.jobs")


def layer_of(module: str) -> str | None:
    found = [layer for layer, patterns in LAYERS.items() if any(fnmatch(module, p) for p in patterns)]
    assert len(found) <= 1, f"{module} matches the layers {found}"
    return found[0] if found else None


def wrong_way(graph: dict[str, set[str]]) -> list[str]:
    """``importer -> imported (layer -> layer)`` for every import against MAY_IMPORT."""
    return sorted(
        f"{name} -> {target} ({layer_of(name)} -> {layer_of(target)})"
        for name, targets in graph.items()
        for target in targets
        if layer_of(target) not in MAY_IMPORT[layer_of(name)] and (name, target) != HANDOVER
    )


def test_the_direction_check_sees_a_wrong_import():
    assert layer_of("autopipec_hpc.store.records") == "core"
    assert layer_of("autopipec_hpc.scheduler.slurm") == "backend"
    graph = {"autopipec_hpc.scheduler.local": {"autopipec_hpc.jobs"}, "autopipec_hpc.registry": {"autopipec_hpc.cli"},
             "autopipec_hpc.cli.commands": {"autopipec_hpc.submission", "autopipec_hpc.store"}}
    assert wrong_way(graph) == [
        "autopipec_hpc.registry -> autopipec_hpc.cli (core -> cli)",
        "autopipec_hpc.scheduler.local -> autopipec_hpc.jobs (backend -> compute)",
    ]


def test_every_module_has_a_layer():
    unplaced = sorted(name for name in MODULES if layer_of(name) is None)
    assert not unplaced, f"place these in a layer of tests/test_imports.py: {unplaced}"


def test_imports_point_from_the_cli_and_login_side_down_to_the_core():
    wrong = wrong_way(import_graph())
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_only_submission_and_the_test_helpers_import_the_job_bodies():
    importers = sorted(name for name, targets in import_graph().items()
                       if "autopipec_hpc.jobs" in targets and layer_of(name) != "testing"
                       and (name, "autopipec_hpc.jobs") != HANDOVER)
    assert not importers, f"import autopipec_hpc.jobs: {importers}"


def test_nothing_outside_the_cli_imports_the_cli():
    importers = sorted(name for name, targets in import_graph().items()
                       if layer_of(name) != "cli" and any(layer_of(t) == "cli" for t in targets))
    assert not importers, f"import autopipec_hpc.cli: {importers}"


def test_the_core_imports_no_scheduler_submission_generation_jobs_active_or_cli():
    banned = ("autopipec_hpc.scheduler", "autopipec_hpc.submission", "autopipec_hpc.generation",
              "autopipec_hpc.jobs", "autopipec_hpc.active", "autopipec_hpc.cli")
    wrong = sorted(f"{name} -> {target}" for name, targets in import_graph().items() if layer_of(name) == "core"
                   for target in targets if any(target == b or target.startswith(b + ".") for b in banned))
    assert not wrong, "the core imports: " + ", ".join(wrong)


def test_no_module_is_over_the_line_limit():
    long = sorted(f"{name}: {n} lines" for name, path in MODULES.items()
                  if (n := len(path.read_text().splitlines())) > MAX_LINES)
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_version_imports_neither_ase_io_nor_pandas():
    """In a fresh interpreter, as `autopipec-hpc --version` runs: the science stack stays unloaded."""
    code = (
        "import json, sys\n"
        "from autopipec_hpc.cli import main\n"
        "try:\n"
        "    main(['--version'])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code in (0, None), exc.code\n"
        "print(json.dumps(sorted(m for m in sys.modules if m in ('ase', 'ase.io', 'pandas', 'numpy'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "autopipec-hpc" in done.stdout  # the version line itself was printed
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert "ase.io" not in loaded and "pandas" not in loaded, loaded
