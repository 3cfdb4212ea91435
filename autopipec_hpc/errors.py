"""Named errors, one per way the pipeline can refuse or fail.

Every message names the structure, setting or file at fault, so the CLI can
print it as one line.
"""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """An error as the user reads it, on one line: our own errors as they are, others
    with their type (a bare KeyError('x') says nothing on its own)."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, AutopipecError) and text else f"{type(exc).__name__}: {text}"


class AutopipecError(Exception):
    """Base class: the CLI turns these into one clear line and a non-zero exit."""


class ConfigError(AutopipecError):
    """A setting is unknown, missing or out of range."""


class DatabaseError(AutopipecError):
    """The database cannot be opened or a row cannot be read."""


class ClaimError(AutopipecError):
    """A generation is taken: another run holds it, or it succeeded already."""


class DatabaseBusyError(DatabaseError):
    """The database (or its record lock) stayed busy longer than we wait."""


class ImportDataError(AutopipecError):
    """A file offered to `import` holds a frame without energy or forces."""


class DatasetError(AutopipecError):
    """The datasets cannot be written where they were asked for."""


class InsufficientDataError(AutopipecError):
    """Too few usable structures to build a training set."""


class StructureError(AutopipecError):
    """One structure cannot be used (bad geometry, bad element, bad labels)."""


class TrainingFailedError(AutopipecError):
    """pacemaker exited non-zero, timed out or left no potential."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


class TrainingInterrupted(TrainingFailedError):
    """pacemaker was stopped by a signal to its job (cancel, requeue, time limit)."""


class JobStopped(TrainingInterrupted):
    """A job body was told to stop (SIGTERM/SIGINT: a cancel, an scancel, a time limit's end)."""


class WaitInterrupted(KeyboardInterrupt):
    """Ctrl-C of a command that waits for jobs: the command ends, the jobs go on (the
    message says how to follow them). A KeyboardInterrupt, so the exit code stays 130."""


class GPUUnavailableError(TrainingFailedError):
    """A job that asked for a GPU runs where TensorFlow sees none."""


class TrainingDivergenceError(AutopipecError):
    """The fit produced NaN or errors above the configured thresholds."""


class PublicationError(AutopipecError):
    """A potential could not be published (or would overwrite a good one)."""


class PreflightError(AutopipecError):
    """A check before submission failed; nothing was submitted."""


class SchedulerError(AutopipecError):
    """The scheduler refused a job or lost track of it."""


class SelectionError(AutopipecError):
    """Candidates cannot be scored or selected (no published potential or active set)."""


class LabellingError(AutopipecError):
    """A calculator spec or its arguments are unusable, or it failed on a structure."""


class PropertyError(AutopipecError):
    """A property of a potential cannot be computed (no EOS minimum, non-finite energies)."""


class ValidationRejectedError(AutopipecError):
    """A generation failed its validation gate: REJECTED, not published."""


class LevelOfTheoryError(AutopipecError):
    """The rows a training set would use were labelled at different levels of theory."""


class ExplorationError(AutopipecError):
    """An exploration plan cannot run (no starts, unknown elements) or its tasks failed."""
