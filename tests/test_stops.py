"""Jobs told to stop, with real processes: a job body that gets SIGTERM publishes and commits
nothing (submitit's job environment ignores SIGTERM until the SIGKILL 10-30 s later, so
without our own handling it went on), its tool's process group ends with it, and its record
ends CANCELLED. Local jobs live in their own session, so a Ctrl-C of the waiting command
ends only the wait. A record that reconciliation ends FAILED carries the job's own last error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from autopipec_hpc.example_data import tiny_train_config
from autopipec_hpc.processes import pid_alive
from autopipec_hpc.registry import potentials_root
from autopipec_hpc.run_folder import RunFolder
from autopipec_hpc.scheduler.base import SubmittedJobs
from autopipec_hpc.states import RecordState
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.submission import submit_generation
from autopipec_hpc.testing.fault_pacemaker import make_fault_pacemaker
from tests.helpers import CLI, PACEMAKER, run_cli


def _wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"{what} not seen within {timeout_s:.0f} s")


def _site_file(tmp_path: Path, site) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(json.dumps(site.model_dump(mode="json")))
    return path


def _status_until_final(tmp_path: Path, site_file: Path, database: str, generation: int, timeout_s: float = 120):
    """`status` from new processes (each reconciles) until the record is final."""
    deadline = time.monotonic() + timeout_s
    while True:
        done = run_cli("status", "--site", str(site_file), "--generation", str(generation), cwd=tmp_path, timeout=120)
        record = DatabaseManager(database).get_record(generation)
        if record.status.is_final or time.monotonic() > deadline:
            return done, record
        time.sleep(1)


def _cancel_if_in_flight(database: str, generation: int) -> None:
    """A failed check must not leave a generation training on (two cores are shared)."""
    from autopipec_hpc.generation import cancel_generation

    record = DatabaseManager(database).get_record(generation)
    if record is not None and record.status.is_active and record.run_dir is not None:
        cancel_generation(Path(record.run_dir), settle_s=10)


# -- the stop handling itself, in a real process ---------------------------------------------

_BODY = """
import sys, time
from autopipec_hpc.processes import commit_point, stop_on_signals
from autopipec_hpc.errors import JobStopped
stop_on_signals()
where = sys.argv[1]
try:
    if where == "during":
        with commit_point("committing"):
            print("ready", flush=True)
            time.sleep(1.5)
            print("committed", flush=True)
    else:
        print("ready", flush=True)
        time.sleep(30)
        with commit_point("committing"):
            print("committed", flush=True)
except JobStopped as exc:
    print(f"stopped: {exc}", flush=True)
    sys.exit(3)
"""


@pytest.mark.parametrize("where", ["before", "during"])
def test_a_stop_before_the_commit_point_refuses_it_and_one_during_it_lets_it_finish(tmp_path, where):
    proc = subprocess.Popen([sys.executable, "-c", _BODY, where], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out = proc.stdout.read()
    rc = proc.wait(timeout=30)
    took = time.monotonic() - start
    if where == "before":
        assert rc == 3 and "committed" not in out and "stopped by SIGTERM" in out, out
        assert took < 5, f"the stop took {took:.1f} s"  # at once, not at the end of the sleep
    else:
        assert rc == 0 and "committed" in out and "stopped" not in out, out


def test_a_stopped_job_ends_its_tools_process_group_and_reads_stopped_not_exit_minus_15(tmp_path):
    body = textwrap.dedent("""
        import sys
        from pathlib import Path
        from autopipec_hpc.processes import run_child, stop_on_signals
        from autopipec_hpc.errors import JobStopped
        stop_on_signals()
        try:
            run_child(["sh", "-c", "sleep 60 & echo $! > grandchild.pid; echo $$ > tool.pid; wait"], Path.cwd(), 120)
        except JobStopped as exc:
            print(f"stopped: {exc}", flush=True)
            sys.exit(3)
    """)
    proc = subprocess.Popen([sys.executable, "-c", body], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    _wait_for(lambda: (tmp_path / "tool.pid").exists() and (tmp_path / "grandchild.pid").exists(), 30, "the tool")
    time.sleep(0.2)
    tool, grandchild = (int((tmp_path / n).read_text()) for n in ("tool.pid", "grandchild.pid"))
    os.kill(proc.pid, signal.SIGTERM)  # to the job body only, as a job environment forwards it
    out = proc.stdout.read()
    assert proc.wait(timeout=30) == 3 and "stopped by SIGTERM" in out, out
    _wait_for(lambda: not pid_alive(tool) and not pid_alive(grandchild), 10, "the tool's group ending")


# -- a local evaluation told to stop ---------------------------------------------------------

def _tools(tmp_path: Path, activeset: str) -> Path:
    """pacemaker and its tools as thin wrappers of the real ones (a site finds the tools beside
    its pacemaker command); ``pace_activeset`` says when it starts or ends (``activeset``)."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in ("pacemaker", "pace_yaml2yace", "pace_activeset"):
        real = PACEMAKER.parent / name
        if name != "pace_activeset":
            code = f"import os, sys\nos.execv({str(real)!r}, [{str(real)!r}, *sys.argv[1:]])\n"
        elif activeset == "inside":  # the stop lands while pace_activeset runs
            code = (f"import subprocess, sys, time\nopen({str(tmp_path / 'signal.now')!r}, 'w').close()\n"
                    f"time.sleep(20)\nsys.exit(subprocess.call([{str(real)!r}, *sys.argv[1:]]))\n")
        else:  # the stop lands in the evaluation's Python phase, just after it
            code = (f"import subprocess, sys\nrc = subprocess.call([{str(real)!r}, *sys.argv[1:]])\n"
                    f"open({str(tmp_path / 'signal.now')!r}, 'w').close()\nsys.exit(rc)\n")
        path = tools / name
        path.write_text(f"#!{sys.executable}\n{code}")
        path.chmod(0o755)
    return tools / "pacemaker"


@pytest.mark.slow
@pytest.mark.pacemaker
@pytest.mark.parametrize("phase", ["python", "inside"])
def test_a_local_evaluation_stopped_by_sigterm_publishes_nothing_and_ends_cancelled(tmp_path, example_db,
                                                                                   local_site, phase):
    """SIGTERM to the evaluation job's controller (a `kill` by hand: the local scancel; the
    controller forwards it to the job body) in its Python phase, or while pace_activeset
    runs: before the fix the first published and wrote SUCCEEDED, the second ended FAILED
    "exit -15"; now nothing is published and the record ends CANCELLED."""
    site = local_site(str(_tools(tmp_path, phase)))
    sub = submit_generation(example_db, site, tiny_train_config())
    _wait_for(lambda: (tmp_path / "signal.now").exists(), 600, "the evaluation's pace_activeset", poll_s=0.02)
    os.kill(int(sub.jobs.evaluate.job_id), signal.SIGTERM)
    _wait_for(lambda: not pid_alive(int(sub.jobs.evaluate.job_id)), 60, "the evaluation job ending")
    done, record = _status_until_final(tmp_path, _site_file(tmp_path, site), example_db, 1)
    published = potentials_root(site.output_dir) / "1"
    assert not published.exists(), (record, done.stdout)
    assert record.status == RecordState.CANCELLED, (record, done.stdout)
    assert f"evaluation job {sub.jobs.evaluate.job_id} CANCELLED" in record.reason, record.reason
    assert RunFolder(sub.spec.run_dir).stop_marker("evaluate").read_text() == "SIGTERM"
    assert not list(potentials_root(site.output_dir).glob(".staging-*"))  # its staging went with it


# -- Ctrl-C of the waiting command -----------------------------------------------------------

def _foreground() -> None:
    """A terminal's foreground job has SIGINT at its default, whatever started the tests: a
    suite run in the background (`cmd &`, nohup) passes SIGINT and SIGQUIT on ignored, and
    the waiter then never heard this test's Ctrl-C (it slept out the 90 s bound)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.pacemaker  # submits: preflight imports pyace
def test_ctrl_c_of_submit_wait_ends_only_the_wait_and_a_loop_rerun_follows_the_jobs(tmp_path, example_db, local_site):
    """The terminal's SIGINT goes to the waiting command's whole process group: before the
    fix that ended the local jobs (they shared it), and the rerun trained from scratch."""
    site = local_site(str(make_fault_pacemaker(tmp_path, "hang")))
    site_file = _site_file(tmp_path, site)
    impatient = tmp_path / "impatient.yaml"  # the same site, whose waits give up after 5 s
    impatient.write_text(json.dumps(site.model_copy(update={"result_timeout_s": 5}).model_dump(mode="json")))
    waiter = subprocess.Popen(CLI + ["submit", "--site", str(site_file), "--wait"], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True,  # its own group, as a terminal's foreground job
                              preexec_fn=_foreground,
                              env={**os.environ, "PYTHONFAULTHANDLER": "1"})  # SIGABRT: its stacks, if it hangs
    try:
        attempt = _wait_for(lambda: next(iter((tmp_path / "runs").glob("gen-0001*/attempt-1/pacemaker.pid")), None),
                            120, "pacemaker running")
        run_dir = attempt.parents[1]
        jobs = SubmittedJobs.load(run_dir)
        pacemaker = int(attempt.read_text())
        os.killpg(waiter.pid, signal.SIGINT)  # Ctrl-C
        # Read both pipes while waiting: a waiter whose stdout pipe filled up (nobody read
        # it) blocked in its exit's flush, which once looked like a Ctrl-C not obeyed.
        try:
            _, err = waiter.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            masks = {who: [line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                           if line.startswith(("SigBlk", "SigIgn", "SigCgt"))]
                     for who, pid in (("waiter", waiter.pid), ("pytest", os.getpid()))}
            waiter.send_signal(signal.SIGABRT)
            out, err = waiter.communicate(timeout=30)
            raise AssertionError(f"the waiter outlived its Ctrl-C by 90 s; {masks}; where it was:\n{err[-3000:]}")
        rc = waiter.returncode
    finally:
        if waiter.poll() is None:
            waiter.kill()
    try:
        assert rc == 130, err
        assert err.count("\n") == 1 and "generation 1 goes on" in err and "status --generation 1" in err, err
        time.sleep(2)  # what a shared process group would have ended is gone by now
        assert pid_alive(int(jobs.train.job_id)) and pid_alive(int(jobs.evaluate.job_id))
        assert pid_alive(pacemaker), "pacemaker was ended by the Ctrl-C of the command that waited for it"
        assert DatabaseManager(example_db).get_record(1).status == RecordState.RUNNING
        # A rerun of the loop follows generation 1 (it waits; here until its 5 s run out): no second training.
        loop = run_cli("loop", "--site", str(impatient), "--generations", "1", "--select", "1",
                       "--calculator", "ase.calculators.emt:EMT", cwd=tmp_path, timeout=120)
        assert "wait for generation 1" in loop.stdout + loop.stderr, (loop.stdout, loop.stderr)
        assert "not finished after 5 s" in loop.stderr, loop.stderr
        assert len(list((tmp_path / "runs").glob("gen-*"))) == 1
        assert pid_alive(pacemaker)
    finally:
        done = run_cli("cancel", "--site", str(site_file), "--generation", "1", cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert DatabaseManager(example_db).get_record(1).status == RecordState.CANCELLED
    os.kill(int((run_dir / "attempt-1" / "grandchild.pid").read_text()), signal.SIGKILL)  # the injector's own
    _wait_for(lambda: not pid_alive(pacemaker) and not pid_alive(int(jobs.train.job_id)), 30, "cancel ending the jobs")


# -- the job's own last error in the record's reason -----------------------------------------

@pytest.mark.slow
@pytest.mark.pacemaker
def test_an_evaluation_that_dies_on_a_full_output_folder_names_the_cause_in_the_reason(tmp_path, example_db,
                                                                                      local_site):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    site = local_site()
    out = Path(site.output_dir)
    out.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(out)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        sub = submit_generation(example_db, site, tiny_train_config())  # the preflight finds it writable
        # Filled once the preflight is past: the evaluation meets a full folder.
        filler = out / "filler"
        with open(filler, "wb", buffering=0) as handle:
            try:
                while True:
                    handle.write(b"\0" * 4096)
                    handle.flush()
            except OSError:
                pass
        _wait_for(lambda: not pid_alive(int(sub.jobs.evaluate.job_id)), 600, "the evaluation job ending", poll_s=1)
        done, record = _status_until_final(tmp_path, _site_file(tmp_path, site), example_db, 1)
    finally:
        subprocess.run(["umount", "-l", str(out)], capture_output=True)
        _cancel_if_in_flight(example_db, 1)
    assert record.status == RecordState.FAILED, (record, done.stdout)
    print(f"reason: {record.reason}")
    assert "No space left on device" in record.reason, record.reason
    assert f"evaluation job {sub.jobs.evaluate.job_id} FAILED" in record.reason  # and which job, as before


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.pacemaker
@pytest.mark.parametrize("phase", ["python", "inside"])
def test_scancel_of_a_running_evaluation_publishes_nothing_and_ends_cancelled(tmp_path, example_db, phase):
    """The README's promise on the real CI cluster: before the fix, an evaluation scancelled
    in its Python phase published and wrote SUCCEEDED a second later; one scancelled while
    pace_activeset ran ended FAILED "exit -15"."""
    from tests.helpers import TOY_EVALUATOR, ci_site, wait_state

    site = ci_site(tmp_path, pacemaker={"command": str(_tools(tmp_path, phase)), "evaluator": TOY_EVALUATOR})
    sub = submit_generation(example_db, site, tiny_train_config())
    try:
        _wait_for(lambda: (tmp_path / "signal.now").exists(), 600, "the evaluation's pace_activeset", poll_s=0.02)
    except AssertionError:
        _cancel_if_in_flight(example_db, 1)
        raise
    subprocess.run(["scancel", "-n", sub.jobs.evaluate.name, sub.jobs.evaluate.job_id], check=True, timeout=30)
    assert wait_state(sub.jobs.evaluate.job_id, {"CANCELLED", "COMPLETED", "FAILED"}, timeout_s=120,
                      name=sub.jobs.evaluate.name) == "CANCELLED"
    time.sleep(3)  # what a job that went on would have published by now
    assert not (potentials_root(site.output_dir) / "1").exists()
    done, record = _status_until_final(tmp_path, _site_file(tmp_path, site), example_db, 1)
    assert record.status == RecordState.CANCELLED, (record, done.stdout)
    assert f"evaluation job {sub.jobs.evaluate.job_id} CANCELLED" in record.reason, record.reason
    assert not (potentials_root(site.output_dir) / "1").exists()


# -- a select job told to stop commits nothing -----------------------------------------------

def _pool(database: str, n: int = 300) -> list[int]:
    """Enough candidates that scoring lasts a few seconds (one batch of rows written at a time)."""
    from tests.helpers import near_candidates

    db = DatabaseManager(database)
    return [db.add_candidate(atoms, "pool") for atoms in near_candidates(n, seed=5)]


def _scoring_began(database: str) -> bool:
    return any(row.get("gamma_max") is not None for row in DatabaseManager(database).iter_rows(status="CANDIDATE"))


def _nothing_committed(database: str) -> None:
    db = DatabaseManager(database)
    assert db.markers("selection", 1) == []
    assert db.count(status="DFT_REQUESTED") == 0


@pytest.mark.slow
@pytest.mark.pacemaker
def test_a_local_select_job_stopped_while_it_scores_commits_nothing(trained, tmp_path):
    from autopipec_hpc.active.select_job import submit_selection, wait_for_selection
    from autopipec_hpc.active.selection_folder import SelectionRequest
    from autopipec_hpc.errors import SelectionError
    from tests.helpers import copy_db

    database = copy_db(trained, tmp_path)
    _pool(database)
    site = trained[1].model_copy(update={"database": database})
    request = SelectionRequest(generation=1, max_select=3, gamma_min=0.0, batch=10, out_dir=tmp_path / "selection")
    sub = submit_selection(site, DatabaseManager(database), request)
    _wait_for(lambda: _scoring_began(database), 300, "the select job scoring", poll_s=0.02)
    os.kill(int(sub.task.job_id), signal.SIGTERM)  # as `kill` by hand, or a cancel: forwarded to the body
    with pytest.raises(SelectionError, match="stopped by SIGTERM"):
        wait_for_selection(site, sub.folder.path, timeout_s=120)
    _nothing_committed(database)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.pacemaker
def test_scancel_of_a_select_job_while_it_scores_commits_nothing(trained, tmp_path):
    """Before the fix the scancelled select job scored on, committed its rows within the
    SIGKILL's 30 s, and `select` returned 0."""
    from tests.helpers import ci_site, copy_db

    database = copy_db(trained, tmp_path)
    _pool(database)
    from autopipec_hpc.config import JobResources

    site = ci_site(tmp_path).model_copy(update={"select": JobResources(partition="cpu", cpus=1, mem_gb=1,
                                                                       time_minutes=10)})
    site_file = _site_file(tmp_path, site)
    command = subprocess.Popen(CLI + ["select", "--site", str(site_file), "--db", database, "--generation", "1",
                                      "--max", "3", "--gamma-min", "0", "--batch", "10", "--out",
                                      str(tmp_path / "selection")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        job = _wait_for(lambda: (tmp_path / "selection" / "job.json").exists()
                        and json.loads((tmp_path / "selection" / "job.json").read_text()), 120, "the select job")
        _wait_for(lambda: _scoring_began(database), 300, "the select job scoring", poll_s=0.02)
        subprocess.run(["scancel", "-n", job["name"], job["job_id"]], check=True, timeout=30)
        out, err = command.communicate(timeout=120)
    finally:
        if command.poll() is None:
            command.kill()
    assert command.returncode == 2 and err.count("\n") == 1, (out, err)
    _nothing_committed(database)
