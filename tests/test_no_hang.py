"""Nothing hangs: no accounting, or a job whose result never comes, ends in bounded time."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from autopipec_hpc.errors import PreflightError, SchedulerError
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.example_data import tiny_train_config
from autopipec_hpc.scheduler.slurm import sacct_state
from autopipec_hpc.generation import cancel_generation, wait_for_generation
from autopipec_hpc.submission import submit_generation
from autopipec_hpc.testing.fault_pacemaker import make_fault_pacemaker


def test_sacct_missing_is_a_clear_error_not_a_hang(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM commands at all
    start = time.monotonic()
    with pytest.raises(SchedulerError, match="sacct not found"):
        sacct_state("1")
    assert time.monotonic() - start < 5


def test_slurm_site_without_accounting_is_refused_before_submitting(monkeypatch, tmp_path, example_db, local_site):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    sbatch = fake_bin / "sbatch"
    sbatch.write_text("#!/bin/sh\necho 'slurm 22.05.8'\n")  # a login node whose cluster has no sacct
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake_bin))  # sbatch answers, sacct does not exist
    site = local_site().model_copy(update={"scheduler": "slurm"})
    with pytest.raises(PreflightError, match="SLURM with accounting.*sacct not found"):
        submit_generation(example_db, site, tiny_train_config())
    assert DatabaseManager(example_db).get_record(1).status == "FAILED"


@pytest.mark.pacemaker  # submits: preflight imports pyace
def test_waiting_for_a_result_that_never_comes_is_bounded(tmp_path, example_db, local_site):
    site = local_site(str(make_fault_pacemaker(tmp_path, "hang")))
    sub = submit_generation(example_db, site, tiny_train_config())
    start = time.monotonic()
    with pytest.raises(SchedulerError, match="not finished after 4 s"):
        wait_for_generation(Path(sub.spec.run_dir), timeout_s=4)
    assert time.monotonic() - start < 15
    cancel_generation(Path(sub.spec.run_dir))


# -- the state watcher: bounded scheduler queries, changes still seen --------------------------------
class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _job(job_id: str, role: str = "train", name: str | None = None):
    from autopipec_hpc.scheduler.base import SubmittedJob

    return SubmittedJob(scheduler="slurm", folder="/runs/gen-0001/submitit", job_id=job_id, role=role,
                        name=f"autopipec-g1-{role}-0123abcd" if name is None else name)


def test_the_watcher_asks_at_most_30_times_in_10_minutes_and_sees_each_change_within_60_s():
    """A 10-minute fit followed by a waiter that asks every 0.5 s (and hurries the watcher
    whenever the record moves, as Generation.wait does): one batched query each time,
    at most 30 in all, every change seen within 60 s, finished jobs never asked again."""
    from autopipec_hpc.scheduler.watcher import StateWatcher
    from autopipec_hpc.states import JobState

    train, evaluate = _job("12", "train"), _job("13", "evaluate")
    # (from time, state) of each job: the truth the scheduler would report
    story = {train: [(0, "PENDING"), (5, "RUNNING"), (590, "COMPLETED")],
             evaluate: [(0, "PENDING"), (590, "RUNNING"), (598, "COMPLETED")]}
    record_moves = [7, 591, 599]  # RUNNING, then SUCCEEDED... as a record would

    def truth(job, at):
        return JobState([state for since, state in story[job] if since <= at][-1])

    clock = _FakeClock()
    asked: list[tuple[float, int]] = []

    def query(jobs):
        asked.append((clock.now, len(jobs)))
        return {job: truth(job, clock.now) for job in jobs}

    watcher = StateWatcher(query, clock=clock)
    seen_at: dict[tuple, float] = {}
    while clock.now <= 600:
        if any(abs(clock.now - t) < 1e-9 for t in record_moves):
            watcher.soon()
        for job, state in zip((train, evaluate), watcher.states([train, evaluate])):
            seen_at.setdefault((job.job_id, state), clock.now)
        clock.now = round(clock.now + 0.5, 6)
    print(f"{len(asked)} queries in 600 s at {[t for t, _ in asked]}")
    assert len(asked) <= 30
    assert all(n <= 2 for _, n in asked)  # one query for both jobs, never one per job
    for job, changes in story.items():
        for since, state in changes:
            assert seen_at[(job.job_id, state)] - since <= 60, (job.role, state, seen_at)
    after = len(asked)
    clock.now = 10_000
    assert watcher.states([train, evaluate]) == [JobState.COMPLETED, JobState.COMPLETED]
    assert len(asked) == after  # final states are kept, never asked again


def test_the_watcher_backs_off_to_its_longest_delay_while_nothing_changes():
    from autopipec_hpc.scheduler.watcher import StateWatcher
    from autopipec_hpc.states import JobState

    clock = _FakeClock()
    times: list[float] = []

    def query(jobs):
        times.append(clock.now)
        return {job: JobState.RUNNING for job in jobs}

    watcher = StateWatcher(query, clock=clock, min_delay_s=2, max_delay_s=60)
    job = _job("7")
    while clock.now < 600:
        watcher.state(job)
        clock.now += 0.25
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps[:6] == [2, 4, 8, 16, 32, 60] and set(gaps[5:]) == {60}
    assert len(times) <= 15
    watcher.refresh(force=True)  # an explicit refresh asks at once, and starts the delays again
    clock.now += 2
    watcher.state(job)
    assert times[-2:] == [clock.now - 2, clock.now]


def test_sacct_rows_of_another_job_with_the_same_id_are_not_adopted():
    """After a cluster restart, id 12 names another folder's job too: only the row with
    this job's name counts; a job whose own row is missing is UNKNOWN, never the other's."""
    from autopipec_hpc.scheduler.slurm import parse_sacct

    ours = _job("12", "train")
    theirs_only = _job("12", "train", name="autopipec-g1-train-ffffffff")
    legacy = _job("13", "evaluate", name="")  # a jobs.json from before names had tokens
    out = ("12|autopipec-g1-train-deadbeef|COMPLETED\n"
           "12|autopipec-g1-train-0123abcd|CANCELLED by 0\n"
           "13|autopipec-g1-evaluate-deadbeef|RUNNING\n")
    states = parse_sacct(out, [ours, theirs_only, legacy])
    assert states[ours] == "CANCELLED"
    assert states[theirs_only] == "UNKNOWN"
    assert states[legacy] == "RUNNING"  # trusted by id alone, as before
    assert parse_sacct("12|autopipec-g1-train-deadbeef|FAILED\n", [ours]) == {ours: "UNKNOWN"}


def _fake_slurm(tmp_path, monkeypatch, sacct_rows: str):
    """sacct and scancel that log their arguments (one line per call)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for name, body in (("sacct", f"printf '%s' '{sacct_rows}'"), ("scancel", "true")):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\n{body}\n')
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return log


def test_the_slurm_backend_asks_sacct_once_for_all_jobs_and_cancels_by_name(tmp_path, monkeypatch, local_site):
    from autopipec_hpc.scheduler.slurm import SlurmScheduler

    log = _fake_slurm(tmp_path, monkeypatch, "12|autopipec-g1-train-0123abcd|RUNNING\n"
                                             "13|autopipec-g1-evaluate-0123abcd|PENDING\n"
                                             "14|autopipec-g2-train-0123abcd|RUNNING\n")
    scheduler = SlurmScheduler(local_site().model_copy(update={"scheduler": "slurm"}))
    train, evaluate = _job("12", "train"), _job("13", "evaluate")
    other = _job("14", "train", name="autopipec-g2-train-99999999")  # id 14 is another job's now
    assert scheduler.states([train, evaluate, other]) == ["RUNNING", "PENDING", "UNKNOWN"]
    assert scheduler.states([train, evaluate]) == ["RUNNING", "PENDING"]  # from the cache
    calls = log.read_text().splitlines()
    assert calls == ["sacct -n -X -P -j 12,13,14 -o JobID,JobName,State"]
    scheduler.cancel(evaluate, train)
    assert log.read_text().splitlines()[1:] == ["scancel -n autopipec-g1-evaluate-0123abcd 13",
                                                "scancel -n autopipec-g1-train-0123abcd 12"]


def test_job_names_carry_a_token_of_the_folder_and_the_submission_time(tmp_path):
    from autopipec_hpc.scheduler.base import job_name

    name = job_name(3, "train", tmp_path / "gen-0003", submitted_at=1.0)
    assert name.startswith("autopipec-g3-train-") and len(name.rsplit("-", 1)[1]) == 8
    assert name == job_name(3, "train", tmp_path / "gen-0003", submitted_at=1.0)
    assert name != job_name(3, "train", tmp_path / "gen-0003-r2", submitted_at=1.0)
    assert name != job_name(3, "train", tmp_path / "gen-0003", submitted_at=2.0)


# -- `status` while accounting hangs ---------------------------------------------------------
def _records_with_slurm_jobs(site, statuses: dict[int, str]) -> None:
    """Records of ``statuses`` (generation -> state), each with a run folder and the jobs.json
    of two SLURM jobs (ids 10*g+1, 10*g+2), as `submit` leaves them."""
    from autopipec_hpc.run_folder import RunSpec, new_run_folder
    from autopipec_hpc.scheduler.base import SubmittedJob, SubmittedJobs

    db = DatabaseManager(site.database)
    for generation, status in statuses.items():
        _, run_dir = db.claim(generation, lambda n: new_run_folder(site.work_dir, n).path)
        RunSpec(generation=generation, run_dir=str(run_dir), database=site.database, output_dir=str(site.output_dir),
                site=site, config=tiny_train_config()).save()
        jobs = {role: SubmittedJob(scheduler="slurm", folder=str(run_dir / "submitit"), job_id=str(10 * generation + k),
                                   role=role, name=f"autopipec-g{generation}-{role}-0123abcd")
                for k, role in ((1, "train"), (2, "evaluate"))}
        SubmittedJobs(**jobs).save(run_dir)
        db.update_record(generation, run_dir, "RUNNING")
        if status != "RUNNING":
            db.update_record(generation, run_dir, status, reason="as it ended")


def test_status_with_a_hanging_sacct_pays_it_once_and_never_asks_about_finished_records(tmp_path, monkeypatch,
                                                                                        local_site):
    """slurmdbd hanging: each sacct gives no answer until its timeout (2 s here, 30 s in
    use). Before, `status` asked again for each record in flight and each row it showed,
    finished ones included (6 queries, 12 s here); now one query, naming only the jobs of
    records in flight."""
    from autopipec_hpc.generation import follow_records
    from autopipec_hpc.scheduler import slurm

    monkeypatch.setattr(slurm, "COMMAND_TIMEOUT_S", 2)
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "sacct.log"
    (fake / "sacct").write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec sleep 30\n')
    (fake / "sacct").chmod(0o755)
    (fake / "squeue").write_text("#!/bin/sh\nexit 0\n")
    (fake / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:/usr/bin:/bin")
    site = local_site().model_copy(update={"scheduler": "slurm"})
    _records_with_slurm_jobs(site, {1: "FAILED", 2: "CANCELLED", 3: "RUNNING", 4: "RUNNING"})
    start = time.monotonic()
    followed = follow_records(DatabaseManager(site.database))  # what `status` does: reconcile, then describe
    shown = {f.record.generation: f.describe_jobs() for f in followed}
    took = time.monotonic() - start
    calls = log.read_text().splitlines()
    print(f"status with a hanging sacct: {took:.1f} s, {len(calls)} sacct call(s): {calls}")
    assert len(calls) == 1, calls
    assert "-j 31,32,41,42 " in calls[0], calls  # the records in flight only
    assert took < 2 * 2, f"{took:.1f} s"
    assert shown[1] == "11 / 12 (record final: not asked)" and shown[2] == "21 / 22 (record final: not asked)"
    assert shown[3].startswith("unknown:") and "no answer within 2 s" in shown[3], shown
    assert shown[4].startswith("unknown:"), shown
    records = DatabaseManager(site.database).records()
    assert [str(r.status) for r in records] == ["FAILED", "CANCELLED", "RUNNING", "RUNNING"]  # nothing judged blind


def test_a_waiting_jobs_state_carries_slurms_pending_reason(tmp_path, monkeypatch, local_site):
    """What a waiter shows of a pending job (`status`, and the select waiter through the same
    call): squeue's %r, asked for that job's id and name."""
    from autopipec_hpc.scheduler.base import state_with_reason
    from autopipec_hpc.scheduler.slurm import SlurmScheduler
    from autopipec_hpc.states import JobState

    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "squeue.log"
    (fake / "squeue").write_text(f'#!/bin/sh\necho "$*" >> {log}\necho "(Resources)" | tr -d "()"\n')
    (fake / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:/usr/bin:/bin")
    scheduler = SlurmScheduler(local_site().model_copy(update={"scheduler": "slurm"}))
    job = _job("12", "select", name="autopipec-g1-select-0123abcd")
    assert state_with_reason(scheduler, job, JobState.PENDING) == "PENDING (Resources)"
    assert state_with_reason(scheduler, job, JobState.RUNNING) == "RUNNING"
    assert log.read_text().splitlines() == ["-h -j 12 -n autopipec-g1-select-0123abcd -o %r"]
