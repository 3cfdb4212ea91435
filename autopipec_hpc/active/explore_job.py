"""``explore`` on the login side: the plan's trajectories as one job array of the site's
scheduler (role EXPLORE, the site's ``explore:`` resources), followed until every
trajectory has its harvest, which is then imported once as CANDIDATE rows with the
``record=exploration`` marker, in one transaction.

The exploration of a generation has one folder (``explore_folder.py``) and is decided
under the records' lock: a second ``explore`` (or loop) that finds its tasks in flight
follows them instead of submitting; a rerun after tasks died submits only the
trajectories without a harvest; a generation with a marker is not explored again.
Submitting an array is seconds of ``sbatch``, so the lock is held through it: no claim
row is needed to keep a second submitter out meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from autopipec_hpc.active.explore import ExploreTask, Trajectory, read_trajectories
from autopipec_hpc.active.explore_folder import ExplorationFolder, exploration_dir
from autopipec_hpc.active.explore_plan import ExplorePlan
from autopipec_hpc.active.explore_report import ExploreSummary, marker_values, summarise, write_report
from autopipec_hpc.active.selection import published_potential
from autopipec_hpc.config import SiteConfig
from autopipec_hpc.errors import ClaimError, ExplorationError, SchedulerError
from autopipec_hpc.scheduler.base import SubmittedJob, job_name
from autopipec_hpc.states import FINISHED, JobRole, LoopAction
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.store.database import absolute_target
from autopipec_hpc.store.explorations import EXPLORATION_RECORD
from autopipec_hpc.store.structures import label_of


def supercell(atoms: Atoms, min_atoms: int) -> Atoms:
    """``atoms`` repeated, one periodic direction at a time (the shortest so far), until it
    has ``min_atoms`` atoms at least: near-cubic supercells of the fewest atoms."""
    reps = [1, 1, 1]
    lengths = atoms.cell.lengths()
    periodic = [k for k in range(3) if atoms.pbc[k]]
    while periodic and len(atoms) * np.prod(reps) < min_atoms:
        k = min(periodic, key=lambda k: lengths[k] * reps[k])
        reps[k] += 1
    return atoms.repeat(reps)


def resolve_starts(db: DatabaseManager, plan: ExplorePlan, elements: set[str]) -> list[Atoms]:
    """The plan's starting supercells (config_type in ``info``), drawn with its seed.
    ExplorationError (one line) for a config_type that matches no row, or no start at all,
    or an element the potential does not know."""
    from autopipec_hpc.frames import read_frames

    starts = plan.starts
    # Rows by id until the draw (a pool may be large), file frames as read.
    pool: list[int | Atoms] = []
    labels: dict[int, str] = {}
    if starts.use_database:
        found: dict[str, int] = {}
        for row in db.iter_rows(status=starts.status):
            ctype = label_of(row)
            if row.get("record") or (starts.config_types and ctype not in starts.config_types):
                continue
            found[ctype] = found.get(ctype, 0) + 1
            labels[row.id] = ctype
            pool.append(row.id)
        missing = [c for c in starts.config_types if c not in found]
        if missing:
            raise ExplorationError(f"plan starts.config_types: {', '.join(map(repr, missing))} matches no row of "
                                   f"status {starts.status} in {db.target}")
    for path in starts.files:
        for index, atoms in read_frames(path):
            atoms.calc = None
            atoms.info = {"config_type": str(atoms.info.get("config_type", Path(path).stem)), "start_file": str(path),
                          "start_frame": index}
            pool.append(atoms)
    if not pool:
        raise ExplorationError(f"plan starts: no structure of status {starts.status} in {db.target} and no file "
                               "frames to start from")
    rng = np.random.default_rng(starts.seed)
    chosen = sorted(rng.choice(len(pool), size=min(starts.count, len(pool)), replace=False))
    out = []
    for k in chosen:
        atoms = pool[int(k)]
        if isinstance(atoms, int):
            row_id = atoms
            atoms = db.get_row(row_id).toatoms()
            atoms.calc = None
            atoms.info = {"config_type": labels[row_id], "start_row": row_id}
        unknown = sorted(set(atoms.get_chemical_symbols()) - elements)
        if unknown:
            raise ExplorationError(f"plan starts: {atoms.info['config_type']!r} holds {', '.join(unknown)}, which the "
                                   f"potential does not know ({', '.join(sorted(elements))})")
        big = supercell(atoms, starts.min_atoms)
        big.info = dict(atoms.info)
        out.append(big)
    return out


@dataclass(frozen=True)
class ExplorationRun:
    """An exploration under way: its folder and the tasks in flight (none: all harvested)."""

    generation: int
    folder: ExplorationFolder
    tasks: list[SubmittedJob]
    submitted: bool  # this call submitted the tasks (False: it follows tasks in flight)


def explored(db: DatabaseManager, generation: int) -> Any | None:
    """The marker row of ``generation``'s imported exploration, if there is one."""
    markers = db.markers(EXPLORATION_RECORD, generation)
    return markers[-1] if markers else None


def start_exploration(site: SiteConfig, db: DatabaseManager, plan: ExplorePlan, generation: int,
                      notify: Callable[[str], None] | None = None) -> ExplorationRun:
    """Submit the trajectories of ``generation``'s exploration that have no harvest yet (all
    of them the first time), or find its tasks in flight. Everything about the plan is
    checked before anything is written or submitted."""
    from autopipec_hpc import registry
    from autopipec_hpc.scheduler import scheduler_for

    say = notify or (lambda message: None)
    potential = published_potential(db, generation)
    elements = set(registry.read_manifest(potential).elements)
    scheduler = scheduler_for(site)
    with db.locked():
        if explored(db, generation) is not None:
            raise ClaimError(f"generation {generation} was explored already "
                             f"({explored(db, generation).get('folder', '')})")
        folder = ExplorationFolder(exploration_dir(site.output_dir, generation).resolve())  # jobs run elsewhere
        if folder.plan_file.exists():
            saved = ExplorePlan.model_validate(folder.read_json(folder.plan_file))
            if saved != plan:
                raise ExplorationError(f"generation {generation} is being explored with another plan "
                                       f"({folder.plan_file}); explore with that plan to finish it")
            running = in_flight(site, folder)
            if running:
                return ExplorationRun(generation, folder, running, submitted=False)
        else:
            starts = resolve_starts(db, plan, elements)  # refused here: nothing written yet
            _prepare(folder, db, plan, generation, potential, starts)
        missing = sorted({t.id for t in read_trajectories(folder)} - folder.done())
        if not missing:
            return ExplorationRun(generation, folder, [], submitted=False)
        for warning in scheduler.check():
            say(f"warning: {warning}")
        per = plan.trajectories_per_task
        chunks = [missing[k:k + per] for k in range(0, len(missing), per)]
        tasks = scheduler.submit_array(ExploreTask(), [(str(folder.path), chunk) for chunk in chunks], folder=folder,
                                       role=JobRole.EXPLORE, name=job_name(generation, JobRole.EXPLORE, folder.path),
                                       resources=site.resources(JobRole.EXPLORE), max_parallel=plan.max_parallel)
        rounds = folder.read_json(folder.jobs_file) if folder.jobs_file.exists() else []
        rounds.append([{"job": task.model_dump(mode="json"), "trajectories": chunk}
                       for task, chunk in zip(tasks, chunks)])
        folder.write_json(folder.jobs_file, rounds)
    say(f"exploration of generation {generation}: {len(missing)} trajectories in {len(tasks)} tasks "
        f"({tasks[0].scheduler} {tasks[0].job_id.split('_')[0]}{'' if len(tasks) == 1 else ', ...'}); {folder.path}")
    return ExplorationRun(generation, folder, tasks, submitted=True)


def _prepare(folder: ExplorationFolder, db: DatabaseManager, plan: ExplorePlan, generation: int, potential: Path,
             starts: list[Atoms]) -> None:
    from ase.io import write

    from autopipec_hpc.files import atomic_output

    folder.path.mkdir(parents=True, exist_ok=True)
    points = [(s, e, t, p) for s in range(len(starts)) for e, t, p in plan.grid()]
    trajectories = [Trajectory(id=k, start=s, ensemble=str(e), temperature_K=t, pressure_GPa=p)
                    for k, (s, e, t, p) in enumerate(points)]
    folder.write_json(folder.request_file, {"database": absolute_target(db.target), "generation": generation,
                                            "potential": str(potential)})
    with atomic_output(folder.starts_file, "w") as handle:
        write(handle, starts, format="extxyz")
    folder.write_json(folder.trajectories_file, [asdict(t) for t in trajectories])
    # Written last: a folder with plan.json is prepared in full.
    folder.write_json(folder.plan_file, plan.model_dump(mode="json"))


def tasks_of(folder: ExplorationFolder) -> list[tuple[SubmittedJob, list[int]]]:
    """Every task submitted for ``folder``, round by round, with its trajectory ids."""
    if not folder.jobs_file.exists():
        return []
    return [(SubmittedJob.model_validate(t["job"]), list(t["trajectories"]))
            for rnd in folder.read_json(folder.jobs_file) for t in rnd]


def in_flight(site: SiteConfig, folder: ExplorationFolder) -> list[SubmittedJob]:
    from autopipec_hpc.scheduler import scheduler_for

    tasks = [job for job, _ in tasks_of(folder)]
    if not tasks:
        return []
    states = scheduler_for(site).states(tasks)
    return [job for job, state in zip(tasks, states) if state not in FINISHED]


def wait_for_tasks(site: SiteConfig, folder: ExplorationFolder, timeout_s: float, poll_s: float = 2.0,
                   notify: Callable[[str], None] | None = None) -> None:
    """Block until no task of ``folder`` is in flight; SchedulerError after ``timeout_s``."""
    say = notify or (lambda message: None)
    deadline = time.monotonic() + timeout_s
    last = -1
    while True:
        running = in_flight(site, folder)
        if not running:
            return
        done = len(folder.done())
        if done != last:
            say(f"exploration: {done} trajectories harvested, {len(running)} tasks in flight")
            last = done
        if time.monotonic() > deadline:
            raise SchedulerError(f"exploration tasks still running after {timeout_s:.0f} s; they keep running: "
                                 f"run explore again to follow them ({folder.path})")
        time.sleep(poll_s)


def missing_report(folder: ExplorationFolder) -> str:
    """Which tasks ended without the harvest of all their trajectories, and why, on one line."""
    done = folder.done()
    latest: dict[int, SubmittedJob] = {}
    for job, ids in tasks_of(folder):
        for tid in ids:
            latest[tid] = job
    named = []
    for job in dict.fromkeys(job for tid, job in latest.items() if tid not in done):
        lost = sorted(tid for tid, j in latest.items() if j == job and tid not in done)
        named.append(f"task {job.job_id} ({len(lost)} trajectories: {', '.join(map(str, lost[:8]))}"
                     f"{', ...' if len(lost) > 8 else ''}; {job.last_error() or 'killed, no error written'})")
    return "; ".join(named)


def import_harvest(db: DatabaseManager, folder: ExplorationFolder, generation: int) -> ExploreSummary:
    """Every trajectory's kept frames as CANDIDATE rows with their provenance and the
    ``record=exploration`` marker, in one transaction, once (under the records' lock: a
    second caller finds the marker and reads the summary)."""
    from ase.io import read

    plan = ExplorePlan.model_validate(folder.read_json(folder.plan_file))
    ids = [t.id for t in read_trajectories(folder)]
    with db.locked():
        results = [folder.read_json(folder.result_file(tid)) for tid in ids]
        marker = explored(db, generation)
        if marker is not None:
            # Imported already (by another caller, or by one killed before its report).
            summary = ExploreSummary.model_validate(dict(marker.data))
            return summary if folder.summary_file.exists() else write_report(folder, summary, results)
        frames = []
        for tid in ids:
            path = folder.frames_file(tid)
            for atoms in (read(path, index=":", format="extxyz") if path.stat().st_size else []):
                info = dict(atoms.info)
                ensemble = str(info.pop("ensemble"))
                info.update(explored_by_generation=generation, ensemble=ensemble)
                frames.append((atoms, f"explore_{ensemble}", info))
        summary = summarise(generation, folder, results, plan.gamma_lo, plan.gamma_hi, imported=len(frames))
        db.commit_exploration(generation, frames, marker_values(summary), summary.model_dump(mode="json"))
    return write_report(folder, summary, results)


def run_exploration(site: SiteConfig, db: DatabaseManager, plan: ExplorePlan, generation: int,
                    timeout_s: float | None = None, notify: Callable[[str], None] | None = None,
                    poll_s: float = 2.0) -> ExploreSummary:
    """Explore ``generation`` with ``plan``: submit (or follow) its tasks, wait for them, and
    import the harvest; ExplorationError naming the tasks whose trajectories have no harvest."""
    run = start_exploration(site, db, plan, generation, notify=notify)
    return finish_exploration(site, db, run.folder, generation, timeout_s, notify, poll_s)


def finish_exploration(site: SiteConfig, db: DatabaseManager, folder: ExplorationFolder, generation: int,
                       timeout_s: float | None = None, notify: Callable[[str], None] | None = None,
                       poll_s: float = 2.0) -> ExploreSummary:
    timeout = site.result_timeout_s if timeout_s is None else timeout_s
    wait_for_tasks(site, folder, timeout, poll_s, notify=notify)
    if {t.id for t in read_trajectories(folder)} - folder.done():
        raise ExplorationError(f"generation {generation}: {missing_report(folder)}; the other trajectories' harvest "
                               f"is kept in {folder.harvest_dir}: run explore again to redo only the missing ones")
    return import_harvest(db, folder, generation)


def exploration_step(db: DatabaseManager, generation: int, converge: float | None) -> tuple[LoopAction, str] | None:
    """The loop's decision after ``generation`` is published, with a plan: explore (no marker
    yet; its tasks in flight are followed, not doubled), stop (its accurate share reached
    ``converge``), or None (go on: select among the candidates)."""
    marker = explored(db, generation)
    if marker is None:
        return LoopAction.EXPLORE, ""
    share = float(marker.get("accurate_share", 0.0))
    if converge is not None and share >= converge:
        seen = int(marker.get("n_seen", 0))
        return LoopAction.ACCURATE, f"{share:.3f} of {seen} frames accurate >= --converge {converge:g}"
    return None
