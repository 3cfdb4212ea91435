"""The folder of one selection: every path in it, and what was asked (SelectionRequest).

A selection folder holds the whole story of one ``select`` (its summary folder)::

    output/selections/gen-3/   (gen-3-2, -3, ... when generation 3 selects again; or --out)
      request.json         what was asked: database, generation, --max, --gamma-min, ...
      job.json             the scheduler and job id (a select that ran as a job)
      select.sbatch        the script SLURM ran; `sbatch select.sbatch` runs it again
      submitit/            the job's log and pickles
      select.failed        the job's error, for the command that waits for it
      selection.json       the summary, written once the selection is committed
      gamma.svg            the candidates' max gamma, a row per config_type

In-process selections write only the last two.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autopipec_hpc.errors import ConfigError
from autopipec_hpc.files import atomic_write_text
from autopipec_hpc.run_folder import submitted_pickle_name
from autopipec_hpc.states import JobRole, Strategy

SELECTIONS_DIR = "selections"
SUMMARY_FILE = "selection.json"
HISTOGRAM_FILE = "gamma.svg"


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
    def histogram_file(self) -> Path:
        return self.path / HISTOGRAM_FILE

    @property
    def failure_file(self) -> Path:
        return self.path / "select.failed"

    @property
    def submitit_dir(self) -> Path:
        return self.path / "submitit"

    def job_script(self, role: str = JobRole.SELECT) -> Path:
        return self.path / f"{role}.sbatch"

    def submitted_pickle(self, role: str = JobRole.SELECT) -> Path:
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


def _strategy(value: str) -> Strategy:
    try:
        return Strategy(value)
    except ValueError:
        known = ", ".join(s.value for s in Strategy)
        raise ConfigError(f"--strategy must be one of {known}, got {value!r}") from None


@dataclass(frozen=True)
class SelectionRequest:
    """What a ``select`` is asked, checked once when it is made: bad settings are refused
    by the option the user typed (``max_option``: ``loop`` and ``demo --loop`` call the
    budget ``--select``), before any database is opened or file written.

    ``out_dir`` is the summary folder asked for (None: ``<output>/selections/gen-N``, made
    fresh). Saved as ``request.json`` with the database for the job that runs it."""

    generation: int
    max_select: int = 20
    gamma_min: float = 1.0
    strategy: Strategy = Strategy.D_OPTIMAL
    batch: int = 500
    seed: int = 0
    out_dir: Path | None = None
    max_atoms: int | None = None  # a budget in atoms: DFT cost follows atoms, not structures
    again: bool = False  # select a generation that was selected already
    max_option: str = field(default="--max", compare=False, repr=False)
    # The token of the claim a submitted job holds (selection_claim.py), saved for the job.
    claim: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.max_select < 1:
            raise ConfigError(f"{self.max_option} must be at least 1, got {self.max_select}")
        if self.max_atoms is not None and self.max_atoms < 1:
            raise ConfigError(f"--max-atoms must be at least 1, got {self.max_atoms}")
        if not math.isfinite(self.gamma_min) or self.gamma_min < 0:
            raise ConfigError(f"--gamma-min must be a finite number >= 0, got {self.gamma_min}")
        if self.batch < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch}")
        object.__setattr__(self, "strategy", _strategy(self.strategy))
        if self.out_dir is not None:
            object.__setattr__(self, "out_dir", Path(self.out_dir))

    def save(self, folder: SelectionFolder, database: str) -> None:
        """``request.json`` in ``folder``: this request, the database the job opens, and the folder."""
        data = {"database": database, "generation": self.generation, "max_select": self.max_select,
                "gamma_min": self.gamma_min, "strategy": str(self.strategy), "batch": self.batch,
                "seed": self.seed, "folder": str(folder.path), "max_atoms": self.max_atoms, "again": self.again,
                "claim": self.claim}
        atomic_write_text(folder.request_file, json.dumps(data, indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> tuple[str, "SelectionRequest"]:
        """The database and the request saved in ``folder`` (``save``)."""
        data: dict[str, Any] = json.loads(SelectionFolder(folder).request_file.read_text())
        request = cls(generation=int(data["generation"]), max_select=int(data["max_select"]),
                      gamma_min=float(data["gamma_min"]), strategy=data["strategy"], batch=int(data["batch"]),
                      seed=int(data["seed"]), out_dir=Path(data["folder"]),
                      max_atoms=None if data.get("max_atoms") is None else int(data["max_atoms"]),
                      again=bool(data.get("again", False)), claim=data.get("claim"))
        return str(data["database"]), request
