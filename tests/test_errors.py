"""Every mistake a user can type gets one line naming the culprit, exit code 2, and
leaves the database byte for byte as it was: a table over commands and inputs."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import CLI, CU_DFT


@dataclass
class Case:
    name: str
    argv: list[str]
    culprit: str
    files: dict[str, str | bytes] = field(default_factory=dict)
    needs_root_mount: bool = False


def _good_site(tmp: Path, **train) -> str:
    lines = [f"work_dir: {tmp / 'runs'}", f"output_dir: {tmp / 'output'}", f"database: {tmp / 'good.db'}",
             "pacemaker:", "  evaluator: pyace"]
    if train:
        lines += ["train:"] + [f"  {k}: {v}" for k, v in train.items()]
    return "\n".join(lines) + "\n"


DEEP = "a: " + "[" * 3000 + "]" * 3000 + "\n"

CASES = [
    # -- commands that read a database that is not there (and must not create it) ----
    Case("select on a missing database", ["select", "--generation", "1", "--db", "gone.db"], "gone.db"),
    Case("label on a missing database", ["label", "--calculator", "ase.calculators.emt:EMT", "--db", "gone.db"],
         "gone.db"),
    Case("loop on a missing database", ["loop", "--generations", "1", "--select", "2", "--calculator",
                                        "ase.calculators.emt:EMT", "--db", "gone.db"], "gone.db"),
    # -- import: files that are not what they claim --------------------------------
    Case("import a missing file", ["import", "nofile.xyz", "--db", "good.db"], "nofile.xyz"),
    Case("import a truncated extxyz", ["import", "trunc.extxyz", "--db", "good.db"], "trunc.extxyz",
         files={"trunc.extxyz": "TRUNCATE"}),
    Case("import a binary file", ["import", "binary.xyz", "--db", "good.db"], "binary.xyz",
         files={"binary.xyz": bytes(range(256)) * 8}),
    Case("import a directory", ["import", "adir", "--db", "good.db"], "adir", files={"adir/": ""}),
    Case("import an empty file", ["import", "empty.extxyz", "--db", "good.db"], "empty.extxyz",
         files={"empty.extxyz": ""}),
    Case("import with a newline in config_type", ["import", "one.extxyz", "--db", "good.db", "--config-type", "a\nb"],
         "config_type", files={"one.extxyz": "ONE"}),
    Case("import with a tab in config_type", ["import", "one.extxyz", "--db", "good.db", "--config-type", "a\tb"],
         "config_type", files={"one.extxyz": "ONE"}),
    Case("import with a carriage return in config_type",
         ["import", "one.extxyz", "--db", "good.db", "--config-type", "a\rb"], "config_type",
         files={"one.extxyz": "ONE"}),
    Case("import with an absurdly long config_type",
         ["import", "one.extxyz", "--db", "good.db", "--config-type", "x" * 5000], "config_type",
         files={"one.extxyz": "ONE"}),
    Case("import with an unknown status", ["import", "one.extxyz", "--db", "good.db", "--status", "READY!"],
         "status", files={"one.extxyz": "ONE"}),
    # -- databases that cannot be used ------------------------------------------------
    Case("import into a file that is not a database", ["import", "one.extxyz", "--db", "notdb.db"], "notdb.db",
         files={"one.extxyz": "ONE", "notdb.db": "this is not sqlite\n" * 50}),
    Case("status of a file that is not a database", ["status", "--db", "notdb.db"], "notdb.db",
         files={"notdb.db": "this is not sqlite\n" * 50}),
    Case("results of an unknown URL scheme", ["results", "--db", "foo://host/x"], "foo://"),
    Case("status of a database in a missing folder", ["status", "--db", "missing/dir/x.db"], "missing/dir/x.db"),
    Case("import into a database on a read-only folder", ["import", "one.extxyz", "--db", "ro/new.db"], "ro/new.db",
         files={"one.extxyz": "ONE"}, needs_root_mount=True),
    # -- training settings that cannot run ---------------------------------------------
    Case("prepare with a deeply nested YAML", ["prepare", "--db", "good.db", "--out", "ds", "--config", "deep.yaml"],
         "deep.yaml", files={"deep.yaml": DEEP}),
    Case("prepare with seed -5", ["prepare", "--db", "good.db", "--out", "ds", "--config", "c.yaml"], "seed",
         files={"c.yaml": "seed: -5\n"}),
    Case("prepare with --seed -5", ["prepare", "--db", "good.db", "--out", "ds", "--seed", "-5"], "seed"),
    Case("prepare with --test-fraction 2", ["prepare", "--db", "good.db", "--out", "ds", "--test-fraction", "2"],
         "test_fraction"),
    Case("prepare with an infinite cutoff", ["prepare", "--db", "good.db", "--out", "ds", "--config", "c.yaml"],
         "cutoff", files={"c.yaml": "cutoff: .inf\n"}),
    Case("prepare with a NaN reference energy", ["prepare", "--db", "good.db", "--out", "ds", "--config", "c.yaml"],
         "reference_energies", files={"c.yaml": "reference_energies: {Cu: .nan}\n"}),
    Case("prepare with a reference energy for no element",
         ["prepare", "--db", "good.db", "--out", "ds", "--config", "c.yaml"], "Xx",
         files={"c.yaml": "reference_energies: {Cu: -3.7, Xx: 1.0}\n"}),
    Case("prepare with a config that is a directory",
         ["prepare", "--db", "good.db", "--out", "ds", "--config", "adir"], "adir", files={"adir/": ""}),
    Case("prepare with a binary config", ["prepare", "--db", "good.db", "--out", "ds", "--config", "c.yaml"],
         "c.yaml", files={"c.yaml": bytes(range(256)) * 4}),
    Case("prepare with a YAML list as config", ["prepare", "--db", "good.db", "--out", "ds", "--config", "c.yaml"],
         "c.yaml", files={"c.yaml": "- 1\n- 2\n"}),
    Case("prepare into a file", ["prepare", "--db", "good.db", "--out", "afile"], "afile", files={"afile": "x"}),
    Case("prepare onto a full disk", ["prepare", "--db", "good.db", "--out", "full/ds"], "full/ds",
         needs_root_mount=True),
    # -- sites that cannot run -----------------------------------------------------------
    Case("submit with a missing site", ["submit", "--site", "nosite.yaml"], "nosite.yaml"),
    Case("submit with memory that becomes --mem=0M", ["submit", "--site", "site.yaml"], "mem_gb",
         files={"site.yaml": "SITE mem_gb=0.0001"}),
    Case("submit with an unknown evaluator", ["submit", "--site", "site.yaml"], "pacemaker.evaluator",
         files={"site.yaml": "pacemaker:\n  evaluator: jax\n"}),
    Case("check-site of a directory", ["check-site", "adir"], "adir", files={"adir/": ""}),
    Case("check-site of a deeply nested YAML", ["check-site", "deep.yaml"], "deep.yaml", files={"deep.yaml": DEEP}),
    Case("cancel of a generation that never was", ["cancel", "--generation", "99", "--site", "site.yaml"],
         "generation 99", files={"site.yaml": "SITE"}),
    Case("results of a generation that never was", ["results", "--generation", "99", "--db", "good.db"],
         "generation 99"),
    Case("status --generation -1", ["status", "--generation", "-1", "--db", "good.db"], "generation"),
    # -- validation settings (issue 18): refused before anything is claimed or submitted ----
    Case("submit with a negative a0 tolerance", ["submit", "--site", "site.yaml", "--config", "c.yaml"],
         "validation.gates.a0_tolerance", files={"site.yaml": "SITE", "c.yaml": "validation: {gates: {a0_tolerance: -1}}\n"}),
    Case("submit with a gate set to true", ["submit", "--site", "site.yaml", "--config", "c.yaml"],
         "validation.gates.md_stable", files={"site.yaml": "SITE", "c.yaml": "validation: {gates: {md_stable: maybe}}\n"}),
    Case("submit with an unknown validation key", ["submit", "--site", "site.yaml", "--config", "c.yaml"],
         "md_step", files={"site.yaml": "SITE", "c.yaml": "validation: {md_step: 5}\n"}),
    Case("submit with an EOS range of 80 %", ["submit", "--site", "site.yaml", "--config", "c.yaml"],
         "eos_volume_range", files={"site.yaml": "SITE", "c.yaml": "validation: {eos_volume_range: 0.8}\n"}),
]


@pytest.fixture(scope="module")
def good_db(tmp_path_factory) -> Path:
    from autopipec_hpc.store import DatabaseManager
    from autopipec_hpc.example_data import write_example_database

    path = tmp_path_factory.mktemp("db") / "good.db"
    write_example_database(DatabaseManager(str(path)))
    return path


def _materialise(case: Case, tmp: Path, good_db: Path) -> None:
    shutil.copy(good_db, tmp / "good.db")
    one = "ONE"
    for name, content in case.files.items():
        path = tmp / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        if content == "TRUNCATE":
            content = CU_DFT.read_text()[:700] if CU_DFT.exists() else "3\nLattice=\"1 0 0 0 1 0 0 0 1\"\nCu 0 0"
        elif content == one:
            from ase.build import bulk
            from ase.calculators.emt import EMT
            from ase.calculators.singlepoint import SinglePointCalculator
            import ase.io

            atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
            atoms.calc = EMT()
            atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy(),
                                               forces=atoms.get_forces())
            ase.io.write(path, atoms, format="extxyz")
            continue
        elif isinstance(content, str) and content.startswith("SITE"):
            extra = {}
            if "mem_gb=" in content:
                extra["mem_gb"] = content.split("mem_gb=")[1]
            content = _good_site(tmp, **extra)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def _mount(kind: str, where: Path) -> None:
    where.mkdir()
    options = "ro,size=1m" if kind == "ro" else "size=64k"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(case: Case, tmp_path: Path, good_db: Path):
    _materialise(case, tmp_path, good_db)
    mounts = []
    if case.needs_root_mount:
        if os.geteuid() != 0:
            pytest.skip("needs root to mount a small tmpfs")
        kind = "ro" if "ro/" in " ".join(case.argv) else "full"
        _mount(kind, tmp_path / kind)
        mounts.append(tmp_path / kind)
        if kind == "full":
            (tmp_path / "full" / "filler").write_bytes(b"\0" * 60_000)
    before = _digest(tmp_path / "good.db")
    try:
        done = subprocess.run(CLI + case.argv, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "AUTOPIPEC_DEBUG": ""})
    finally:
        for m in mounts:
            subprocess.run(["umount", str(m)], capture_output=True)
    err = done.stderr.strip()
    assert done.returncode == 2, f"exit {done.returncode}\nstderr: {err}\nstdout: {done.stdout[-2000:]}"
    assert "Traceback" not in err and "Traceback" not in done.stdout
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert case.culprit in lines[0], f"{case.culprit!r} not named in: {lines[0]}"
    assert _digest(tmp_path / "good.db") == before, "the database changed"
    assert not (tmp_path / "gone.db").exists(), "a missing database was created"


def test_debug_shows_the_traceback_of_a_bug(tmp_path):
    """An unexpected error is not a user's mistake: one line by default, the
    traceback with --debug."""
    code = ("import sys; from autopipec_hpc import cli; from autopipec_hpc.cli import commands\n"
            "def boom(args): raise ZeroDivisionError('a bug')\n"
            "commands.cmd_status = boom\n"
            "sys.exit(cli.main(sys.argv[1:]))\n")
    plain = subprocess.run([sys.executable, "-c", code, "status"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=60, env={**os.environ, "AUTOPIPEC_DEBUG": ""})
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert "ZeroDivisionError" in plain.stderr and "--debug" in plain.stderr
    debug = subprocess.run([sys.executable, "-c", code, "--debug", "status"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


LABELS = ['Cu "hot" $(rm -rf ~); a|b', "it's", "a=b", "ünï cödé 铜", r"back\slash", "x,y", "{a}", "[1,2]",
          "None", "A1_murnaghan", "with space", "1234", "3.5"]


@pytest.mark.parametrize("label", LABELS)
def test_labels_survive_into_the_database_and_every_file(tmp_path, label):
    """A config_type as real files carry it reaches the database, the pickles pacemaker
    reads and the Extended XYZ copies unchanged, and the files read back with ASE."""
    import ase.io
    import pandas as pd

    from autopipec_hpc.store import DatabaseManager
    from autopipec_hpc.example_data import example_structures

    db = DatabaseManager(str(tmp_path / "l.db"))
    for atoms, _ in example_structures()[:12]:
        db.add_structure(atoms, atoms.calc.results["energy"], atoms.calc.results["forces"], label)
    done = subprocess.run(CLI + ["prepare", "--db", str(tmp_path / "l.db"), "--out", str(tmp_path / "ds")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    from autopipec_hpc.store.structures import label_of

    rows = list(__import__("ase.db").db.connect(str(tmp_path / "l.db")).select())
    assert {label_of(row) for row in rows} == {label}  # exactly, whatever ase.db makes of its key
    for pickle in (tmp_path / "ds").glob("*.pckl.gzip"):
        assert set(pd.read_pickle(pickle, compression="gzip")["config_type"]) == {label}
    for xyz in (tmp_path / "ds").glob("*.extxyz"):
        frames = ase.io.read(xyz, ":")
        assert frames and {str(f.info["config_type"]) for f in frames} == {label}


def _published_by_hand(tmp_path, files: dict[str, str]) -> str:
    """A database whose generation 1 is SUCCEEDED and points at a folder holding ``files``."""
    from autopipec_hpc.states import RecordState
    from autopipec_hpc.store import DatabaseManager

    database = str(tmp_path / "s.db")
    db = DatabaseManager(database)
    folder = tmp_path / "potentials" / "1"
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    run = (tmp_path / "runs" / "gen-0001").resolve()
    db.claim(1, lambda n: run)
    db.update_record(1, run, RecordState.SUCCEEDED, values={"potential_path": str(folder)})
    return database


def test_a_garbage_dataset_manifest_is_named_in_one_line(tmp_path, capsys):
    from autopipec_hpc.cli import main

    database = _published_by_hand(tmp_path, {"dataset.json": '{"train_files": ['})
    assert main(["results", "--db", database, "--common-holdout"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dataset.json" in err and "not a dataset manifest" in err, err


@pytest.mark.pacemaker
def test_a_garbage_potential_manifest_is_named_in_one_line(tmp_path, capsys):
    from autopipec_hpc.cli import main

    database = _published_by_hand(tmp_path, {"potential.yaml": "x", "potential.asi": "x", "potential.json": "{{"})
    assert main(["select", "--db", database, "--generation", "1", "--out", str(tmp_path / "sel")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "potential.json" in err, err
