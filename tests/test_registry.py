"""The registry without a fit: atomic publication, no silent overwrite, manifest, LAMMPS lines, calculator."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms

from autopipec_hpc.errors import PublicationError
from autopipec_hpc.physics import ZBLCalculator
from autopipec_hpc.registry import (
    LAMMPS_SNIPPET,
    MANIFEST,
    POTENTIAL_YACE,
    POTENTIAL_YAML,
    REFERENCE_ENERGIES,
    discard,
    lammps_snippet,
    load_calculator,
    new_staging_dir,
    potentials_root,
    publish,
    read_manifest,
    stage_potential,
)


def fake_tools(root: Path) -> Path:
    """A pacemaker command whose pace_yaml2yace only copies: staging needs no real conversion."""
    tools = root / "bin"
    tools.mkdir()
    for name, body in (("pacemaker", "exit 0"), ("pace_yaml2yace", f'cp "$1" {POTENTIAL_YACE}')):
        script = tools / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return tools / "pacemaker"


def staged(output: Path, generation: int, text: str) -> Path:
    staging = new_staging_dir(output, generation)
    (staging / "content.txt").write_text(text)
    return staging


def visible(output: Path) -> list[str]:
    return sorted(p.name for p in potentials_root(output).iterdir())


def test_publish_into_an_empty_output_folder_renames_the_staging_folder(tmp_path):
    output = tmp_path / "output"
    staging = staged(output, 3, "first")
    assert staging.parent == potentials_root(output) and staging.name.startswith(".")  # hidden until published
    final = publish(staging, output, 3)
    assert final == potentials_root(output) / "3"
    assert (final / "content.txt").read_text() == "first"
    assert not staging.exists() and visible(output) == ["3"]
    assert stat.S_IMODE(final.stat().st_mode) == 0o755


def test_a_published_generation_is_not_overwritten_without_force(tmp_path):
    output = tmp_path / "output"
    publish(staged(output, 3, "first"), output, 3)
    second = staged(output, 3, "second")
    with pytest.raises(PublicationError, match="generation 3 is already published"):
        publish(second, output, 3)
    assert not second.exists()  # the refused staging folder is cleaned up
    assert (potentials_root(output) / "3" / "content.txt").read_text() == "first"
    final = publish(staged(output, 3, "third"), output, 3, force=True)
    assert (final / "content.txt").read_text() == "third"
    assert visible(output) == ["3"]  # the replaced one is gone, nothing half-made is left


def test_discard_removes_a_staging_folder(tmp_path):
    staging = staged(tmp_path / "output", 5, "x")
    discard(staging)
    assert not staging.exists() and visible(tmp_path / "output") == []
    discard(staging)  # gone already: no error


def test_lammps_snippet_has_the_hybrid_style_and_a_zbl_pair_for_every_type_pair():
    lines = lammps_snippet(["Cu", "Ni", "Al"], 1.2, 2.4, generation=7).splitlines()
    assert "pair_style hybrid/overlay pace zbl 1.2 2.4" in lines
    assert f"pair_coeff * * pace {POTENTIAL_YACE} Cu Ni Al" in lines
    zbl = [line for line in lines if " zbl " in line and line.startswith("pair_coeff")]
    assert zbl == [
        "pair_coeff 1 1 zbl 29 29", "pair_coeff 1 2 zbl 29 28", "pair_coeff 1 3 zbl 29 13",
        "pair_coeff 2 2 zbl 28 28", "pair_coeff 2 3 zbl 28 13", "pair_coeff 3 3 zbl 13 13",
    ]
    assert any("generation 7" in line for line in lines if line.startswith("#"))


def test_read_manifest_of_a_folder_without_one_is_a_publication_error(tmp_path):
    with pytest.raises(PublicationError, match="holds no published potential"):
        read_manifest(tmp_path)


def test_staged_files_and_manifest(tmp_path):
    potential = tmp_path / "fit.yaml"
    potential.write_text("elements: [Cu]\n")
    staging = tmp_path / "staging"
    manifest = stage_potential(staging, potential, None, ["Cu"], 1.0, 2.0, {"Cu": -1.5}, 4,
                               str(fake_tools(tmp_path)))
    assert manifest.files == [POTENTIAL_YAML, POTENTIAL_YACE, LAMMPS_SNIPPET, REFERENCE_ENERGIES]
    for name in manifest.files + [MANIFEST]:
        assert (staging / name).is_file(), name
    assert json.loads((staging / REFERENCE_ENERGIES).read_text()) == {"Cu": -1.5}
    assert read_manifest(staging) == manifest
    assert "pair_coeff 1 1 zbl 29 29" in (staging / LAMMPS_SNIPPET).read_text()


def small_potential(path: Path) -> Path:
    """An untrained but valid ACE potential: pyace's own basis for a tiny config, random coefficients
    (for tests with the ``pacemaker`` marker)."""
    import pyace
    import yaml

    from autopipec_hpc.example_data import tiny_train_config
    from autopipec_hpc.pacemaker.files import render_input

    spec = yaml.safe_load(render_input(tiny_train_config(), ["Cu"], ["-"], [], "pyace"))["potential"]
    basis = pyace.create_multispecies_basis_config(spec)
    basis.set_all_coeffs(np.random.default_rng(0).normal(0.0, 0.1, len(basis.get_all_coeffs())))
    basis.save(str(path))
    return path


@pytest.mark.pacemaker
def test_load_calculator_is_ace_plus_zbl_plus_reference_energies(tmp_path):
    potential = small_potential(tmp_path / "fit.yaml")
    from pyace import PyACECalculator

    staging = tmp_path / "staging"
    stage_potential(staging, potential, None, ["Cu"], 1.0, 2.0, {"Cu": -1.5}, 1, str(fake_tools(tmp_path)))
    calc = load_calculator(staging)
    for distance in (0.8, 1.5, 2.3):
        dimer = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, distance]])
        parts = []
        for part in (PyACECalculator(str(staging / POTENTIAL_YAML)), ZBLCalculator(1.0, 2.0)):
            atoms = dimer.copy()
            atoms.calc = part
            parts.append((atoms.get_potential_energy(), atoms.get_forces()))
        dimer.calc = calc
        assert dimer.get_potential_energy() == pytest.approx(parts[0][0] + parts[1][0] + 2 * -1.5, abs=1e-9)
        np.testing.assert_allclose(dimer.get_forces(), parts[0][1] + parts[1][1], atol=1e-9)
    assert parts[0][0] != 0.0  # the ACE part contributes
