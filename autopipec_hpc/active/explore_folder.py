"""The folder of one exploration: every path in it.

One folder per generation, the same on every run, so that a rerun finds the harvest
already written and redoes only the trajectories without one::

    output/explorations/gen-3/
      request.json         the database, the generation, its published potential folder
      plan.json            the plan, as checked (explore_plan.py)
      starts.extxyz        the starting supercells, in the order trajectories name them
      trajectories.json    every trajectory: id, start, ensemble, T, P
      jobs.json            the tasks submitted, round by round, with their trajectory ids
      explore.sbatch       the script SLURM ran (the last round's array)
      submitit/            the tasks' logs and pickles
      harvest/traj-00007.extxyz   candidates kept by trajectory 7 (written first)
      harvest/traj-00007.json     its counts and stop reason (written last: it is done)
      summary.json         the report, written once the harvest is imported
      exploration.png      share of candidates against temperature, gamma histogram
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from autopipec_hpc.files import atomic_write_text
from autopipec_hpc.run_folder import submitted_pickle_name
from autopipec_hpc.states import JobRole

EXPLORATIONS_DIR = "explorations"


class ExplorationFolder:
    """Names every path of an exploration folder (as ``SelectionFolder`` does)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"ExplorationFolder({str(self.path)!r})"

    request_file = property(lambda self: self.path / "request.json")
    plan_file = property(lambda self: self.path / "plan.json")
    starts_file = property(lambda self: self.path / "starts.extxyz")
    trajectories_file = property(lambda self: self.path / "trajectories.json")
    jobs_file = property(lambda self: self.path / "jobs.json")
    summary_file = property(lambda self: self.path / "summary.json")
    figure_file = property(lambda self: self.path / "exploration.png")
    harvest_dir = property(lambda self: self.path / "harvest")
    submitit_dir = property(lambda self: self.path / "submitit")

    def job_script(self, role: str = JobRole.EXPLORE) -> Path:
        return self.path / f"{role}.sbatch"

    def submitted_pickle(self, role: str = JobRole.EXPLORE) -> Path:
        return self.submitit_dir / submitted_pickle_name(role)

    def frames_file(self, trajectory: int) -> Path:
        return self.harvest_dir / f"traj-{trajectory:05d}.extxyz"

    def result_file(self, trajectory: int) -> Path:
        return self.harvest_dir / f"traj-{trajectory:05d}.json"

    def done(self) -> set[int]:
        """The trajectories whose harvest is complete (their result file is written last)."""
        if not self.harvest_dir.is_dir():
            return set()
        return {int(p.stem.split("-")[1]) for p in self.harvest_dir.glob("traj-*.json")}

    def read_json(self, path: Path) -> Any:
        return json.loads(path.read_text())

    def write_json(self, path: Path, data: Any) -> None:
        atomic_write_text(path, json.dumps(data, indent=2))


def exploration_dir(output_dir: str | Path, generation: int) -> Path:
    return Path(output_dir) / EXPLORATIONS_DIR / f"gen-{generation}"
