"""The folder of one selection: every path in it, and what was asked (SelectionRequest).

A selection folder holds the whole story of one ``select`` (its summary folder)::

    output/selections/gen-3/   (gen-3-2, -3, ... when generation 3 selects again; or --out)
      request.json         what was asked: database, generation, --max, --gamma-min, ...
      job.json             the scheduler and job id (a select that ran as a job)
      select.sbatch        the script SLURM ran; `sbatch select.sbatch` runs it again
      submitit/            the job's log and pickles
      select.failed        the job's error, for the command that waits for it
      selection.json       the summary, written once the selection is committed
      gamma_<type>.png     a histogram of the candidates' max gamma per config_type

In-process selections write only the last two.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from autopipec_hpc.files import atomic_write_text
from autopipec_hpc.run_folder import submitted_pickle_name

SELECTIONS_DIR = "selections"
SUMMARY_FILE = "selection.json"
# The role of the select job in job names, script names and the kept pickle.
SELECT_ROLE = "select"


class SelectionFolder:
    """Names every path of a selection folder (as ``RunFolder`` does for a run)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"SelectionFolder({str(self.path)!r})"

    @property
    def request_file(self) -> Path:
        return self.path / "request.json"

    @property
    def job_file(self) -> Path:
        return self.path / "job.json"

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def failure_file(self) -> Path:
        return self.path / "select.failed"

    @property
    def submitit_dir(self) -> Path:
        return self.path / "submitit"

    def job_script(self, role: str = SELECT_ROLE) -> Path:
        return self.path / f"{role}.sbatch"

    def submitted_pickle(self, role: str = SELECT_ROLE) -> Path:
        """submitit's pickle of the job, kept under its role's name for a resubmission by hand."""
        return self.submitit_dir / submitted_pickle_name(role)

    def failure(self) -> str | None:
        """The error the job wrote before it ended, if it wrote one."""
        if not self.failure_file.exists():
            return None
        return str(json.loads(self.failure_file.read_text()).get("error", "unknown error"))

    def record_failure(self, error: str) -> None:
        atomic_write_text(self.failure_file, json.dumps({"error": error}))


def default_selection_dir(output_dir: str | Path, generation: int) -> Path:
    """Where generation ``generation``'s selection goes without ``--out`` (before ``fresh_dir``)."""
    return Path(output_dir) / SELECTIONS_DIR / f"gen-{generation}"


@dataclass(frozen=True)
class SelectionRequest:
    """What a ``select`` was asked, saved as ``request.json`` for the job that runs it."""

    database: str
    generation: int
    max_select: int
    gamma_min: float
    strategy: str
    batch: int
    seed: int
    folder: str

    def save(self) -> None:
        atomic_write_text(SelectionFolder(self.folder).request_file, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> "SelectionRequest":
        data: dict[str, Any] = json.loads(SelectionFolder(folder).request_file.read_text())
        return cls(**data)
