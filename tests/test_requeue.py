"""A requeued training attempt: refused where it would only repeat a stalled attempt."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from autopipec_hpc.config import SiteConfig
from autopipec_hpc.run_folder import RunSpec


def _attempt(root: Path, iteration: int | None, ran_s: float, now: float) -> Path:
    """attempt-1 of a run, started ``ran_s`` before ``now``; its progress.json at ``iteration``
    (None: pacemaker wrote none, its input.yaml tells when it started)."""
    from autopipec_hpc.pacemaker.files import PACEMAKER_INPUT, PROGRESS_FILE

    attempt = root / "attempt-1"
    attempt.mkdir(parents=True)
    (attempt / PACEMAKER_INPUT).write_text("seed: 42\n")
    os.utime(attempt / PACEMAKER_INPUT, (now - ran_s, now - ran_s))
    if iteration is not None:
        (attempt / PROGRESS_FILE).write_text(json.dumps({
            "iteration": iteration, "maxiter": 49, "loss": 1.8e-3, "rmse_energy_mev": 7.6, "rmse_force_mev": 34.4,
            "started_at": now - ran_s, "updated_at": now - ran_s + 2}))
    return attempt


@pytest.mark.parametrize("iteration, ran_s, evaluator, stalled_", [
    (0, 100, "pyace", True),  # the CI case: resumed near a minimum, one line search all attempt long
    (None, 100, "tensorpot", True),  # still starting (a huge dataset) when the time limit struck
    (3, 100, "pyace", False),  # it got on: the next attempt goes on from its interim potential
    (0, 30, "pyace", False),  # preempted early: the next attempt may get further
])
def test_a_requeue_is_refused_only_where_it_would_repeat_a_stalled_attempt(tmp_path, iteration, ran_s, evaluator,
                                                                         stalled_):
    from autopipec_hpc.pacemaker.resume import stalled

    now = time.time()
    why = stalled(_attempt(tmp_path, iteration, ran_s, now), 2, evaluator, now=now)
    assert bool(why) == stalled_
    if stalled_:
        assert why.startswith("attempt-1 ran 1.7 of its 2 min without completing an iteration")
        assert "train.time_minutes" in why and ("tensorpot evaluator" in why) == (evaluator == "pyace")
    assert stalled(tmp_path / "attempt-9", 2, evaluator, now=now) == ""  # never started: nothing to judge


def test_the_training_job_fails_a_stalled_attempt_instead_of_requeuing_it(tmp_path):
    """TrainJob.checkpoint, as submitit calls it at the time limit's signal: the record ends
    FAILED with the reason, and nothing is resubmitted (before: up to max_restarts requeues,
    each a whole time limit spent from the same potential)."""
    from autopipec_hpc.jobs import TrainJob
    from autopipec_hpc.run_folder import new_run_folder
    from autopipec_hpc.states import RecordState
    from autopipec_hpc.store import DatabaseManager

    site = SiteConfig(work_dir=tmp_path / "runs", database=str(tmp_path / "s.db"), output_dir=tmp_path / "out",
                      max_restarts=4, train={"time_minutes": 2}, pacemaker={"evaluator": "pyace"})
    db = DatabaseManager(site.database)
    _, run_dir = db.claim(1, lambda n: new_run_folder(site.work_dir, n).path)
    RunSpec(generation=1, run_dir=str(run_dir), database=site.database, output_dir=str(site.output_dir),
            site=site, config={}).save()
    db.update_record(1, run_dir, "RUNNING")
    _attempt(Path(run_dir), 0, 100, time.time())
    assert TrainJob().checkpoint(str(run_dir)) is None
    record = db.get_record(1)
    assert record.status == RecordState.FAILED and "without completing an iteration" in record.reason
