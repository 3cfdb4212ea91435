"""RunFolder: every path of a run folder, attempts in numeric order, generation folder lookup."""

from __future__ import annotations

from pathlib import Path

import pytest

from autopipec_hpc.config import SiteConfig
from autopipec_hpc.run_folder import (
    RunFolder,
    RunSpec,
    attempt_number,
    generation_dir_name,
    generation_folders,
    latest_generation_folder,
    new_run_folder,
)
from autopipec_hpc.generation import find_run


def test_paths_of_a_run_folder(tmp_path):
    folder = RunFolder(tmp_path / "gen-0003")
    root = tmp_path / "gen-0003"
    assert folder.spec_file == root / "run.json"
    assert folder.jobs_file == root / "jobs.json"
    assert folder.train_verdict == root / "train.done"
    assert folder.cancel_marker == root / "cancel.requested"
    assert folder.requeue_marker == root / "requeue.pending"
    assert folder.dataset_dir == root / "dataset"
    assert folder.submitit_dir == root / "submitit"
    assert folder.evaluation_dir == root / "evaluation"
    assert folder.job_script("train") == root / "train.sbatch"
    assert folder.submitted_pickle("evaluate") == root / "submitit" / "evaluate_submitted.pkl"
    assert folder.attempt(4) == root / "attempt-4"


def test_attempts_sort_numerically_and_the_next_one_follows_the_last(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.attempts() == [] and folder.latest_attempt is None
    assert folder.next_attempt == tmp_path / "attempt-1"
    for n in (1, 2, 10, 9):
        folder.attempt(n).mkdir()
    (tmp_path / "attempt-x").mkdir()  # not an attempt
    (tmp_path / "attempt-11").write_text("")  # a file, not an attempt directory
    assert [attempt_number(a) for a in folder.attempts()] == [1, 2, 9, 10]
    assert folder.latest_attempt == tmp_path / "attempt-10"
    assert folder.next_attempt == tmp_path / "attempt-11"
    with pytest.raises(ValueError):
        attempt_number(tmp_path / "attempt-x")


def test_a_generation_run_again_gets_a_new_folder_and_the_newest_is_found(tmp_path):
    assert generation_dir_name(3) == "gen-0003"
    made = [new_run_folder(tmp_path, 3).path for _ in range(11)]
    assert [p.name for p in made[:3]] == ["gen-0003", "gen-0003-r2", "gen-0003-r3"]
    assert made[-1].name == "gen-0003-r11"
    (tmp_path / "gen-00031").mkdir()  # generation 31, not a rerun of 3
    # by rerun number, not by name: gen-0003-r10 sorts before gen-0003-r2 as a string
    assert generation_folders(tmp_path, 3) == made
    assert latest_generation_folder(tmp_path, 3).path == tmp_path / "gen-0003-r11"
    assert latest_generation_folder(tmp_path, 4) is None


def test_find_run_without_a_record_takes_the_newest_rerun(tmp_path):
    site = SiteConfig(work_dir=tmp_path / "runs", database=str(tmp_path / "s.db"))
    for name in ("gen-0003", "gen-0003-r2", "gen-0003-r10", "gen-00031"):
        (tmp_path / "runs" / name).mkdir(parents=True)
    assert find_run(site, 3) == tmp_path / "runs" / "gen-0003-r10"


def test_run_spec_round_trips_through_its_folder(tmp_path):
    spec = RunSpec(generation=2, run_dir=str(tmp_path), database="x.db", output_dir="out",
                   site=SiteConfig().model_dump(mode="json"), config={})
    spec.save()
    assert RunFolder(tmp_path).spec_file.exists()
    assert RunSpec.load(tmp_path) == spec
    assert spec.dataset_dir == Path(tmp_path) / "dataset" and spec.folder.path == Path(tmp_path)


def test_jobs_json_of_either_format_loads(tmp_path):
    """jobs.json as written now (each job with its name), and as written before names
    carried a token (ids only): the old one is followed by id alone."""
    import json

    from autopipec_hpc.scheduler.base import SubmittedJob, SubmittedJobs

    (tmp_path / "jobs.json").write_text(json.dumps({"scheduler": "slurm", "folder": "/x/submitit",
                                                    "train": "12", "evaluate": "13"}))
    old = SubmittedJobs.load(tmp_path)
    assert (old.train.job_id, old.evaluate.job_id, old.train.name, old.scheduler) == ("12", "13", "", "slurm")
    assert old.evaluate.role == "evaluate" and old.train.folder == "/x/submitit"
    new = SubmittedJobs(train=SubmittedJob(scheduler="local", folder="/f", job_id="1", role="train",
                                           name="autopipec-g1-train-0123abcd", time_minutes=5),
                        evaluate=SubmittedJob(scheduler="local", folder="/f", job_id="2", role="evaluate",
                                              name="autopipec-g1-evaluate-0123abcd", time_minutes=9))
    new.save(tmp_path)
    assert SubmittedJobs.load(tmp_path) == new

