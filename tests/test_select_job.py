"""`select --site` on a SLURM site runs as one job of the real CI cluster (scripts/slurm/up.sh):
the job is in sacct, its script is kept, it writes the gammas pyace gives, and a select job
that fails or is cancelled ends the command with one line and leaves no row requested.

Generation 1 is one tiny pyace fit for the whole module (``trained``, on the local executor).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from autopipec_hpc.active.gamma import GammaScorer
from autopipec_hpc.cli import main
from autopipec_hpc.config import JobResources
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.active.selection_folder import SelectionFolder
from tests.helpers import CLI, ci_site, copy_db, far_candidates, near_candidates, wait_state

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.pacemaker]
JOB_NAME = "autopipec-g1-select"  # then "-" and a token of the job's own (job.json keeps the whole name)
# The select job's own resources (the site's `select:` section), told apart from evaluate's.
SELECT_RESOURCES = {"partition": "cpu", "cpus": 1, "mem_gb": 1, "time_minutes": 7}


def _candidates(database: str) -> tuple[list[int], list[int]]:
    db = DatabaseManager(database)
    near = [db.add_candidate(a, "near") for a in near_candidates()]
    far = [db.add_candidate(a, f"far{k}") for k, a in enumerate(far_candidates())]
    return near, far


def _site_file(tmp_path: Path, **changes) -> Path:
    site = ci_site(tmp_path, **changes).model_copy(update={"select": JobResources(**SELECT_RESOURCES)})
    path = tmp_path / "site.yaml"
    path.write_text(json.dumps(site.model_dump(mode="json")))
    return path


def _job_name(folder: SelectionFolder) -> str:
    name = json.loads(folder.job_file.read_text())["name"]
    assert name.startswith(f"{JOB_NAME}-") and len(name) == len(JOB_NAME) + 9, name
    return name



def _sacct(job_id: str, name: str) -> list[str]:
    """sacct's name|partition|state of job ``job_id`` named ``name``, once it has ended (job ids
    restart with the shared cluster: accounting may list an older job of the same id too)."""
    deadline = time.monotonic() + 60
    while True:
        lines = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "--name", name,
                                "-o", "JobName,Partition,State"], capture_output=True, text=True, timeout=30).stdout
        lines = [line.strip() for line in lines.splitlines() if line.strip()]
        ended = any(word in line for line in lines for word in ("COMPLETED", "FAILED", "CANCELLED"))
        if ended or time.monotonic() > deadline:
            return lines
        time.sleep(1)


def test_select_on_a_slurm_site_runs_as_one_job_and_writes_pyaces_gamma(trained, tmp_path, capsys):
    database = copy_db(trained, tmp_path)
    near, far = _candidates(database)
    start = time.monotonic()
    code = main(["select", "--site", str(_site_file(tmp_path)), "--db", database, "--generation", "1",
                 "--max", "3", "--gamma-min", "1"])
    took = time.monotonic() - start
    out = capsys.readouterr().out
    assert code == 0, out
    print(f"select as a SLURM job: {took:.1f} s from submission to the printed summary")
    db = DatabaseManager(database)
    [marker] = db.markers("selection", 1)
    folder = SelectionFolder(marker.folder)
    assert folder.path == Path(trained[2].potential_path).parent.parent / "selections" / "gen-1"
    job = json.loads(folder.job_file.read_text())
    assert job["scheduler"] == "slurm" and f"select job {job['job_id']} submitted" in out
    assert f"{_job_name(folder)}|cpu|COMPLETED" in _sacct(job["job_id"], job["name"])
    script = folder.job_script().read_text()
    assert f"#SBATCH --job-name={job['name']}" in script and "#SBATCH --partition=cpu" in script
    assert "#SBATCH --time=7" in script and "compute-node preamble (select job of" in script
    assert folder.submitted_pickle().exists() and Path(job["folder"]).is_dir()
    # the same summary table as in-process, read back from the job's summary
    summary = json.loads(folder.summary_file.read_text())
    assert sorted(summary["selected_ids"]) == sorted(far)
    assert "3 structures now DFT_REQUESTED" in out and "far0" in out
    rows = {r.id: r for r in db.iter_rows()}
    assert sorted(i for i, r in rows.items() if r.get("status") == "DFT_REQUESTED") == sorted(far)
    scorer = GammaScorer(Path(trained[2].potential_path))
    for i in near + far:
        gamma = scorer.gamma(rows[i].toatoms())
        assert rows[i].scored_by_generation == 1
        assert rows[i].gamma_max == pytest.approx(gamma.max(), rel=1e-12)
        assert rows[i].gamma_mean == pytest.approx(gamma.mean(), rel=1e-12)


def _gated_select(tmp_path: Path, database: str, gate: Path) -> tuple[subprocess.Popen, SelectionFolder, str]:
    """`select` from a new process, its job held in the preamble until ``gate`` exists."""
    site_file = _site_file(tmp_path, setup=[f"while [ ! -e {gate} ]; do sleep 0.2; done"])
    out = tmp_path / "selection"
    command = subprocess.Popen(CLI + ["select", "--site", str(site_file), "--db", database, "--generation", "1",
                                      "--max", "3", "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    folder = SelectionFolder(out)
    deadline = time.monotonic() + 120
    while not folder.job_file.exists() and command.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert folder.job_file.exists(), command.communicate(timeout=30)
    job_id = json.loads(folder.job_file.read_text())["job_id"]
    assert wait_state(job_id, {"RUNNING"}, name=_job_name(folder)) == "RUNNING"  # waiting at the gate
    return command, folder, job_id


def _no_false_state(database: str, candidates: list[int]) -> None:
    db = DatabaseManager(database)
    assert db.count(status="DFT_REQUESTED") == 0 and db.markers("selection") == []
    assert all(db.get_row(i).status == "CANDIDATE" for i in candidates)


def test_a_select_job_that_fails_ends_the_command_with_its_error_and_requests_nothing(trained, tmp_path):
    database = copy_db(trained, tmp_path)
    near, far = _candidates(database)
    gate = tmp_path / "go"
    command, folder, job_id = _gated_select(tmp_path, database, gate)
    potential = Path(trained[2].potential_path) / "potential.yaml"
    aside = potential.with_name("potential.yaml.aside")
    potential.rename(aside)  # the published potential disappears after the submission
    try:
        gate.touch()
        stdout, stderr = command.communicate(timeout=300)
    finally:
        aside.rename(potential)
    print(stderr)
    assert command.returncode == 2, stdout + stderr
    [line] = stderr.strip().splitlines()
    assert line.startswith(f"error: select job {job_id} failed: generation 1: ")
    assert "potential.yaml is missing" in line and str(folder.path / "submitit") in line
    assert wait_state(job_id, {"FAILED"}, name=_job_name(folder)) == "FAILED"
    assert "potential.yaml is missing" in folder.failure()
    assert not folder.summary_file.exists()
    _no_false_state(database, near + far)


def test_a_cancelled_select_job_ends_the_command_with_one_line_and_requests_nothing(trained, tmp_path):
    database = copy_db(trained, tmp_path)
    near, far = _candidates(database)
    command, folder, job_id = _gated_select(tmp_path, database, tmp_path / "never")
    subprocess.run(["scancel", job_id], check=True, timeout=30)
    stdout, stderr = command.communicate(timeout=120)
    print(stderr)
    assert command.returncode == 2, stdout + stderr
    [line] = stderr.strip().splitlines()
    assert line.startswith(f"error: select job {job_id} ended CANCELLED without a selection")
    name = _job_name(folder)
    assert any(line.startswith(f"{name}|cpu|CANCELLED") for line in _sacct(job_id, name))
    _no_false_state(database, near + far)


def test_the_loop_on_a_slurm_site_selects_with_the_same_job(trained, tmp_path, monkeypatch):
    from autopipec_hpc.active import loop
    from autopipec_hpc.example_data import tiny_train_config

    database = copy_db(trained, tmp_path)
    near, far = _candidates(database)
    site = ci_site(tmp_path, database=database).model_copy(update={"select": JobResources(**SELECT_RESOURCES)})

    def interrupted(*a, **k):
        raise KeyboardInterrupt  # stop the loop after its select step

    monkeypatch.setattr(loop, "label_step", interrupted)
    said: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        settings = loop.LoopSettings(generations=2, select=3, calculator="ase.calculators.emt:EMT")
        loop.run_loop(site, DatabaseManager(database), tiny_train_config(), settings, timeout_s=300,
                      notify=said.append)
    db = DatabaseManager(database)
    [marker] = db.markers("selection", 1)
    job = json.loads(SelectionFolder(marker.folder).job_file.read_text())
    assert f"{_job_name(SelectionFolder(marker.folder))}|cpu|COMPLETED" in _sacct(job["job_id"], job["name"])
    assert any(f"select job {job['job_id']} submitted (slurm)" in line for line in said), said
    assert sorted(r.id for r in db.iter_rows(status="DFT_REQUESTED")) == sorted(far)


def test_select_no_wait_prints_the_job_and_where_its_summary_will_be(trained, tmp_path, capsys):
    database = copy_db(trained, tmp_path)
    _candidates(database)
    gate = tmp_path / "go"
    site_file = _site_file(tmp_path, setup=[f"while [ ! -e {gate} ]; do sleep 0.2; done"])
    out = tmp_path / "selection"
    assert main(["select", "--site", str(site_file), "--db", database, "--generation", "1", "--max", "3",
                 "--out", str(out), "--no-wait"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    job_id = json.loads(SelectionFolder(out).job_file.read_text())["job_id"]
    assert f"select job {job_id} submitted (slurm)" in printed
    assert f"its summary will be {out / 'selection.json'}" in printed
    gate.touch()
    name = _job_name(SelectionFolder(out))
    assert f"{name}|cpu|COMPLETED" in _sacct(job_id, name)
    assert sorted(json.loads((out / "selection.json").read_text())["selected_ids"]) == \
        sorted(r.id for r in DatabaseManager(database).iter_rows(status="DFT_REQUESTED"))
