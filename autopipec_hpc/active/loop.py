"""The active-learning loop: train -> (evaluate, publish) -> select -> label -> train warm-started.

Each step leaves a trace in the database (a record, a selection marker, row statuses),
so the next step is decided from the database alone and an interrupted loop resumes
at the first unfinished step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from autopipec_hpc.active.explore_job import exploration_step, run_exploration
from autopipec_hpc.active.explore_plan import ExplorePlan
from autopipec_hpc.active.label_array import check_label_gate, label_step
from autopipec_hpc.active.labeller_config import LabellerConfig, load_labeller
from autopipec_hpc.active.select_job import run_selection, wait_for_selection
from autopipec_hpc.active.selection_claim import live_claims
from autopipec_hpc.active.selection_folder import SelectionRequest
from autopipec_hpc.config import SiteConfig, TrainConfig
from autopipec_hpc.errors import ClaimError, ConfigError, ValidationRejectedError
from autopipec_hpc.generation import reconcile_generation
from autopipec_hpc.states import LoopAction, RecordState, Strategy, StructureStatus
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.store.structures import SELECTION_RECORD

# How often a loop looks at a selection another process runs in this one.
WAIT_POLL_S = 2.0


@dataclass(frozen=True)
class LoopSettings:
    """What the loop is asked, checked once when it is made (before any database is opened
    or file written), each setting named by its ``loop`` option."""

    generations: int  # stop once this generation is published
    select: int  # structures to label per generation at most
    calculator: str | None = None  # MODULE:CLASS that labels (a labeller with default settings)
    kwargs: str | None = None  # its keyword arguments, a JSON object
    labeller_file: Path | None = None  # labeller.yaml, instead of --calculator
    gamma_min: float = 1.0
    strategy: Strategy = Strategy.D_OPTIMAL
    warm: bool = True  # each generation warm-started from the one before
    seed: int = 0  # for --strategy random
    max_atoms: int | None = None  # a budget in atoms per generation, besides --select
    plan: Path | ExplorePlan | None = None  # --plan: each published generation explores first
    converge: float | None = None  # --converge: stop once this share of explored frames is accurate
    labeller: LabellerConfig = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.generations < 1:
            raise ConfigError(f"--generations must be at least 1, got {self.generations}")
        strategy = self.selection(1).strategy  # checks --select, --gamma-min, --strategy
        object.__setattr__(self, "strategy", strategy)
        object.__setattr__(self, "labeller", load_labeller(self.labeller_file, self.calculator, self.kwargs))
        if self.converge is not None and (self.plan is None or not 0 < self.converge <= 1):
            raise ConfigError(f"--converge must be a share in (0, 1] and goes with --plan, got {self.converge}")
        if isinstance(self.plan, (str, Path)):
            object.__setattr__(self, "plan", ExplorePlan.from_yaml(self.plan))

    def selection(self, generation: int) -> SelectionRequest:
        return SelectionRequest(generation=generation, max_select=self.select, gamma_min=self.gamma_min,
                                strategy=self.strategy, seed=self.seed, max_atoms=self.max_atoms,
                                max_option="--select")


_DESCRIPTIONS = {
    LoopAction.WAIT: "wait for generation {g}, already submitted",
    LoopAction.WAIT_SELECTION: "wait for the selection of generation {g}, already in flight",
    LoopAction.SELECT: "select candidates with generation {g}",
    LoopAction.LABEL: "label the structures generation {g} requested",
    LoopAction.DONE: "done: generation {g} is published",
    LoopAction.CONVERGED: "stop: generation {g} selected nothing to label",
    LoopAction.REJECTED: "stop: generation {g} was REJECTED by its validation, not published: {detail}",
    LoopAction.EXPLORE: "explore with generation {g}",
    LoopAction.ACCURATE: "stop: generation {g}'s exploration is accurate enough",
}


@dataclass(frozen=True)
class LoopStep:
    """What the loop does next, decided from the database alone."""

    action: LoopAction
    generation: int
    parent: int | None = None
    # What decided it, where there is more to say: a share against --converge, a REJECTED
    # generation's failed properties.
    detail: str = ""

    def describe(self) -> str:
        if self.action == LoopAction.TRAIN:
            start = f"warm start from generation {self.parent}" if self.parent else "cold start"
            return f"train generation {self.generation} ({start})"
        template = _DESCRIPTIONS[self.action]
        text = template.format(g=self.generation, detail=self.detail)
        return f"{text} ({self.detail})" if self.detail and "{detail}" not in template else text


def next_step(db: DatabaseManager, generations: int, warm: bool = True, site: SiteConfig | None = None,
              explore: bool = False, converge: float | None = None) -> LoopStep:
    """The loop's state machine: train -> (evaluate, publish: the evaluation job) -> select
    -> label -> train the next generation warm-started. Each step leaves a trace in the
    database (a record, a selection claim or row, row statuses), so an interrupted loop
    resumes at the first unfinished step and never repeats a finished one, and a second
    loop on the same database follows the first's steps in flight instead of doubling them.
    ``site`` asks a select job's state (a claim whose job ended is dropped). With ``explore``
    (``--plan``) a published generation explores before it selects (its exploration marker
    is the trace), and the loop stops once the share of accurate frames reaches ``converge``."""
    records = db.records()
    for k, r in enumerate(records):
        if r.status.is_active:
            # A record in flight may not be true (a loop killed between its claim and its
            # job ids, jobs killed outright): brought in line with its jobs first, so a
            # rerun does not wait on a generation that nothing runs.
            records[k] = r = reconcile_generation(db, r.generation) or r
            if r.status.is_active:
                return LoopStep(LoopAction.WAIT, r.generation)
    newest = max(records, key=lambda r: r.generation, default=None)
    if newest is not None and newest.status == RecordState.REJECTED:
        # Building on a generation that failed its gate would spread its faults: a person decides.
        return LoopStep(LoopAction.REJECTED, newest.generation, detail=newest.reason or "")
    done = [r.generation for r in records if r.status == RecordState.SUCCEEDED]
    if not done:
        return LoopStep(LoopAction.TRAIN, 1)
    last = max(done)
    if last >= generations:
        return LoopStep(LoopAction.DONE, last)
    if explore:
        decided = exploration_step(db, last, converge)
        if decided is not None:
            return LoopStep(decided[0], last, detail=decided[1])
    markers = db.markers(SELECTION_RECORD, last)
    if not markers:
        if live_claims(db, last, site):
            return LoopStep(LoopAction.WAIT_SELECTION, last)
        return LoopStep(LoopAction.SELECT, last)
    if db.count(status=StructureStatus.DFT_REQUESTED) or db.count(status=StructureStatus.LABELLING):
        return LoopStep(LoopAction.LABEL, last)
    if int(markers[-1].get("n_selected", 0)) == 0:
        return LoopStep(LoopAction.CONVERGED, last)
    return LoopStep(LoopAction.TRAIN, last + 1, parent=last if warm else None)


def run_loop(
    site: SiteConfig,
    db: DatabaseManager,
    config: TrainConfig,
    settings: LoopSettings,
    timeout_s: float | None = None,
    notify: Callable[[str], None] | None = None,
) -> list[LoopStep]:
    """Run the loop until ``settings.generations`` generations are published (or nothing is
    left to select); returns the steps it took. Resumable: see ``next_step``."""

    say = notify or (lambda message: None)
    timeout = site.result_timeout_s if timeout_s is None else timeout_s
    taken: list[LoopStep] = []
    lost: str | None = None  # the claim this loop lost to another, the step before
    while True:
        step = next_step(db, settings.generations, settings.warm, site, explore=settings.plan is not None,
                         converge=settings.converge)
        if step.action == LoopAction.REJECTED:
            raise ValidationRejectedError(f"loop: {step.describe()}")
        say(f"loop: {step.describe()}")
        if step.action in (LoopAction.DONE, LoopAction.CONVERGED, LoopAction.ACCURATE):
            return taken
        taken.append(step)
        try:
            _take(step, site, db, config, settings, timeout, say)
            lost = None
        except ClaimError as exc:
            # Another loop (or select, or submit) claimed the step first: decide again, and
            # follow what it started. The same claim lost twice in a row is not a race.
            if lost == str(exc):
                raise
            lost = str(exc)
            say(f"loop: {exc}; deciding again")


def _take(step: LoopStep, site: SiteConfig, db: DatabaseManager, config: TrainConfig, settings: LoopSettings,
          timeout: float, say: Callable[[str], None]) -> None:
    from autopipec_hpc.generation import find_run, wait_for_generation
    from autopipec_hpc.submission import submit_generation

    if step.action == LoopAction.WAIT:
        wait_for_generation(find_run(site, step.generation, db.target), timeout)
    elif step.action == LoopAction.TRAIN:
        if step.generation > 1:  # the labels the last generation asked for: too many failed stops here
            check_label_gate(db, step.generation - 1, settings.labeller.max_failed_fraction)
        cfg = config.model_copy(update={"warm_start": step.parent, "reference_energies": None}
                                if step.parent else {"warm_start": None})
        sub = submit_generation(db.target, site, cfg, step.generation, notify=say)
        wait_for_generation(sub.spec.path, timeout)
    elif step.action == LoopAction.SELECT:
        result = run_selection(site, db, settings.selection(step.generation), timeout_s=timeout, notify=say)
        say(f"loop: {len(result.selected_ids)} of {result.scored} candidates requested, "
            f"{result.selected_atoms} atoms ({result.above} with gamma > {settings.gamma_min:g}); {result.folder}")
    elif step.action == LoopAction.WAIT_SELECTION:
        _follow_selection(site, db, step.generation, timeout, say)
    elif step.action == LoopAction.LABEL:
        label_step(site, db, settings.labeller, timeout, notify=say)
    elif step.action == LoopAction.EXPLORE:
        summary = run_exploration(site, db, settings.plan, step.generation, timeout_s=timeout, notify=say)
        say(f"loop: generation {step.generation} explored: {summary.total.seen} frames, accurate share "
            f"{summary.accurate_share:.3f}, {summary.imported} new candidates; {summary.folder}")


def _follow_selection(site: SiteConfig, db: DatabaseManager, generation: int, timeout: float,
                      say: Callable[[str], None]) -> None:
    """Wait for a selection already in flight: its select job (a loop killed while it ran
    follows the job it submitted, never a second one), or another process selecting here."""
    deadline = time.monotonic() + timeout
    while True:
        claims = live_claims(db, generation, site)
        if not claims:
            return
        claim = claims[0]
        if claim.job_file is not None:
            result = wait_for_selection(site, claim.folder, max(deadline - time.monotonic(), 1.0), notify=say)
            say(f"loop: {len(result.selected_ids)} of {result.scored} candidates requested by the select job "
                f"already in flight, {result.selected_atoms} atoms; {result.folder}")
            return
        if time.monotonic() > deadline:
            raise ClaimError(f"generation {generation}: the selection {claim.describe()} is still in flight "
                             f"after {timeout:.0f} s")
        time.sleep(WAIT_POLL_S)
