"""The compute side of an exploration: one task runs its trajectories with ASE MD on the
published generation's deployed calculator (ACE + ZBL + reference energies) and keeps
the frames the potential does not know.

Every ``check_every`` steps a frame is checked: finite energy and positions, no pair
closer than ``min_distance_A`` (a collision: what the ZBL baseline exists to prevent),
a sane box, a temperature below ``max_temperature_factor`` x its target, then its
extrapolation grade as ``select`` computes it (the published potential.yaml and
potential.asi; ``graded_calculator``). A failed check ends the trajectory with its reason;
a grade at or above ``gamma_hi`` too (beyond it frames are noise). Frames with
``gamma_lo < max gamma < gamma_hi`` are candidates; at most ``max_frames`` per trajectory
are kept, a uniform draw (reservoir sampling, seeded by the trajectory) over the whole
trajectory rather than its first frames.

Each trajectory's harvest is written atomically on its own (frames, then the result
file that says it is done), so a task killed midway loses only the trajectory it was on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units

from autopipec_hpc.active.explore_folder import ExplorationFolder
from autopipec_hpc.active.explore_plan import Ensemble, ExplorePlan
from autopipec_hpc.active.gamma import _closest_pair
from autopipec_hpc.errors import JobStopped
from autopipec_hpc.files import atomic_output
from autopipec_hpc.processes import commit_point, die_with_local_controller
from autopipec_hpc.states import StopReason

Grader = Callable[[Atoms], np.ndarray]


@dataclass(frozen=True)
class Trajectory:
    """One trajectory of the plan's grid: its id, its start (index in starts.extxyz) and point."""

    id: int
    start: int
    ensemble: str
    temperature_K: float
    pressure_GPa: float | None = None


@dataclass
class TrajectoryResult:
    """What one trajectory saw: counts of checked frames, how and where it stopped."""

    id: int
    ensemble: str
    temperature_K: float
    pressure_GPa: float | None
    steps: int = 0  # steps run
    seen: int = 0  # frames checked that passed the sanity checks
    accurate: int = 0  # max gamma <= gamma_lo
    candidates: int = 0  # gamma_lo < max gamma < gamma_hi (before max_frames)
    beyond: int = 0  # max gamma >= gamma_hi
    kept: int = 0
    stop: str = StopReason.COMPLETED.value
    stop_detail: str = ""
    gammas: list[float] = field(default_factory=list)  # max gamma of every frame seen


def sanity_problem(atoms: Atoms, plan: ExplorePlan) -> tuple[StopReason, str] | None:
    """Why a frame is not physical (dpgen2's distance and box filters), or None."""
    if not (np.all(np.isfinite(atoms.positions)) and np.all(np.isfinite(atoms.cell.array))):
        return StopReason.NAN, "positions or cell not finite"
    if atoms.pbc.all():
        per_atom = abs(atoms.cell.volume) / len(atoms)
        if not plan.min_volume_per_atom_A3 <= per_atom <= plan.max_volume_per_atom_A3:
            return StopReason.BOX, f"volume {per_atom:.2f} A^3/atom"
        angles = atoms.cell.cellpar()[3:]
        low = plan.min_cell_angle_deg
        if np.any(angles < low) or np.any(angles > 180 - low):
            return StopReason.BOX, f"cell angles {', '.join(f'{a:.0f}' for a in angles)} deg"
    closest = _closest_pair(atoms, plan.min_distance_A)
    if closest is not None:
        return StopReason.COLLISION, f"two atoms {closest:.2f} A apart"
    return None


def _dynamics(atoms: Atoms, plan: ExplorePlan, traj: Trajectory, rng: np.random.Generator):
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

    MaxwellBoltzmannDistribution(atoms, temperature_K=traj.temperature_K, rng=rng)
    Stationary(atoms)
    dt = plan.timestep_fs * units.fs
    if traj.ensemble == Ensemble.NVT:
        from ase.md.langevin import Langevin

        return Langevin(atoms, dt, temperature_K=traj.temperature_K, friction=plan.friction_per_fs / units.fs,
                        fixcm=False, rng=rng)  # the drift was removed above (Stationary)
    # Berendsen NPT scales the box isotropically and damps towards the target: on cells of
    # 32-100 atoms, where the pressure fluctuates by GPa, ase.md.npt.NPT (Parrinello-Rahman)
    # rings and needs an upper-triangular cell; Berendsen stays stable.
    from ase.md.nptberendsen import NPTBerendsen

    return NPTBerendsen(atoms, dt, temperature_K=traj.temperature_K,
                        pressure_au=float(traj.pressure_GPa or 0.0) * units.GPa,
                        taut=plan.taut_fs * units.fs, taup=plan.taup_fs * units.fs,
                        compressibility_au=plan.compressibility_per_GPa / units.GPa)


def run_trajectory(start: Atoms, calc, grade: Grader, plan: ExplorePlan, traj: Trajectory,
                   seed: int = 0) -> tuple[TrajectoryResult, list[Atoms]]:
    """Run one trajectory from ``start`` with ``calc``, grading frames with ``grade``
    (per-atom gamma); returns its counts and the candidates it keeps (at most max_frames)."""
    rng = np.random.default_rng([seed, traj.id])
    atoms = start.copy()
    atoms.calc = calc
    result = TrajectoryResult(traj.id, traj.ensemble, traj.temperature_K, traj.pressure_GPa)
    kept: list[Atoms] = []
    dyn = _dynamics(atoms, plan, traj, rng)
    while result.steps < plan.steps:
        stop = _advance(dyn, atoms, grade, plan, traj, result, kept, rng)
        if stop is not None:
            result.stop, result.stop_detail = stop[0].value, stop[1]
            break
    kept.sort(key=lambda a: a.info["md_step"])
    result.kept = len(kept)
    return result, kept


def _advance(dyn, atoms: Atoms, grade: Grader, plan: ExplorePlan, traj: Trajectory, result: TrajectoryResult,
             kept: list[Atoms], rng: np.random.Generator) -> tuple[StopReason, str] | None:
    """``check_every`` steps more, then the frame checked and counted; why to stop, or None."""
    block = min(plan.check_every, plan.steps - result.steps)
    result.steps += block
    try:
        dyn.run(block)
        energy = float(atoms.get_potential_energy())
        forces_ok = bool(np.all(np.isfinite(atoms.get_forces())))
    except JobStopped:
        raise
    except Exception as exc:  # the calculator's C++ or numpy raise whatever they meet
        return StopReason.ERROR, f"{type(exc).__name__}: {exc}"[:200]
    if not (math.isfinite(energy) and forces_ok):
        return StopReason.NAN, "energy or forces not finite"
    problem = sanity_problem(atoms, plan)
    if problem is not None:
        return problem
    temperature = atoms.get_temperature()
    if temperature > plan.max_temperature_factor * traj.temperature_K:
        return StopReason.TEMPERATURE, f"{temperature:.0f} K"
    gmax = float(np.max(grade(atoms)))
    if not math.isfinite(gmax):
        return StopReason.NAN, "gamma not finite"
    result.seen += 1
    result.gammas.append(round(gmax, 4))
    if gmax >= plan.gamma_hi:
        result.beyond += 1
        return StopReason.GAMMA_HI, f"max gamma {gmax:.2f}"
    if gmax <= plan.gamma_lo:
        result.accurate += 1
        return None
    frame = _frame(atoms, traj, result.steps, gmax)
    # Reservoir sampling: every candidate of the trajectory is kept with equal chance.
    if len(kept) < plan.max_frames:
        kept.append(frame)
    else:
        slot = int(rng.integers(result.candidates + 1))
        if slot < plan.max_frames:
            kept[slot] = frame
    result.candidates += 1
    return None


def _frame(atoms: Atoms, traj: Trajectory, step: int, gmax: float) -> Atoms:
    frame = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    frame.info.update(trajectory=traj.id, ensemble=traj.ensemble, temperature_K=traj.temperature_K,
                      md_step=step, explore_gamma_max=round(gmax, 4))
    if traj.pressure_GPa is not None:
        frame.info["pressure_GPa"] = traj.pressure_GPa
    return frame


def write_harvest(folder: ExplorationFolder, result: TrajectoryResult, frames: list[Atoms]) -> None:
    """The trajectory's frames, then its result file (the mark that it is done), each atomic."""
    from ase.io import write

    with commit_point(f"the harvest of trajectory {result.id}"):
        with atomic_output(folder.frames_file(result.id), "w") as handle:
            if frames:
                write(handle, frames, format="extxyz")
        folder.write_json(folder.result_file(result.id), asdict(result))


def read_trajectories(folder: ExplorationFolder) -> list[Trajectory]:
    return [Trajectory(**t) for t in folder.read_json(folder.trajectories_file)]


def graded_calculator(potential: Path) -> tuple[Any, Grader]:
    """The published potential's deployed calculator, and the per-atom gamma of the frame it
    last evaluated. The grade comes with the MD step's own evaluation (the ACE part carries
    the active set: about 1 % more per step), the same numbers as ``select``'s batched
    B-projections (``GammaScorer.gammas``, to 1e-10), which would cost 2.5 evaluations per check."""
    from autopipec_hpc import registry

    calc = registry.load_calculator(potential, active_set=True)
    ace = calc.mixer.calcs[0]

    def grade(atoms: Atoms) -> np.ndarray:
        atoms.get_potential_energy()  # evaluated at these positions already: cached, not recomputed
        return np.asarray(ace.results["gamma"], dtype=float)

    return calc, grade


class ExploreTask:
    """An exploration task's body: run ``trajectory_ids`` of the folder's plan, skipping
    those already harvested (a rerun), each harvest written as soon as it is done."""

    def __call__(self, folder_path: str, trajectory_ids: list[int]) -> list[int]:
        die_with_local_controller()
        from ase.io import read

        folder = ExplorationFolder(folder_path)
        plan = ExplorePlan.model_validate(folder.read_json(folder.plan_file))
        potential = Path(folder.read_json(folder.request_file)["potential"])
        starts = read(folder.starts_file, index=":")
        by_id = {t.id: t for t in read_trajectories(folder)}
        calc, grade = graded_calculator(potential)
        done = folder.done()
        ran = []
        for tid in trajectory_ids:
            if tid in done:
                continue
            traj = by_id[tid]
            result, frames = run_trajectory(starts[traj.start], calc, grade, plan, traj, seed=plan.seed)
            write_harvest(folder, result, frames)
            print(f"trajectory {tid}: {result.steps} steps, {result.seen} frames seen, {result.kept} kept, "
                  f"stopped: {result.stop} {result.stop_detail}", flush=True)
            ran.append(tid)
        return ran
