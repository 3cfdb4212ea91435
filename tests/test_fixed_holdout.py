"""A fixed holdout named in the training config (``holdout``): refused by name before the
claim when it names nothing, and the one every generation is compared on."""

from __future__ import annotations

import hashlib
from pathlib import Path

import ase.io
import pytest
import yaml

from autopipec_hpc.cli import main
from autopipec_hpc.example_data import example_structures, tiny_train_config, write_example_database
from autopipec_hpc.store import DatabaseManager
from tests.helpers import tiny_site


def _files(tmp_path: Path, holdout: dict) -> tuple[Path, Path, str]:
    database = str(tmp_path / "structures.db")
    write_example_database(DatabaseManager(database))
    site = tiny_site(tmp_path).model_copy(update={"database": database})
    site_file = tmp_path / "site.yaml"
    site_file.write_text(yaml.safe_dump(site.model_dump(mode="json")))
    config = tiny_train_config().model_dump(mode="json") | {"holdout": holdout}
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(config))
    return site_file, config_file, database


@pytest.mark.parametrize("holdout, culprit", [
    ({"config_type": "fcc_strainedd"}, "holdout: config_type 'fcc_strainedd' has no labelled structure"),
    ({"file": "nowhere.extxyz"}, "holdout file"),
    ({"file": "new.extxyz"}, "match no labelled structure in the database"),
    ({"config": "x"}, "holdout"),  # an unknown key, named by the config's own check
])
def test_a_holdout_naming_nothing_is_one_line_exit_2_before_the_claim(tmp_path, capsys, monkeypatch,
                                                                      holdout, culprit):
    from ase.build import bulk

    monkeypatch.chdir(tmp_path)
    ase.io.write(tmp_path / "new.extxyz", bulk("Cu", "fcc", a=3.7, cubic=True), format="extxyz")
    site_file, config_file, database = _files(tmp_path, holdout)
    before = hashlib.sha256(Path(database).read_bytes()).hexdigest()
    code = main(["submit", "--site", str(site_file), "--config", str(config_file)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and culprit in err, err
    assert hashlib.sha256(Path(database).read_bytes()).hexdigest() == before  # no record claimed
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.pacemaker
def test_every_generation_holds_out_the_fixed_holdout_and_is_compared_on_it(tmp_path, capsys, monkeypatch):
    # The loop's common-holdout table covered the 4 structures its first generation happened
    # to test: too few to compare generations, and it did not say where they came from.
    monkeypatch.chdir(tmp_path)
    cells = example_structures()
    strained = [atoms for atoms, ctype in cells if ctype == "fcc_strained"]
    ase.io.write(tmp_path / "holdout.extxyz", [cells[0][0], cells[8][0]], format="extxyz")  # two more, by content
    site_file, config_file, database = _files(tmp_path, {"config_type": "fcc_strained", "file": "holdout.extxyz"})
    db = DatabaseManager(database)
    ids = {row.get("config_type"): [] for row in db.iter_rows(status="TRAINING_READY")}
    for row in db.iter_rows(status="TRAINING_READY"):
        ids[row.get("config_type")].append(row.id)
    holdout = sorted(ids["fcc_strained"] + [ids["fcc_ev"][0], ids["bcc_ev"][0]])
    assert len(strained) == 6 and len(holdout) == 8

    for generation, extra in ((1, []), (2, ["--from-generation", "1"])):
        assert main(["submit", "--site", str(site_file), "--config", str(config_file), "--wait", *extra]) == 0
        record = db.get_record(generation)
        assert str(record.status) == "SUCCEEDED"
        from autopipec_hpc.dataset_prep import DatasetManifest

        manifest = DatasetManifest.load(record.potential_path)
        assert manifest.holdout_ids == holdout and set(holdout) <= set(manifest.test_ids)
        assert not set(holdout) & set(manifest.train_ids)
    capsys.readouterr()

    from autopipec_hpc.evaluation import compare_on_common_holdout

    compared = compare_on_common_holdout(db)
    assert compared.ids == holdout and compared.fixed_size == 8 and "config_type fcc_strained" in compared.fixed
    assert [r.generation for r in compared.rows] == [1, 2] and all(r.structures == 8 for r in compared.rows)
    assert main(["results", "--site", str(site_file), "--common-holdout"]) == 0
    out = capsys.readouterr().out
    assert "on the same 8 holdout structures" in out and "8 of its 8 structures" in out
    assert "too few to rank them" in out  # 8 is still few, and it says so
