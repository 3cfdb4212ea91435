"""The active-learning loop: train -> (evaluate, publish) -> select -> label -> train warm-started.

Each step leaves a trace in the database (a record, a selection marker, row statuses),
so the next step is decided from the database alone and an interrupted loop resumes
at the first unfinished step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from autopipec_hpc.active.labelling import label_requested, load_calculator_class
from autopipec_hpc.active.select_job import run_selection
from autopipec_hpc.active.selection import check_selection_args
from autopipec_hpc.errors import ConfigError
from autopipec_hpc.states import RecordState, StructureStatus
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.store.structures import SELECTION_RECORD


# -- the loop -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoopStep:
    """What the loop does next, decided from the database alone."""

    action: str  # wait, train, select, label, done, converged
    generation: int
    parent: int | None = None

    def describe(self) -> str:
        if self.action == "train":
            start = f"warm start from generation {self.parent}" if self.parent else "cold start"
            return f"train generation {self.generation} ({start})"
        return {
            "wait": f"wait for generation {self.generation}, already submitted",
            "select": f"select candidates with generation {self.generation}",
            "label": f"label the structures generation {self.generation} requested",
            "done": f"done: generation {self.generation} is published",
            "converged": f"stop: generation {self.generation} selected nothing to label",
        }[self.action]


def next_step(db: DatabaseManager, generations: int, warm: bool = True) -> LoopStep:
    """The loop's state machine: train -> (evaluate, publish: the evaluation job) -> select
    -> label -> train the next generation warm-started. Each step leaves a trace in the
    database (a record, a selection row, row statuses), so an interrupted loop resumes
    at the first unfinished step and never repeats a finished one."""
    records = db.records()
    for r in records:
        if r.status.is_active:
            return LoopStep("wait", r.generation)
    done = [r.generation for r in records if r.status == RecordState.SUCCEEDED]
    if not done:
        return LoopStep("train", 1)
    last = max(done)
    if last >= generations:
        return LoopStep("done", last)
    markers = db.markers(SELECTION_RECORD, last)
    if not markers:
        return LoopStep("select", last)
    if db.count(status=StructureStatus.DFT_REQUESTED):
        return LoopStep("label", last)
    if int(markers[-1].get("n_selected", 0)) == 0:
        return LoopStep("converged", last)
    return LoopStep("train", last + 1, parent=last if warm else None)


def run_loop(
    site,
    database: str,
    config,
    generations: int,
    select_max: int,
    calculator: str,
    kwargs_json: str | None = None,
    gamma_min: float = 1.0,
    strategy: str = "d-optimal",
    warm: bool = True,
    timeout_s: float | None = None,
    notify: Callable[[str], None] | None = None,
) -> list[LoopStep]:
    """Run the loop until ``generations`` generations are published (or nothing is left
    to select); returns the steps it took. Resumable: see ``next_step``."""
    from autopipec_hpc.generation import find_run, wait_for_generation
    from autopipec_hpc.submission import submit_generation

    if generations < 1:
        raise ConfigError(f"--generations must be at least 1, got {generations}")
    check_selection_args(select_max, gamma_min, strategy, 1, max_option="--select")
    load_calculator_class(calculator, kwargs_json)
    say = notify or (lambda message: None)
    db = DatabaseManager(database)
    timeout = site.result_timeout_s if timeout_s is None else timeout_s
    taken: list[LoopStep] = []
    while True:
        step = next_step(db, generations, warm)
        say(f"loop: {step.describe()}")
        if step.action in ("done", "converged"):
            return taken
        taken.append(step)
        if step.action == "wait":
            wait_for_generation(find_run(site, step.generation, database), timeout)
        elif step.action == "train":
            cfg = config.model_copy(update={"warm_start": step.parent, "reference_energies": None}
                                    if step.parent else {"warm_start": None})
            sub = submit_generation(database, site, cfg, step.generation, notify=say)
            wait_for_generation(sub.spec.path, timeout)
        elif step.action == "select":
            result = run_selection(site, database, step.generation, select_max, gamma_min, strategy,
                                   timeout_s=timeout, notify=say)
            say(f"loop: {len(result.selected_ids)} of {result.scored} candidates requested "
                f"({result.above} with gamma > {gamma_min:g}); {result.folder}")
        elif step.action == "label":
            label_requested(database, calculator, kwargs_json, notify=say)
