"""Where a requeued training attempt resumes, with how many iterations left, and when a
requeue would only repeat the attempt it replaces."""

from __future__ import annotations

import time
from pathlib import Path

from autopipec_hpc.pacemaker.files import INTERIM_POTENTIAL, PACEMAKER_INPUT, LiveProgress, iterations_done


def resume_point(previous: list[Path]) -> Path | None:
    """The newest interim potential among the earlier attempts (an attempt stopped before
    pacemaker's first save has none: the one before it is the place to go on from)."""
    return next((a / INTERIM_POTENTIAL for a in reversed(previous) if (a / INTERIM_POTENTIAL).exists()), None)


def remaining_iterations(maxiter: int, previous: list[Path]) -> int:
    """The iteration budget is the generation's, not the attempt's."""
    return max(1, maxiter - sum(iterations_done(a) for a in previous))


def stalled(attempt: Path, time_minutes: int, evaluator: str, now: float | None = None) -> str:
    """Why requeuing ``attempt`` would only repeat it, or "".

    An attempt that ran half its time limit or more and completed no iteration saved no
    interim potential: its requeue starts from the same potential in the same way, and
    stalls the same (a start longer than the limit, or BFGS resumed with its Hessian reset,
    whose first line search on pyace's finite-difference gradient can outlast an attempt).
    Each such requeue would spend a whole time limit of the cluster's for nothing.
    """
    progress = LiveProgress.load(attempt)
    if progress is not None and progress.iteration > 0:
        return ""
    try:
        started = progress.started_at if progress is not None else (attempt / PACEMAKER_INPUT).stat().st_mtime
    except OSError:
        return ""  # pacemaker never started: nothing to judge by
    ran_s = (time.time() if now is None else now) - started
    if ran_s < 30.0 * time_minutes:
        return ""  # stopped early (a preemption, a requeue by hand): the next attempt may get further
    hint = " or use the tensorpot evaluator (pyace's gradient is by finite differences)" if evaluator == "pyace" else ""
    return (f"{attempt.name} ran {ran_s / 60:.1f} of its {time_minutes} min without completing an iteration; "
            f"a requeue would start it over the same way: raise train.time_minutes{hint}")
