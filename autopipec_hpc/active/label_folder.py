"""The folder of one labelling step: every path in it, what was asked (LabelRequest), and
what came of it (LabelSummary).

A label folder holds the whole story of one ``label`` run as a job array::

    output/labels/label-1/     (label-1-2, -3, ... for later runs)
      request.json     the database, the labeller (labeller.yaml as read) and each task's rows
      jobs.json        the array's tasks, one SubmittedJob each
      label.sbatch     the script SLURM ran (with the labeller's setup lines)
      submitit/        the tasks' logs and pickles
      task-K.json      what task K labelled, failed (with reasons) and left, once it ended
      summary.json     labelled / failed by reason / retried / returned, once every task ended
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from autopipec_hpc.active.labeller_config import LabellerConfig
from autopipec_hpc.files import atomic_write_text
from autopipec_hpc.run_folder import submitted_pickle_name
from autopipec_hpc.scheduler.base import SubmittedJob
from autopipec_hpc.states import JobRole

LABELS_DIR = "labels"


class LabelRequest(BaseModel):
    """What one label job array is asked: saved as ``request.json`` for its tasks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    database: str
    generation: int
    labeller: LabellerConfig
    tasks: list[list[int]]  # row ids per array task, assigned by the login side
    retried: list[int] = Field(default_factory=list)  # LABEL_FAILED rows put back by --retry-failed
    # The published potential of each generation that selected rows (the labeller's energy_window).
    potentials: dict[int, str] = Field(default_factory=dict)


class TaskOutcome(BaseModel):
    """What one task did to its rows (``task-K.json``)."""

    model_config = ConfigDict(extra="forbid")

    labelled: list[int] = Field(default_factory=list)
    failed: dict[int, str] = Field(default_factory=dict)
    skipped: list[int] = Field(default_factory=list)  # labelled or claimed by another first
    retried: list[int] = Field(default_factory=list)  # timed out once, tried again in this task
    seconds: float = 0.0
    atoms: int = 0


class LabelSummary(BaseModel):
    """One labelling step, summed up from the rows once every task ended."""

    model_config = ConfigDict(extra="forbid")

    folder: str
    labeller: str
    requested: int
    labelled: list[int] = Field(default_factory=list)
    failed: dict[int, str] = Field(default_factory=dict)
    returned: list[int] = Field(default_factory=list)  # back to DFT_REQUESTED (a task that died)
    retried: list[int] = Field(default_factory=list)
    tasks: int = 0

    @property
    def failed_fraction(self) -> float:
        done = len(self.labelled) + len(self.failed)
        return len(self.failed) / done if done else 0.0

    def failures_by_reason(self) -> dict[str, int]:
        """Reasons counted by their kind: the exception's name, or the check's first words."""
        return dict(Counter(reason_kind(r) for r in self.failed.values()).most_common())

    def describe(self) -> str:
        parts = [f"{len(self.labelled)} labelled", f"{len(self.failed)} failed"]
        if self.failed:
            parts[-1] += " (" + ", ".join(f"{k} {n}" for k, n in self.failures_by_reason().items()) + ")"
        if self.retried:
            parts.append(f"{len(self.retried)} retried")
        if self.returned:
            parts.append(f"{len(self.returned)} back to DFT_REQUESTED")
        return f"{', '.join(parts)} of {self.requested} with {self.labeller}"


def reason_kind(reason: str) -> str:
    """``KohnShamConvergenceError: ...`` -> ``KohnShamConvergenceError``."""
    head = reason.split(":", 1)[0].strip()
    return head if head and " " not in head else " ".join(reason.split()[:3])


class LabelFolder:
    """Names every path of a label folder (as ``RunFolder`` does for a run)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"LabelFolder({str(self.path)!r})"

    @property
    def request_file(self) -> Path:
        return self.path / "request.json"

    @property
    def jobs_file(self) -> Path:
        return self.path / "jobs.json"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    @property
    def submitit_dir(self) -> Path:
        return self.path / "submitit"

    def task_file(self, index: int) -> Path:
        return self.path / f"task-{index}.json"

    def job_script(self, role: str = JobRole.LABEL) -> Path:
        return self.path / f"{role}.sbatch"

    def submitted_pickle(self, role: str = JobRole.LABEL) -> Path:
        return self.submitit_dir / submitted_pickle_name(role)

    def save_request(self, request: LabelRequest) -> None:
        atomic_write_text(self.request_file, request.model_dump_json(indent=2))

    def request(self) -> LabelRequest:
        return LabelRequest.model_validate_json(self.request_file.read_text())

    def save_jobs(self, jobs: list[SubmittedJob]) -> None:
        atomic_write_text(self.jobs_file, json.dumps([j.model_dump(mode="json") for j in jobs], indent=2))

    def jobs(self) -> list[SubmittedJob]:
        if not self.jobs_file.exists():
            return []
        return [SubmittedJob.model_validate(j) for j in json.loads(self.jobs_file.read_text())]

    def save_outcome(self, index: int, outcome: TaskOutcome) -> None:
        atomic_write_text(self.task_file(index), outcome.model_dump_json(indent=2))

    def outcome(self, index: int) -> TaskOutcome | None:
        path = self.task_file(index)
        return TaskOutcome.model_validate_json(path.read_text()) if path.exists() else None

    def summary(self) -> LabelSummary | None:
        path = self.summary_file
        return LabelSummary.model_validate_json(path.read_text()) if path.exists() else None


def default_label_dir(output_dir: str | Path, generation: int) -> Path:
    """Where a generation's labelling goes (before ``fresh_dir`` makes it unique)."""
    return Path(output_dir) / LABELS_DIR / f"gen-{generation}"
