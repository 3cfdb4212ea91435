"""The command line: import then prepare, and one clear line on bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from autopipec_hpc.cli import main

CLI = [sys.executable, "-m", "autopipec_hpc.cli"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_import_then_prepare_on_real_dft_copper(tmp_path, cu_dft_path):
    db = str(tmp_path / "cu.db")
    done = run("import", str(cu_dft_path), "--db", db)
    assert done.returncode == 0, done.stderr
    assert "imported 105" in done.stdout
    done = run("prepare", "--db", db, "--out", str(tmp_path / "ds"), "--seed", "3")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for expected in ("A1_murnaghan", "A3_phonon", "reference energies", "ZBL baseline", "skipped structures: 0"):
        assert expected in out
    assert (tmp_path / "ds" / "train-000.pckl.gzip").exists()
    assert (tmp_path / "ds" / "test.extxyz").exists()


def test_prepare_with_no_ready_rows_is_one_clear_line(tmp_path, capsys):
    from autopipec_hpc.db import DatabaseManager

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
