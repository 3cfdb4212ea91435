"""Against a real single-node SLURM (scripts/slurm/up.sh): fit, failure, cancel, requeue.

`bash scripts/test.sh` starts the cluster and sets AUTOPIPEC_REQUIRE_SLURM=1, so these
fail rather than skip there. `bash scripts/slurm/up.sh && pytest -m slurm` runs them alone.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.errors import PreflightError, TrainingFailedError
from autopipec_hpc.example_data import tiny_train_config
from autopipec_hpc.registry import potentials_root
from autopipec_hpc.processes import pid_alive
from autopipec_hpc.generation import cancel_generation, job_states, wait_for_generation
from autopipec_hpc.submission import submit_generation
from autopipec_hpc.testing.fault_pacemaker import make_fault_pacemaker
from tests.helpers import CLI, ci_site, wait_state

pytestmark = [pytest.mark.slurm, pytest.mark.pacemaker]  # every test submits: preflight imports pyace


@pytest.mark.slow
def test_real_fit_on_the_gpu_partition_then_dependent_evaluation(tmp_path, example_db):
    """pacemaker's TensorFlow evaluator on the gpu partition; the CI's fake GPU is
    /dev/null, so the site's allow_cpu_fallback lets it train on the job's 2 CPUs."""
    site = ci_site(tmp_path)
    assert site.pacemaker.allow_cpu_fallback and site.train.cpus == 2
    start = time.monotonic()
    sub = submit_generation(example_db, site, tiny_train_config())
    submitted = time.monotonic() - start
    assert submitted < 60  # submit returns right after submitting
    run = Path(sub.spec.run_dir)
    record = wait_for_generation(run, timeout_s=900)
    print(f"submit returned in {submitted:.1f} s; result after {time.monotonic() - start:.1f} s")
    assert record.status == "SUCCEEDED"
    assert str(record.values["cuda_visible_devices"]) == "0"  # the fake GPU was allocated
    v = record.values
    assert v["evaluator"] == "tensorpot" and v["devices"].startswith("CPU (fallback")
    assert v["threads"] == 2  # SLURM's --cpus-per-task, not the node's core count
    assert v["tensorflow_version"] and v["tensorpotential_version"] and v["python_ace_version"]
    assert (potentials_root(site.output_dir) / "1" / "potential.yace").exists()
    train_script = (run / "train.sbatch").read_text()
    assert "#SBATCH --partition=gpu" in train_script and "#SBATCH --gres=gpu:1" in train_script
    eval_script = (run / "evaluate.sbatch").read_text()
    assert f"--dependency=afterok:{sub.jobs.train.job_id}" in eval_script
    assert "--kill-on-invalid-dep=yes" in eval_script and "#SBATCH --partition=cpu" in eval_script
    assert job_states(run) == {"train": "COMPLETED", "evaluate": "COMPLETED"}
    # status from a new process re-attaches through the run folder and sacct
    site_file = tmp_path / "site.yaml"
    site_file.write_text(__import__("json").dumps(site.model_dump(mode="json")))
    out = subprocess.run([*CLI, "status", "--site", str(site_file)],
                         capture_output=True, text=True, timeout=60)
    # A final record's jobs are not asked again (issue 19: status must not pay sacct for
    # finished generations); the row names them.
    jobs_cell = f"{sub.jobs.train.job_id} / {sub.jobs.evaluate.job_id} (record final: not asked)"
    assert "SUCCEEDED" in out.stdout and jobs_cell in out.stdout, out.stdout


def test_failing_training_cancels_the_evaluation_and_records_failed(tmp_path, example_db):
    site = ci_site(tmp_path, pacemaker={"command": str(make_fault_pacemaker(tmp_path, "crash")),
                                                 "evaluator": "pyace"})
    sub = submit_generation(example_db, site, tiny_train_config())
    with pytest.raises(TrainingFailedError, match="exited with code 1") as info:
        wait_for_generation(Path(sub.spec.run_dir), timeout_s=300)
    assert "bad_alloc" in info.value.log_tail
    assert wait_state(sub.jobs.train.job_id, {"FAILED"}) == "FAILED"
    assert wait_state(sub.jobs.evaluate.job_id, {"CANCELLED"}) == "CANCELLED"  # not left pending
    record = DatabaseManager(example_db).get_record(1)
    assert record.status == "FAILED" and "bad_alloc" in record.data["log_tail"]
    assert not (potentials_root(site.output_dir) / "1").exists()


def test_cancel_removes_both_jobs_and_records_cancelled(tmp_path, example_db):
    site = ci_site(tmp_path, pacemaker={"command": str(make_fault_pacemaker(tmp_path, "hang")),
                                                 "evaluator": "pyace"})
    sub = submit_generation(example_db, site, tiny_train_config())
    attempt = Path(sub.spec.run_dir) / "attempt-1"
    assert wait_state(sub.jobs.train.job_id, {"RUNNING"}) == "RUNNING"
    deadline = time.monotonic() + 60
    while not (attempt / "grandchild.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.5)  # cancel while the trainer runs, the case that must not leave processes
    states = cancel_generation(Path(sub.spec.run_dir))
    assert states == {"train": "CANCELLED", "evaluate": "CANCELLED"}
    assert DatabaseManager(example_db).get_record(1).status == "CANCELLED"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # CANCELLED in sacct; gone from the queue once SLURM has cleaned up
        queue = subprocess.run(["squeue", "-h", "-j", f"{sub.jobs.train.job_id},{sub.jobs.evaluate.job_id}"],
                               capture_output=True, text=True).stdout
        if not queue.strip():
            break
        time.sleep(1)
    assert not queue.strip()
    pids = [int((attempt / name).read_text()) for name in ("pacemaker.pid", "grandchild.pid")]
    deadline = time.monotonic() + 30
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(pid_alive(p) for p in pids), "the trainer's processes outlived the cancel"


@pytest.mark.slow
def test_time_limit_requeues_and_resumes_from_the_interim_potential(tmp_path, example_db):
    # Two minutes per attempt, warned 20 s before (SLURM may warn up to a minute early). The toy
    # on tensorpot makes about 12 iterations a second after a 15 s start here, and 1,500 take it
    # past any one attempt; early stopping is off so that only the time limit ends an attempt.
    # Not pyace: its gradient is by finite differences, and BFGS resumed (its Hessian reset) near
    # a minimum can spend a whole attempt in one line search, so every requeue repeats it.
    site = ci_site(tmp_path, train={"time_minutes": 2}, signal_delay_s=20, max_restarts=4,
                   pacemaker={"evaluator": "tensorpot"})
    config = tiny_train_config().model_copy(update={"maxiter": 1500, "early_stopping_min_improvement": None})
    start = time.monotonic()
    sub = submit_generation(example_db, site, config)
    run = Path(sub.spec.run_dir)
    record = wait_for_generation(run, timeout_s=1200)
    attempts = sorted(p.name for p in run.glob("attempt-*"))
    print(f"requeue path: {len(attempts)} attempts, result after {time.monotonic() - start:.1f} s")
    assert record.status == "SUCCEEDED"
    assert len(attempts) >= 2
    assert record.values["resumed_from"].endswith("interim_potential_0.yaml")
    last = run / attempts[-1]
    log = (last / "log.txt").read_text()
    assert "interim_potential_0.yaml" in log  # pacemaker was started from it (-p)
    assert record.values["restarts"] >= 1


def test_preflight_refuses_a_missing_pacemaker_and_submits_nothing(tmp_path, example_db):
    site = ci_site(tmp_path, pacemaker={"command": "/nonexistent/pacemaker"})
    before = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout
    with pytest.raises(PreflightError, match="pacemaker command"):
        submit_generation(example_db, site, tiny_train_config())
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout == before
    assert DatabaseManager(example_db).get_record(1).status == "FAILED"


def test_kept_job_script_can_be_resubmitted_by_hand(tmp_path, example_db):
    site = ci_site(tmp_path, pacemaker={"command": str(make_fault_pacemaker(tmp_path, "crash")),
                                                 "evaluator": "pyace"})
    sub = submit_generation(example_db, site, tiny_train_config())
    run = Path(sub.spec.run_dir)
    with pytest.raises(TrainingFailedError):
        wait_for_generation(run, timeout_s=300)
    out = subprocess.run(["sbatch", "--parsable", str(run / "train.sbatch")], capture_output=True, text=True,
                         timeout=30, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    assert wait_state(job_id, {"FAILED", "COMPLETED"}, timeout_s=120) == "FAILED"  # the crash, once more
    assert (run / "attempt-2" / "pacemaker.out").exists()  # the same TrainJob ran again, a fresh attempt


def test_gpu_job_whose_tensorflow_sees_no_gpu_fails_at_once_without_fallback(tmp_path, example_db):
    site = ci_site(tmp_path, pacemaker={"allow_cpu_fallback": False})
    start = time.monotonic()
    sub = submit_generation(example_db, site, tiny_train_config())
    with pytest.raises(TrainingFailedError, match="sees no GPU") as info:
        wait_for_generation(Path(sub.spec.run_dir), timeout_s=300)
    took = time.monotonic() - start
    message = str(info.value)
    print(f"GPU check failed after {took:.1f} s: {message}")
    assert "CUDA_VISIBLE_DEVICES=0" in message and "allow_cpu_fallback" in message
    assert "\n" not in DatabaseManager(example_db).get_record(1).reason  # one line
    record = DatabaseManager(example_db).get_record(1)
    assert record.status == "FAILED" and "sees no GPU" in record.reason
    assert not (Path(sub.spec.run_dir) / "attempt-1").exists()  # pacemaker never started
    assert wait_state(sub.jobs.evaluate.job_id, {"CANCELLED"}) == "CANCELLED"
    assert not (potentials_root(site.output_dir) / "1").exists()


@pytest.mark.slow
def test_on_slurm_the_validation_job_follows_the_evaluation_and_rejects_a_toy_fit(tmp_path, example_db):
    """The validation job on the CI cluster: submitted after the evaluation (afterok), on
    the site's validate resources; a toy fit ends REJECTED with the failed properties in
    its record, nothing published, and sacct lists all three jobs COMPLETED (a verdict,
    not a crash)."""
    import json

    from autopipec_hpc.errors import ValidationRejectedError
    from autopipec_hpc.generation import Generation
    from autopipec_hpc.states import JobRole, RecordState
    from tests.helpers import toy_validated_config

    site = ci_site(tmp_path, validate={"partition": "cpu", "cpus": 1, "mem_gb": 2, "time_minutes": 15})
    sub = submit_generation(example_db, site, toy_validated_config())
    assert sub.jobs.validate_job is not None and sub.jobs.validate_job.role == JobRole.VALIDATE
    run = Path(sub.spec.run_dir)
    script = (run / "validate.sbatch").read_text()
    assert f"--dependency=afterok:{sub.jobs.evaluate.job_id}" in script and "#SBATCH --partition=cpu" in script
    generation = Generation.open(run)
    with pytest.raises(ValidationRejectedError, match="REJECTED, not published: validation failed: "):
        generation.wait(900)
    record = generation.record()
    report = json.loads((run / "validation" / "validation.json").read_text())
    assert record.status == RecordState.REJECTED and record.reason == "validation failed: " + "; ".join(report["failures"])
    assert record.potential_path is None and not any(potentials_root(site.output_dir).iterdir())
    assert job_states(run) == {"train": "COMPLETED", "evaluate": "COMPLETED", "validate": "COMPLETED"}
