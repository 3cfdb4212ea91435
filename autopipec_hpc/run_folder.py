"""The run folder of one generation: every path in it, its naming, and what was asked (RunSpec).

A run folder holds the whole story of one generation::

    runs/gen-0003/            (gen-0003-r2, -r3, ... when a generation is run again)
      run.json            what was asked: generation, database, site, training config
      dataset/            the delta datasets and dataset.json (dataset_prep.py)
      attempt-1/ ...      one pacemaker run directory per attempt (pacemaker_wrapper.py)
      train.done          the training job's verdict, for the evaluation job
      cancel.requested    written by cancel; the training job polls it
      requeue.pending     written before a requeue, so the interruption is not a failure
      evaluation/         metrics.json and plots of the holdout evaluation
      validation/         validation.json and validation.png (when the config validates)
      submitit/           job logs and pickles of the scheduler
      train.sbatch, evaluate.sbatch   the scripts SLURM ran
      jobs.json           the two jobs (scheduler, id, name, role), for status/cancel from a new process

The files inside an attempt directory are pacemaker's, named in pacemaker_wrapper.py.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from autopipec_hpc.config import SiteConfig, TrainConfig
from autopipec_hpc.files import atomic_write_text, fresh_dir

GENERATION_PREFIX = "gen-"
RERUN_SEPARATOR = "-r"
# How a run folder is named where no generation is known yet (check-site's preview).
GENERATION_PLACEHOLDER = f"{GENERATION_PREFIX}NNNN"
_ATTEMPT = re.compile(r"^attempt-(\d+)$")


class RunFolder:
    """Names every path of a run folder (like submitit's ``JobPaths`` for a job)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def spec_file(self) -> Path:
        return self.path / "run.json"

    @property
    def jobs_file(self) -> Path:
        return self.path / "jobs.json"

    @property
    def train_verdict(self) -> Path:
        return self.path / "train.done"

    @property
    def cancel_marker(self) -> Path:
        return self.path / "cancel.requested"

    def stop_marker(self, role: str) -> Path:
        """Written by a job body told to stop by a signal (its name inside): the evaluation
        cancelled while it ran, where one cancelled while it waited has none."""
        return self.path / f"{role}.stopped"

    @property
    def requeue_marker(self) -> Path:
        return self.path / "requeue.pending"

    @property
    def dataset_dir(self) -> Path:
        return self.path / "dataset"

    @property
    def submitit_dir(self) -> Path:
        return self.path / "submitit"

    @property
    def evaluation_dir(self) -> Path:
        return self.path / "evaluation"

    @property
    def validation_dir(self) -> Path:
        """validation.json and validation.png of the validation job (validate/)."""
        return self.path / "validation"

    @property
    def warm_start_potential(self) -> Path:
        """The parent generation's potential a warm-started fit begins from (warm_start.py)."""
        return self.path / "warm_start.yaml"

    def job_script(self, role: str) -> Path:
        """The batch script a job ran (``train.sbatch``, ``evaluate.sbatch``)."""
        return self.path / f"{role}.sbatch"

    def submitted_pickle(self, role: str) -> Path:
        """submitit's pickle of a job, kept under the role's name for a resubmission by hand."""
        return self.submitit_dir / submitted_pickle_name(role)

    def attempt(self, number: int) -> Path:
        return self.path / f"attempt-{number}"

    def attempts(self) -> list[Path]:
        """The attempt directories, in numeric order (attempt-10 after attempt-9)."""
        found = [p for p in self.path.glob("attempt-*") if p.is_dir() and _ATTEMPT.match(p.name)]
        return sorted(found, key=attempt_number)

    @property
    def latest_attempt(self) -> Path | None:
        attempts = self.attempts()
        return attempts[-1] if attempts else None

    @property
    def next_attempt(self) -> Path:
        latest = self.latest_attempt
        return self.attempt(1 if latest is None else attempt_number(latest) + 1)


def attempt_number(attempt: Path) -> int:
    """N of ``attempt-N``."""
    match = _ATTEMPT.match(Path(attempt).name)
    if match is None:
        raise ValueError(f"{attempt} is not an attempt directory (attempt-N)")
    return int(match[1])


def submitted_pickle_name(role: str) -> str:
    """The file name of a role's kept submitit pickle, in the submitit folder."""
    return f"{role}_submitted.pkl"


def generation_dir_name(generation: int) -> str:
    return f"{GENERATION_PREFIX}{generation:04d}"


def new_run_folder(work_dir: str | Path, generation: int) -> RunFolder:
    """A fresh run folder: ``gen-NNNN``, or ``gen-NNNN-r2``, ``-r3``... when run again."""
    return RunFolder(fresh_dir(Path(work_dir) / generation_dir_name(generation), separator=RERUN_SEPARATOR))


def generation_folders(work_dir: str | Path, generation: int) -> list[Path]:
    """The run folders of ``generation`` under ``work_dir``, oldest first (by rerun number)."""
    pattern = re.compile(rf"^{re.escape(generation_dir_name(generation))}(?:{RERUN_SEPARATOR}(\d+))?$")
    ranked = []
    for path in Path(work_dir).glob(f"{generation_dir_name(generation)}*"):
        match = pattern.match(path.name)
        if match is not None and path.is_dir():
            ranked.append((int(match[1] or 1), path))
    return [path for _, path in sorted(ranked)]


def latest_generation_folder(work_dir: str | Path, generation: int) -> RunFolder | None:
    folders = generation_folders(work_dir, generation)
    return RunFolder(folders[-1]) if folders else None


class RunSpec(BaseModel):
    """What was asked of one generation, saved as the run folder's ``run.json``: the
    site and the training settings as validated models, checked once when loaded."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    generation: int
    run_dir: str
    database: str
    output_dir: str
    site: SiteConfig
    config: TrainConfig
    force: bool = False
    # pacemaker's backend as resolved by the preflight (the site may say "auto").
    evaluator: str | None = None

    @property
    def path(self) -> Path:
        return Path(self.run_dir)

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.run_dir)

    @property
    def dataset_dir(self) -> Path:
        return self.folder.dataset_dir

    def save(self) -> None:
        atomic_write_text(self.folder.spec_file, self.model_dump_json(indent=2))

    @classmethod
    def load(cls, run_dir: str | Path) -> "RunSpec":
        return cls.model_validate_json(RunFolder(run_dir).spec_file.read_text())
