"""The pipeline's vocabulary: every state and every kind of step, as string enums.

Each is stored or printed as its plain string (``status=TRAINING_READY`` in a row,
``RUNNING`` in a record), so ``ase db`` and ``sacct`` users read the same words.
Imports nothing, so any module (the CLI's parser too) may use it.
"""

from __future__ import annotations

from enum import StrEnum


class StructureStatus(StrEnum):
    """The ``status`` of a structure row that the pipeline selects (import may set any word)."""

    TRAINING_READY = "TRAINING_READY"
    # Active learning (active/): unlabelled frames waiting to be scored,
    # and the ones chosen for labelling; `label` makes the latter TRAINING_READY.
    CANDIDATE = "CANDIDATE"
    DFT_REQUESTED = "DFT_REQUESTED"
    # Claimed by one labeller (``label_claimed_by``) while its calculator runs, so that two
    # labellers never compute a row twice; a failure puts the row back to DFT_REQUESTED with
    # ``label_error``. LABEL_FAILED is for a row given up for good (labelling jobs, issue 17).
    LABELLING = "LABELLING"
    LABEL_FAILED = "LABEL_FAILED"


class RecordState(StrEnum):
    """The ``status`` of a training record, stored as this plain string."""

    SUBMITTED = "SUBMITTED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    DIVERGED = "DIVERGED"
    CANCELLED = "CANCELLED"
    # Trained and evaluated, but failed its validation gate (validate/): never published.
    REJECTED = "REJECTED"

    @property
    def is_final(self) -> bool:
        return self in FINAL_RECORD_STATES

    @property
    def is_active(self) -> bool:
        """Submitted or running: a generation in flight."""
        return self in (RecordState.SUBMITTED, RecordState.RUNNING)


# Which state a record may move to from each: only forward. A requeue may take a
# running generation back to SUBMITTED; a final state never changes.
ALLOWED_MOVES: dict[RecordState, frozenset[RecordState]] = {
    RecordState.SUBMITTED: frozenset(RecordState),
    RecordState.RUNNING: frozenset(RecordState),
    RecordState.SUCCEEDED: frozenset(),
    RecordState.FAILED: frozenset(),
    RecordState.DIVERGED: frozenset(),
    RecordState.CANCELLED: frozenset(),
    RecordState.REJECTED: frozenset(),
}


FINAL_RECORD_STATES = frozenset(
    {RecordState.SUCCEEDED, RecordState.FAILED, RecordState.DIVERGED, RecordState.CANCELLED, RecordState.REJECTED}
)


RECORD_STATES = tuple(state.value for state in RecordState)


class JobState(StrEnum):
    """Job states as we report them, whatever the scheduler calls them."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"


FINISHED = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})


JOB_ROLES = ("train", "evaluate")


class JobRole(StrEnum):
    """What a scheduler job does: in job names, script names and kept pickles."""

    TRAIN = "train"
    EVALUATE = "evaluate"
    SELECT = "select"
    EXPLORE = "explore"
    LABEL = "label"
    VALIDATE = "validate"


class Strategy(StrEnum):
    """How ``select`` chooses among the candidates above ``gamma_min``."""

    D_OPTIMAL = "d-optimal"
    TOP_GAMMA = "top-gamma"
    RANDOM = "random"


class LoopAction(StrEnum):
    """What the loop does next (``active/loop.py``)."""

    WAIT = "wait"
    # Another process's (or an earlier loop's) selection of this generation is in flight.
    WAIT_SELECTION = "wait-selection"
    TRAIN = "train"
    SELECT = "select"
    LABEL = "label"
    DONE = "done"
    CONVERGED = "converged"
    # The newest generation failed its validation gate: the loop stops instead of building on it.
    REJECTED = "rejected"
    # With an exploration plan (active/explore_job.py): explore with the last published
    # generation, or follow its exploration in flight; stop once its frames are accurate enough.
    EXPLORE = "explore"
    ACCURATE = "accurate"


class StopReason(StrEnum):
    """Why an exploration trajectory ended (``active/explore.py``), counted in its report."""

    COMPLETED = "completed"  # ran all its steps
    GAMMA_HI = "gamma_hi"  # a frame beyond the upper trust level: what follows is noise
    COLLISION = "collision"  # a pair closer than the plan's min_distance_A
    NAN = "nan"  # energy, forces, positions or gamma not finite
    TEMPERATURE = "temperature"  # hotter than max_temperature_factor x its target
    BOX = "box"  # the cell collapsed, exploded or skewed (NPT)
    ERROR = "error"  # the calculator raised on the frame
