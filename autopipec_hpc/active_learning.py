"""Active learning: score candidates by extrapolation grade, choose what to label, label it.

``select_candidates`` reads the CANDIDATE rows a page at a time, computes each
one's extrapolation grade gamma (per atom, with generation N's published ACE
potential and its active set ``potential.asi``: exactly ``PyACECalculator`` +
``set_active_set``), writes ``gamma_max``, ``gamma_mean`` and
``scored_by_generation`` on every scored row, and chooses at most M of those with
``gamma_max > gamma_min`` by D-optimality together with the existing active set,
with pacemaker's own MaxVol selection (``pyace.aceselect.select_structures_maxvol``,
the body of ``pace_select``). The choice is made chunk by chunk (the chunk's
candidates plus the ones chosen so far), so memory follows the chunk and M,
never the pool. Chosen rows become DFT_REQUESTED; ``label_requested`` labels them
with any ASE calculator and makes them TRAINING_READY. These are the only status
changes either makes: CANDIDATE -> DFT_REQUESTED -> TRAINING_READY.

On a SLURM site ``run_selection`` submits the selection as one job (``SelectJob``,
``submit_selection``) and waits for its summary (``wait_for_selection``); its folder
is named in ``selection_folder.py``.
"""

from __future__ import annotations

import heapq
import importlib
import json
import logging
import math
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autopipec_hpc import registry
from autopipec_hpc.config import SiteConfig
from autopipec_hpc.db import (
    SELECTION_RECORD,
    DatabaseManager,
    RecordState,
    StructureStatus,
    absolute_target,
    label_of,
)
from autopipec_hpc.errors import AutopipecError, ConfigError, LabellingError, SchedulerError, SelectionError
from autopipec_hpc.files import atomic_write_text, fresh_dir
from autopipec_hpc.processes import die_with_local_controller
from autopipec_hpc.scheduler.base import FINISHED, JobState, SubmittedTask
from autopipec_hpc.selection_folder import SELECT_ROLE, SelectionFolder, SelectionRequest, default_selection_dir

log = logging.getLogger(__name__)

STRATEGIES = ("d-optimal", "top-gamma", "random")
# pacemaker's customary thresholds: above 5 a structure is extrapolative, above 25 unreliable.
GAMMA_WRITE = registry.GAMMA_WRITE
GAMMA_STOP = registry.GAMMA_STOP


@dataclass
class ConfigTypeSummary:
    scored: int = 0
    above: int = 0
    above_5: int = 0
    selected: int = 0
    gamma_max: list[float] = field(default_factory=list)  # per structure, for the histogram

    def row(self) -> dict[str, Any]:
        g = np.asarray(self.gamma_max) if self.gamma_max else np.asarray([np.nan])
        return {"scored": self.scored, "above_gamma_min": self.above, "above_5": self.above_5,
                "selected": self.selected, "gamma_max_median": float(np.median(g)),
                "gamma_max_max": float(np.max(g))}


@dataclass
class SelectionResult:
    generation: int
    strategy: str
    max_select: int
    gamma_min: float
    folder: str
    scored: int
    above: int
    selected_ids: list[int]
    skipped: dict[int, list[str]]  # row id -> elements the potential does not know
    by_config_type: dict[str, dict[str, Any]]
    histograms: list[str]

    @property
    def share_above_5(self) -> float:
        n = sum(c["scored"] for c in self.by_config_type.values())
        return sum(c["above_5"] for c in self.by_config_type.values()) / n if n else 0.0


def published_potential(db: DatabaseManager, generation: int) -> Path:
    """The published folder of ``generation``, with its active set; SelectionError if none."""
    record = db.get_record(generation)
    if record is None:
        raise SelectionError(f"generation {generation}: no training record in {db.target}")
    if record.status != RecordState.SUCCEEDED or record.potential_path is None:
        raise SelectionError(f"generation {generation} has no published potential (record {record.status})")
    folder = Path(record.potential_path)
    for name in (registry.POTENTIAL_YAML, registry.ACTIVE_SET, registry.MANIFEST):
        if not (folder / name).exists():
            raise SelectionError(f"generation {generation}: {folder / name} is missing; cannot score candidates")
    return folder


def check_selection_args(max_select: int, gamma_min: float, strategy: str, batch: int,
                         max_option: str = "--max") -> None:
    """Refuse bad selection settings by the option the user typed (``loop`` and
    ``demo --loop`` call the budget ``--select``)."""
    if max_select < 1:
        raise ConfigError(f"{max_option} must be at least 1, got {max_select}")
    if not math.isfinite(gamma_min) or gamma_min < 0:
        raise ConfigError(f"--gamma-min must be a finite number >= 0, got {gamma_min}")
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if batch < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch}")


class GammaScorer:
    """Per-atom extrapolation grades of a published potential (ACE part, with its active set)."""

    def __init__(self, folder: Path) -> None:
        from pyace import PyACECalculator

        self.calc = PyACECalculator(str(folder / registry.POTENTIAL_YAML))
        self.calc.set_active_set(str(folder / registry.ACTIVE_SET))
        self.elements = set(registry.read_manifest(folder).elements)

    def unknown(self, atoms) -> list[str]:
        return sorted(set(atoms.get_chemical_symbols()) - self.elements)

    def gamma(self, atoms) -> np.ndarray:
        atoms = atoms.copy()
        atoms.calc = self.calc
        atoms.get_potential_energy()
        return np.asarray(self.calc.results["gamma"], dtype=float)


def _batches(rows: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class _DOptimalChooser:
    """At most M structures by D-optimality with the existing active set, chunk by chunk:
    each chunk is offered to pace_select's MaxVol together with the structures kept so far."""

    def __init__(self, folder: Path, max_select: int) -> None:
        from pyace import BBasisConfiguration
        from pyace.activelearning import compute_A_active_inverse, load_active_inverse_set

        self.bconf = BBasisConfiguration(str(folder / registry.POTENTIAL_YAML))
        self.extra = compute_A_active_inverse(load_active_inverse_set(str(folder / registry.ACTIVE_SET)))
        self.max_select = max_select
        self.kept: list[tuple[int, Any]] = []  # (row id, atoms)

    def offer(self, chunk: list[tuple[int, Any, float]]) -> None:
        import pandas as pd
        from pyace.aceselect import select_structures_maxvol

        pool = self.kept + [(row_id, atoms) for row_id, atoms, _ in chunk]
        if not pool:
            return
        df = pd.DataFrame({"row_id": [p[0] for p in pool], "ase_atoms": [p[1] for p in pool]})
        extra = {st: a.copy() for st, a in self.extra.items()}
        chosen = select_structures_maxvol(df, self.bconf, extra_A0_projections_dict=extra, batch_size_option="none",
                                          max_structures=self.max_select, verbose=False)
        self.kept = [(int(r), a) for r, a in zip(chosen["row_id"], chosen["ase_atoms"])]

    def ids(self) -> list[int]:
        return [row_id for row_id, _ in self.kept]


def select_candidates(
    database: str,
    generation: int,
    max_select: int = 20,
    gamma_min: float = 1.0,
    strategy: str = "d-optimal",
    batch: int = 200,
    seed: int = 0,
    out_dir: str | Path | None = None,
    notify: Callable[[str], None] | None = None,
    folder_made: SelectionFolder | None = None,
) -> SelectionResult:
    """Score every CANDIDATE row with generation ``generation``'s potential and choose at most
    ``max_select`` for labelling (module docstring). Writes gamma on every scored row, the
    chosen rows' DFT_REQUESTED and a ``record=selection`` row; a summary and histograms
    per config_type go to a new folder ``out_dir`` (default: ``<output>/selections/gen-N``),
    or into ``folder_made``, the folder a submitted select job was given."""
    check_selection_args(max_select, gamma_min, strategy, batch)
    db = DatabaseManager(database)
    folder = published_potential(db, generation)
    say = notify or (lambda message: None)
    scorer = GammaScorer(folder)
    chooser = _DOptimalChooser(folder, max_select) if strategy == "d-optimal" else None
    rng = np.random.default_rng(seed)
    heap: list[tuple[float, int]] = []  # top-gamma or random keys
    summary: dict[str, ConfigTypeSummary] = defaultdict(ConfigTypeSummary)
    skipped: dict[int, list[str]] = {}
    scored = above = 0
    for rows in _batches(db.iter_rows(status=StructureStatus.CANDIDATE), batch):
        updates, chunk = [], []
        for row in rows:
            atoms = row.toatoms()
            unknown = scorer.unknown(atoms)
            if unknown:
                skipped[row.id] = unknown
                continue
            g = scorer.gamma(atoms)
            gmax, gmean = float(g.max()), float(g.mean())
            ctype = label_of(row)
            s = summary[ctype]
            s.scored += 1
            s.gamma_max.append(gmax)
            s.above_5 += gmax > GAMMA_WRITE
            updates.append((row.id, {"gamma_max": gmax, "gamma_mean": gmean, "scored_by_generation": generation}))
            scored += 1
            if gmax <= gamma_min:
                continue
            s.above += 1
            above += 1
            if chooser is not None:
                chunk.append((row.id, atoms, gmax))
            else:
                key = gmax if strategy == "top-gamma" else float(rng.random())
                item = (key, row.id)
                if len(heap) < max_select:
                    heapq.heappush(heap, item)
                else:
                    heapq.heappushpop(heap, item)
        db.update_rows(updates)
        if chooser is not None and chunk:
            chooser.offer(chunk)
        say(f"scored {scored} candidates ({above} with gamma > {gamma_min:g})")
    chosen = chooser.ids() if chooser is not None else [row_id for _, row_id in sorted(heap, reverse=True)]
    ctype_of = {}
    for row_id in chosen:
        ctype = str(db.get_row(row_id).get("config_type", "default"))
        ctype_of[row_id] = ctype
        summary[ctype].selected += 1
    out = folder_made.path if folder_made else fresh_dir(Path(out_dir) if out_dir else
                                                         default_selection_dir(folder.parent.parent, generation))
    histograms = _histograms(summary, out, generation, gamma_min)
    result = SelectionResult(
        generation=generation, strategy=strategy, max_select=max_select, gamma_min=gamma_min, folder=str(out),
        scored=scored, above=above, selected_ids=sorted(chosen), skipped=skipped,
        by_config_type={ct: s.row() for ct, s in sorted(summary.items())}, histograms=histograms,
    )
    db.commit_selection(
        generation, chosen,
        values={"strategy": strategy, "n_scored": scored, "n_above": above, "n_selected": len(chosen),
                "gamma_min": gamma_min, "max_select": max_select, "folder": str(out)},
        data={"selected_ids": sorted(chosen), "skipped": {str(k): v for k, v in skipped.items()},
              "by_config_type": result.by_config_type},
    )
    # Written after the commit, so that a summary always tells of a selection that happened.
    atomic_write_text(SelectionFolder(out).summary_file, json.dumps(asdict(result), indent=2))
    return result


def _histograms(summary: dict[str, ConfigTypeSummary], out: Path, generation: int, gamma_min: float) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for ctype, s in sorted(summary.items()):
        if not s.gamma_max:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        g = np.asarray(s.gamma_max)
        bins = np.logspace(np.log10(max(g.min(), 1e-3)), np.log10(max(g.max(), 1e-2) * 1.01), 30)
        ax.hist(g, bins=bins, color="tab:blue")
        ax.set_xscale("log")
        for x, style in ((gamma_min, "--"), (GAMMA_WRITE, ":"), (GAMMA_STOP, "-.")):
            ax.axvline(x, color="k", ls=style, lw=0.8)
        ax.set_xlabel("structure max gamma")
        ax.set_ylabel("candidates")
        ax.set_title(f"generation {generation}: {ctype} ({s.scored} scored, {s.selected} selected)")
        fig.tight_layout()
        name = f"gamma_{re.sub(r'[^A-Za-z0-9_.-]', '_', ctype)}.png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        names.append(name)
    return names


# -- select as a job of the site's scheduler ----------------------------------------------
# The job's files may trail the scheduler's word that it ended (a shared filesystem).
RESULT_GRACE_S = 15.0


def selects_in_a_job(site: SiteConfig) -> bool:
    """Whether ``select`` runs as a job of the site's scheduler. On a cluster it does: scoring
    100,000 candidates belongs on a compute node. The local site selects in the calling
    process: a local job would run on the same machine, only later and without live progress."""
    return site.scheduler != "local"


@dataclass(frozen=True)
class SelectionSubmission:
    """A submitted select job: what it was asked and where it runs."""

    request: SelectionRequest
    task: SubmittedTask

    @property
    def folder(self) -> SelectionFolder:
        return SelectionFolder(self.request.folder)


class SelectJob:
    """The select job's body: the request saved in its folder. The folder gets the summary
    once the selection is committed, or the job's error (``select.failed``)."""

    def __call__(self, folder: str) -> dict[str, Any]:
        die_with_local_controller()
        selection = SelectionFolder(folder)
        if selection.summary_file.exists():
            raise SelectionError(f"{selection.path} holds a finished selection; select again for a new one")
        selection.failure_file.unlink(missing_ok=True)  # a resubmission by hand starts clean
        try:
            request = SelectionRequest.load(folder)
            result = select_candidates(
                request.database, request.generation, request.max_select, request.gamma_min, request.strategy,
                request.batch, request.seed, notify=lambda message: print(message, flush=True),
                folder_made=selection,
            )
        except Exception as exc:
            selection.record_failure(_one_line(exc))
            raise
        return asdict(result)


def _one_line(exc: BaseException) -> str:
    """An error as the user reads it: our own errors as they are, others with their type."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, AutopipecError) and text else f"{type(exc).__name__}: {text}"


def submit_selection(
    site: SiteConfig,
    database: str,
    generation: int,
    max_select: int = 20,
    gamma_min: float = 1.0,
    strategy: str = "d-optimal",
    batch: int = 200,
    seed: int = 0,
    out_dir: str | Path | None = None,
    notify: Callable[[str], None] | None = None,
) -> SelectionSubmission:
    """Check the arguments, the published potential and the scheduler here, then submit one
    select job (``SelectJob``) with the site's ``select`` resources. Its folder, the
    summary folder (``selection_folder.py``), keeps the request, the job script and log."""
    from autopipec_hpc.scheduler import scheduler_for

    check_selection_args(max_select, gamma_min, strategy, batch)
    say = notify or (lambda message: None)
    database = absolute_target(database)
    potential = published_potential(DatabaseManager(database), generation)
    scheduler = scheduler_for(site)
    for warning in scheduler.check():
        say(f"warning: {warning}")
    target = Path(out_dir).resolve() if out_dir else default_selection_dir(potential.parent.parent, generation)
    folder = SelectionFolder(fresh_dir(target))
    request = SelectionRequest(database=database, generation=generation, max_select=max_select,
                               gamma_min=gamma_min, strategy=strategy, batch=batch, seed=seed,
                               folder=str(folder.path))
    request.save()
    try:
        task = scheduler.submit_task(SelectJob(), folder, SELECT_ROLE, f"autopipec-g{generation}-{SELECT_ROLE}",
                                     site.select_resources)
    except BaseException as exc:
        folder.record_failure(f"not submitted: {_one_line(exc)}")
        raise
    task.save(folder.job_file)
    return SelectionSubmission(request, task)


def read_selection(folder: SelectionFolder) -> SelectionResult:
    data = json.loads(folder.summary_file.read_text())
    data["skipped"] = {int(k): v for k, v in data["skipped"].items()}  # JSON keys are strings
    return SelectionResult(**data)


def wait_for_selection(
    site: SiteConfig,
    folder: str | Path,
    timeout_s: float,
    poll_s: float = 2.0,
    notify: Callable[[str], None] | None = None,
) -> SelectionResult:
    """Block until the select job in ``folder`` has committed its selection and return it;
    SelectionError (one line: the job's error, or how it ended) if it ended without one,
    SchedulerError if it is still going after ``timeout_s``."""
    from autopipec_hpc.scheduler import scheduler_for

    say = notify or (lambda message: None)
    selection = SelectionFolder(folder)
    task = SubmittedTask.load(selection.job_file)
    scheduler = scheduler_for(site)
    deadline = time.monotonic() + timeout_s
    ended_at: float | None = None
    last_state: JobState | None = None
    while True:
        if selection.summary_file.exists():
            return read_selection(selection)
        error = selection.failure()
        if error is not None:
            raise SelectionError(f"select job {task.job_id} failed: {error} (log {task.stderr})")
        state = scheduler.task_state(task)
        if state != last_state:
            say(f"select job {task.job_id}: {state}")
            last_state = state
        if state in FINISHED:
            ended_at = ended_at or time.monotonic()
            if time.monotonic() - ended_at > RESULT_GRACE_S:
                raise SelectionError(f"select job {task.job_id} ended {state} without a selection"
                                     f"{_log_end(task.stderr)} (log {task.stderr})")
        if time.monotonic() > deadline:
            raise SchedulerError(f"select job {task.job_id} not finished after {timeout_s:.0f} s ({state}); "
                                 f"it keeps running: its summary will be {selection.summary_file}")
        time.sleep(poll_s)


def _log_end(path: Path) -> str:
    """The last line of a job's log of errors, as '': <line>' (a kill names itself there)."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return f": {lines[-1][:300]}" if lines else ""


def run_selection(
    site: SiteConfig,
    database: str,
    generation: int,
    max_select: int = 20,
    gamma_min: float = 1.0,
    strategy: str = "d-optimal",
    batch: int = 200,
    seed: int = 0,
    out_dir: str | Path | None = None,
    timeout_s: float | None = None,
    notify: Callable[[str], None] | None = None,
) -> SelectionResult:
    """``select`` where the site runs it (``selects_in_a_job``): in this process, or as a job
    that this call submits and waits for."""
    if not selects_in_a_job(site):
        return select_candidates(database, generation, max_select, gamma_min, strategy, batch, seed, out_dir,
                                 notify=notify)
    say = notify or (lambda message: None)
    sub = submit_selection(site, database, generation, max_select, gamma_min, strategy, batch, seed, out_dir,
                           notify=say)
    say(f"select job {sub.task.job_id} submitted ({sub.task.scheduler}); folder {sub.folder.path}")
    timeout = site.result_timeout_s if timeout_s is None else timeout_s
    return wait_for_selection(site, sub.folder.path, timeout, notify=say)


# -- labelling -------------------------------------------------------------------------
def load_calculator_class(spec: str, kwargs_json: str | None = None) -> tuple[type, dict[str, Any]]:
    """``MODULE:CLASS`` and its keyword arguments (a JSON object), checked by making one."""
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise LabellingError(f"--calculator {spec!r}: expected MODULE:CLASS, e.g. ase.calculators.emt:EMT")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises on import
        raise LabellingError(f"--calculator {spec!r}: cannot import {module_name!r} ({exc})") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise LabellingError(f"--calculator {spec!r}: {module_name} has no class {class_name!r}")
    kwargs: Any = {}
    if kwargs_json:
        try:
            kwargs = json.loads(kwargs_json)
        except json.JSONDecodeError as exc:
            raise LabellingError(f"--kwargs is not valid JSON ({exc})") from None
        if not isinstance(kwargs, dict):
            raise LabellingError(f"--kwargs must be a JSON object, got {type(kwargs).__name__}")
    try:
        cls(**kwargs)
    except Exception as exc:
        raise LabellingError(f"--calculator {spec!r} refused --kwargs {json.dumps(kwargs)}: {exc}") from None
    return cls, kwargs


@dataclass
class LabelResult:
    labelled: list[int]


def label_requested(
    database: str, spec: str, kwargs_json: str | None = None, notify: Callable[[str], None] | None = None
) -> LabelResult:
    """Label every DFT_REQUESTED row with ``MODULE:CLASS(**kwargs)`` and make it TRAINING_READY.
    Each row is written as soon as it is labelled, so an interrupted run loses nothing."""
    cls, kwargs = load_calculator_class(spec, kwargs_json)
    db = DatabaseManager(database)
    say = notify or (lambda message: None)
    done: list[int] = []
    ids = [row.id for row in db.iter_rows(status=StructureStatus.DFT_REQUESTED)]
    for row_id in ids:
        row = db.get_row(row_id)
        if row.get("status") != StructureStatus.DFT_REQUESTED:
            continue
        atoms = row.toatoms()
        atoms.calc = cls(**kwargs)
        try:
            energy = float(atoms.get_potential_energy())
            forces = np.asarray(atoms.get_forces(), dtype=float)
        except Exception as exc:
            raise LabellingError(
                f"structure id={row_id}: {spec} failed ({exc}); {len(done)} rows labelled before it"
            ) from None
        if not math.isfinite(energy) or forces.shape != (len(atoms), 3) or not np.isfinite(forces).all():
            raise LabellingError(f"structure id={row_id}: {spec} gave a non-finite energy or bad forces")
        db.set_labels(row_id, energy, forces, StructureStatus.TRAINING_READY, labelled_by=spec)
        done.append(row_id)
    say(f"labelled {len(done)} structures with {spec}")
    return LabelResult(done)


# -- comparable generations ---------------------------------------------------------------
@dataclass
class CommonHoldoutRow:
    generation: int
    parent_generation: int | None
    structures: int
    energy_rmse_mev: float
    force_rmse_mev: float
    force_max_mev: float


def common_holdout(db: DatabaseManager, generations: list[int] | None = None) -> tuple[list[int], list[CommonHoldoutRow]]:
    """Every published generation (or ``generations``) evaluated on the same rows: the
    intersection of their holdouts (with the stable split, the first one's holdout).
    The deployed model (ACE + ZBL + reference energies) against the stored labels:
    energy RMSE in meV/atom, force RMSE and largest error per Cartesian component in meV/A."""
    from autopipec_hpc.dataset_prep import DatasetManifest

    records = [r for r in db.records() if r.status == RecordState.SUCCEEDED and r.potential_path is not None]
    if generations is not None:
        records = [r for r in records if r.generation in generations]
    holdouts = []
    for r in records:
        manifest = DatasetManifest.load(Path(r.potential_path))
        holdouts.append(set(manifest.test_ids))
    common = sorted(set.intersection(*holdouts)) if holdouts else []
    structures = [db.get_row(i).toatoms(add_additional_information=False) for i in common]
    labels = [(db.get_row(i).energy, db.get_row(i).forces) for i in common]
    rows = []
    for r in records:
        calc = registry.load_calculator(Path(r.potential_path))
        de, df = [], []
        for atoms, (energy, forces) in zip(structures, labels):
            atoms = atoms.copy()
            atoms.calc = calc
            de.append((atoms.get_potential_energy() - energy) / len(atoms))
            df.append((atoms.get_forces() - forces).ravel())
        de_a = np.asarray(de)
        df_a = np.concatenate(df) if df else np.zeros(0)
        rows.append(CommonHoldoutRow(
            generation=r.generation, parent_generation=r.values.get("parent_generation"), structures=len(common),
            energy_rmse_mev=1000 * float(np.sqrt(np.mean(de_a**2))) if len(de_a) else math.nan,
            force_rmse_mev=1000 * float(np.sqrt(np.mean(df_a**2))) if len(df_a) else math.nan,
            force_max_mev=1000 * float(np.abs(df_a).max()) if len(df_a) else math.nan,
        ))
    return common, rows


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
    from autopipec_hpc.submission import find_run, submit_generation, wait_for_generation

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
