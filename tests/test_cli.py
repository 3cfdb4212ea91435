"""The command line: import then prepare, and one clear line on bad input."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from autopipec_hpc.cli import main
from tests.helpers import CLI, run_cli


def test_import_then_prepare_on_real_dft_copper(tmp_path, cu_dft_path):
    db = str(tmp_path / "cu.db")
    done = run_cli("import", str(cu_dft_path), "--db", db)
    assert done.returncode == 0, done.stderr
    assert "imported 105" in done.stdout
    done = run_cli("prepare", "--db", db, "--out", str(tmp_path / "ds"), "--seed", "3")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for expected in ("A1_murnaghan", "A3_phonon", "reference energies", "ZBL baseline", "skipped structures: 0"):
        assert expected in out
    assert (tmp_path / "ds" / "train-000.pckl.gzip").exists()
    assert (tmp_path / "ds" / "test.extxyz").exists()


def test_prepare_with_no_ready_rows_is_one_clear_line(tmp_path, capsys):
    from autopipec_hpc.store import DatabaseManager

    DatabaseManager(str(tmp_path / "empty.db")).count()  # an existing database without ready rows
    code = main(["prepare", "--db", str(tmp_path / "empty.db"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "TRAINING_READY" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_prepare_with_bad_fraction_names_the_setting(tmp_path, capsys):
    main(["example-data", "--db", str(tmp_path / "x.db")])
    code = main(["prepare", "--db", str(tmp_path / "x.db"), "--out", str(tmp_path / "o"), "--test-fraction", "1.5"])
    assert code == 2
    assert "test_fraction" in capsys.readouterr().err


def test_prepare_refuses_unknown_config_key_by_name(tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("cutoff: 5.0\nkappa_typo: 0.3\n")
    main(["example-data", "--db", str(tmp_path / "x.db")])
    code = main(["prepare", "--db", str(tmp_path / "x.db"), "--out", str(tmp_path / "o"), "--config", str(cfg)])
    assert code == 2
    assert "unknown key 'kappa_typo'" in capsys.readouterr().err


def _toy_site(tmp_path: Path) -> Path:
    site = tmp_path / "site.yaml"
    site.write_text("name: loop-demo-test\nscheduler: local\nwork_dir: runs\noutput_dir: output\n"
                    "database: output/structures.db\npacemaker:\n  command: pacemaker\n  evaluator: tensorpot\n"
                    "train:\n  cpus: 2\n")
    return site


@pytest.mark.slow
def test_demo_loop_runs_two_generations_and_a_rerun_resumes_as_done(tmp_path):
    import yaml

    from autopipec_hpc.store import DatabaseManager
    from autopipec_hpc.example_data import tiny_train_config

    config = tmp_path / "tiny.yaml"
    toy = tiny_train_config().model_copy(update={"max_energy_rmse_mev": 1e5, "max_force_rmse_mev": 1e6})
    config.write_text(yaml.safe_dump(toy.model_dump(mode="json", exclude_none=True)))  # toy fits: no divergence guard
    argv = ["demo", "--site", str(_toy_site(tmp_path)), "--loop", "2", "--select", "3", "--pool", "20",
            "--config", str(config)]
    done = subprocess.run([*CLI, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "train generation 2 (warm start from generation 1)" in done.stdout
    db = DatabaseManager(str(tmp_path / "output" / "loop-demo" / "structures.db"))
    assert [(r.generation, str(r.status), r.values.get("parent_generation")) for r in db.records()] == [
        (1, "SUCCEEDED", None), (2, "SUCCEEDED", 1)]
    from autopipec_hpc.example_data import example_structures
    # the example cells and the 3 the loop labelled
    assert db.count(status="TRAINING_READY") == len(example_structures()) + 3
    assert db.count(status="CANDIDATE") == 20 - 3 and db.count(status="DFT_REQUESTED") == 0
    assert (tmp_path / "output" / "loop-demo" / "potentials" / "2" / "potential.yaml").exists()
    assert not (tmp_path / "output" / "potentials").exists()  # the plain demo's registry is untouched

    again = subprocess.run([*CLI, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "done: generation 2 is published" in again.stdout and "0 steps taken" in again.stdout


@pytest.mark.parametrize("extra, culprit", [
    (["--loop", "0"], "--loop"),
    (["--loop", "2", "--pool", "0"], "--pool"),
    (["--loop", "2", "--select", "0"], "--select"),
    (["--loop", "2", "--data", "x.extxyz"], "--data"),
])
def test_bad_demo_loop_options_are_one_line_exit_2_nothing_written(tmp_path, capsys, monkeypatch, extra, culprit):
    monkeypatch.chdir(tmp_path)  # the site's folders are relative
    code = main(["demo", "--site", str(_toy_site(tmp_path)), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and culprit in err, err
    assert not (tmp_path / "output").exists() and not (tmp_path / "runs").exists()


def test_table_titles_stay_whole_on_a_narrow_terminal(tmp_path, example_db, monkeypatch):
    # rich fitted each title to its table's width: at 60 columns the dataset folder came out
    # as "runs/gen-0001/dat" / "aset". A title is now a line of its own, never broken.
    import io

    from rich.console import Console

    from autopipec_hpc.cli import show
    from autopipec_hpc.store import DatabaseManager
    from autopipec_hpc.submission import dataset_settings, prepare_dataset_from_db
    from autopipec_hpc.config import TrainConfig

    out = tmp_path / "runs" / "gen-0001" / "dataset"
    manifest = prepare_dataset_from_db(DatabaseManager(example_db), dataset_settings(TrainConfig()), out)
    terminal = io.StringIO()
    monkeypatch.setattr(show, "console", Console(file=terminal, width=60, force_terminal=True, color_system=None))
    show.print_dataset_summary(manifest)
    lines = terminal.getvalue().splitlines()
    assert f"dataset in {out}" in lines  # the whole path on one line
    table = lines[lines.index(f"dataset in {out}") + 1:]
    assert table and max(len(line) for line in table[:8]) <= 60  # the table itself fits the terminal
