"""Extrapolation grades (active/gamma.py): the batched pass gives the ASE calculator's gamma,
structure by structure and atom by atom; a structure that cannot be scored is named and costs
the rest of its batch nothing; the overlap check (pyace's neighbour list) finds the pairs ASE's
neighbour list finds."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from autopipec_hpc.active.gamma import OVERLAP_A, _closest_pair, _closest_pair_ase

ELEMENTS = ["Al", "Cu"]


def _cell(rng, n: int, pbc, skew: float = 0.0) -> Atoms:
    """n atoms of Al and Cu in a random, possibly skewed box of about 16 A^3 per atom, no two
    closer than 1.8 A."""
    lengths = (16.0 * n) ** (1 / 3) * rng.uniform(0.9, 1.2, 3)
    cell = np.diag(lengths) + skew * rng.uniform(-1, 1, (3, 3)) * lengths[:, None]
    atoms = Atoms(cell=cell, pbc=pbc)
    while len(atoms) < n:
        trial = atoms + Atoms(rng.choice(ELEMENTS), positions=[rng.uniform(0, 1, 3) @ cell], cell=cell, pbc=pbc)
        if len(trial) < 2 or _closest_ase(trial, 1.8) is None:
            atoms = trial
    return atoms


def _closest_ase(atoms, cutoff: float) -> float | None:
    """ASE's answer: the shortest distance below ``cutoff`` between two atoms, images included."""
    from ase.neighborlist import neighbor_list

    close = neighbor_list("d", atoms, cutoff)
    return float(close.min()) if len(close) else None


def _potential(folder: Path, rng) -> Path:
    """A published-looking folder: an untrained two-element ACE potential (pyace's own basis;
    gamma depends on the B-functions, not on their fitted coefficients), its active set from pace_activeset's own functions, a manifest."""
    import pyace
    import yaml
    from pyace.activelearning import (compute_A_active_inverse, compute_active_set, compute_B_projections,
                                      save_active_inverse_set)

    from autopipec_hpc import registry
    from autopipec_hpc.example_data import tiny_train_config
    from autopipec_hpc.pacemaker.files import render_input

    folder.mkdir(parents=True)
    spec = yaml.safe_load(render_input(tiny_train_config(), ELEMENTS, ["-"], [], "pyace"))["potential"]
    conf = pyace.create_multispecies_basis_config(spec)
    conf.save(str(folder / registry.POTENTIAL_YAML))
    basis = pyace.ACEBBasisSet(conf)
    training = [_cell(rng, 12, True) for _ in range(12)]
    active = compute_active_set(compute_B_projections(basis, training))
    save_active_inverse_set(str(folder / registry.ACTIVE_SET), compute_A_active_inverse(active),
                            elements_name=basis.elements_name)
    manifest = registry.PotentialManifest(generation=1, elements=ELEMENTS, zbl_inner=1.0, zbl_outer=2.0,
                                          reference_energies={e: 0.0 for e in ELEMENTS}, files=[],
                                          published_at=0.0)
    (folder / registry.MANIFEST).write_text(json.dumps(asdict(manifest)))
    return folder


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    from autopipec_hpc.active.gamma import GammaScorer

    return GammaScorer(_potential(tmp_path_factory.mktemp("gamma") / "1", np.random.default_rng(5)))


def _candidates(rng) -> list[Atoms]:
    """Two species interleaved in every order, 1 to 20 atoms, periodic (also skewed) and free."""
    out = [_cell(rng, n, True, skew=0.3 * (n % 2)) for n in (1, 2, 5, 9, 20)]
    out += [_cell(rng, n, False) for n in (2, 7)]
    out.append(bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1)))
    rattled = out[-1].copy()
    rattled.rattle(0.3, seed=3)
    rattled.symbols[[0, 3, 4]] = "Al"
    return out + [rattled]


@pytest.mark.pacemaker
def test_batched_gamma_is_the_calculators_gamma_atom_by_atom(scorer):
    candidates = _candidates(np.random.default_rng(7))
    batched = scorer.gammas(candidates)
    assert len(batched) == len(candidates)
    for atoms, grade in zip(candidates, batched):
        alone = scorer.gamma(atoms)
        assert grade.shape == (len(atoms),)
        np.testing.assert_allclose(grade, alone, rtol=1e-8, atol=1e-12)
    # the grades differ from structure to structure and atom to atom: the comparison can tell
    every = np.concatenate(batched)
    assert np.ptp(every) > 0.1 and len(np.unique(np.round(every, 6))) > len(every) // 2


@pytest.mark.pacemaker
def test_a_structure_that_cannot_be_scored_is_named_and_its_batch_is_still_scored(scorer):
    from autopipec_hpc.active.gamma import score_batch

    good = _candidates(np.random.default_rng(8))
    overlap = good[3].copy()
    overlap.positions[1] = overlap.positions[0] + [0.03, 0, 0]
    nan = good[4].copy()
    nan.positions[0, 2] = float("nan")
    unknown = good[2].copy()
    unknown.symbols[0] = "H"
    mixed = good[1].copy()
    mixed.pbc = [True, True, False]  # pyace's neighbour list takes fully periodic or free cells only
    batch = [good[0], overlap, good[1], nan, unknown, good[5], mixed, good[6]]
    scores = score_batch(scorer, batch)
    assert len(scores) == len(batch)
    assert scores[1].problem == "two atoms are 0.030 A apart (overlapping)" and scores[1].gamma is None
    assert "NaN" in scores[3].problem and scores[3].gamma is None
    assert scores[4].unknown == ["H"] and scores[4].gamma is None
    assert scores[6].problem == ("pyace cannot build its neighbour list "
                                 "(ValueError: Only fully periodic or non-periodic cell are supported)")
    for k in (0, 2, 5, 7):
        assert scores[k].problem is None and scores[k].unknown == []
        np.testing.assert_allclose(scores[k].gamma, scorer.gamma(batch[k]), rtol=1e-8, atol=1e-12)


@pytest.mark.pacemaker
def test_a_batch_pyace_fails_on_is_scored_one_by_one_and_only_the_culprit_is_named(scorer):
    """If the batched pass raises although every structure passed the check, each is scored
    alone: the one pyace fails on is named "scoring failed (...)", the others get their grades."""
    from autopipec_hpc.active.gamma import score_batch

    class _Choking:
        """FAULT INJECTOR around the real scorer: pyace "fails" on any batch holding a marked structure."""

        def __getattr__(self, name):
            return getattr(scorer, name)

        def gammas(self, batch, with_projections=False, environments=None):
            if any(atoms.info.get("choke") for atoms in batch):
                raise RuntimeError("pyace met something")
            return scorer.gammas(batch, with_projections, environments)

    batch = _candidates(np.random.default_rng(9))[:4]
    batch[2].info["choke"] = True
    scores = score_batch(_Choking(), batch, with_projections=True)
    assert scores[2].problem == "scoring failed (RuntimeError: pyace met something)" and scores[2].gamma is None
    for k in (0, 1, 3):
        assert scores[k].problem is None and scores[k].projections
        np.testing.assert_allclose(scores[k].gamma, scorer.gamma(batch[k]), rtol=1e-8, atol=1e-12)


def test_explorations_closest_pair_is_the_one_ase_finds():
    """The check of MD frames (explore.py). Periodic, skewed, free and mixed cells, and cutoffs up to beyond half a cell: the
    k-d tree over 27 images gives ASE's neighbour list's shortest distance, or None."""
    rng = np.random.default_rng(11)
    checked = found = 0
    for k in range(40):
        pbc = [[True] * 3, [False] * 3, [True, True, False], [True, False, True]][k % 4]
        atoms = _cell(rng, 1 + k % 9, pbc, skew=0.4 * (k % 3 == 0))
        atoms.rattle(0.8, seed=k)
        # unwrapped, as MD frames are: atoms whole cells away along the periodic directions
        atoms.positions += (rng.integers(-3, 4, (len(atoms), 3)) * atoms.pbc) @ atoms.cell.array
        for cutoff in (OVERLAP_A, 1.0, 2.0, 2.6):
            ours, ase = _closest_pair(atoms, cutoff), _closest_pair_ase(atoms, cutoff)
            assert (ours is None) == (ase is None), (k, cutoff, ours, ase)
            if ours is not None:
                assert ours == pytest.approx(ase, abs=1e-9)
                found += 1
            checked += 1
    assert found > checked // 4  # pairs are found, not only their absence


@pytest.mark.pacemaker
def test_the_overlap_check_finds_the_pairs_ase_finds(scorer):
    """Periodic (also skewed) and free cells, positions unwrapped as MD frames leave them, and
    a pair pushed to just under or over OVERLAP_A: the check (pyace's neighbour list) calls
    overlapping exactly the structures whose shortest distance in ASE's neighbour list is
    below it, and reports that distance."""
    rng = np.random.default_rng(11)
    flagged = 0
    for k in range(48):
        pbc = [True] * 3 if k % 2 else [False] * 3
        atoms = _cell(rng, 2 + k % 7, pbc, skew=0.4 * (k % 3 == 0))
        i, j = rng.choice(len(atoms), 2, replace=False)
        direction = rng.normal(size=3)
        gap = [0.03, 0.095, 0.105, 0.5][k % 4]
        atoms.positions[j] = atoms.positions[i] + gap * direction / np.linalg.norm(direction)
        # unwrapped: atoms whole cells away along the periodic directions
        atoms.positions += (rng.integers(-3, 4, (len(atoms), 3)) * atoms.pbc) @ atoms.cell.array
        ase = _closest_ase(atoms, 1.5)
        env, problem = scorer.check(atoms)
        if ase is not None and ase < OVERLAP_A:
            assert problem == f"two atoms are {ase:.3f} A apart (overlapping)", (k, ase, problem)
            flagged += 1
        else:
            assert problem is None and env is not None, (k, ase, problem)
    assert 20 <= flagged <= 28  # both answers were exercised


@pytest.mark.pacemaker
def test_an_atom_next_to_its_own_image_overlaps(scorer):
    """A periodic cell thinner than the overlap distance: the atom overlaps its own image;
    two atoms close across the cell boundary, one of them two cells away, overlap; without
    periodicity they are far apart."""
    thin = Atoms("Cu", positions=[[0, 0, 0]], cell=[3.0, 3.0, 0.05], pbc=True)
    assert "0.050 A apart" in scorer.check(thin)[1]
    across = Atoms("Cu2", positions=[[0.01, 1, 1], [2.96 + 6.0, 1, 1]], cell=[3.0, 3.0, 3.0], pbc=True)
    assert "0.050 A apart" in scorer.check(across)[1]
    across.pbc = False
    assert scorer.check(across)[1] is None


def test_a_structure_pyace_must_not_see_is_named_without_it():
    """No atoms, a NaN position, a collapsed periodic cell: named before any neighbour list."""
    from autopipec_hpc.active.gamma import basic_problem

    good = bulk("Cu", "fcc", a=3.61, cubic=True)
    nan = good.copy()
    nan.positions[2, 1] = float("nan")
    flat = Atoms("Cu2", positions=[[0, 0, 0], [1.2, 0, 0]], cell=[[3, 0, 0], [0, 3, 0], [0, 0, 0]], pbc=True)
    assert basic_problem(good) is None
    assert "NaN" in basic_problem(nan)
    assert "no volume" in basic_problem(flat)
    assert "no atoms" in basic_problem(Atoms())


@pytest.mark.pacemaker
def test_the_d_optimal_choice_on_the_scorers_projections_is_pace_selects(scorer, tmp_path):
    """The chooser reuses the projections computed for gamma; it must choose exactly what
    pace_select's body (``select_structures_maxvol``, which computes them again) chooses,
    in the same order, chunk by chunk as select offers them."""
    import pandas as pd
    from pyace import BBasisConfiguration
    from pyace.activelearning import compute_A_active_inverse, load_active_inverse_set
    from pyace.aceselect import select_structures_maxvol

    from autopipec_hpc import registry
    from autopipec_hpc.active.gamma import score_batch
    from autopipec_hpc.active.selection import _DOptimalChooser

    rng = np.random.default_rng(11)
    candidates = [_cell(rng, n, True) for n in (3, 6, 8, 10, 12, 14) * 3]
    folder = scorer.folder
    chooser = _DOptimalChooser(folder, max_select=5)
    chooser.CHUNK = 9  # a MaxVol pass per page offered
    whole = _DOptimalChooser(folder, max_select=5)  # the default: one pass over all 18, at the end
    bconf = BBasisConfiguration(str(folder / registry.POTENTIAL_YAML))
    extra = compute_A_active_inverse(load_active_inverse_set(str(folder / registry.ACTIVE_SET)))
    kept: list[tuple[int, Atoms]] = []
    for start in (0, 9):  # two chunks, as select offers a page at a time
        chunk = list(enumerate(candidates))[start:start + 9]
        scores = score_batch(scorer, [a for _, a in chunk], with_projections=True)
        offered = [(k, len(a), float(s.gamma.max()), s.projections) for (k, a), s in zip(chunk, scores)]
        chooser.offer(offered)
        whole.offer(offered)
        pool = kept + chunk
        df = pd.DataFrame({"row_id": [k for k, _ in pool], "ase_atoms": [a for _, a in pool]})
        chosen = select_structures_maxvol(df, bconf, extra_A0_projections_dict={st: a.copy() for st, a in extra.items()},
                                          batch_size_option="none", max_structures=5, verbose=False)
        kept = [(int(k), a) for k, a in zip(chosen["row_id"], chosen["ase_atoms"])]
        assert [k for k, *_ in chooser.kept] == [k for k, _ in kept]
    assert len(kept) == 5
    assert not whole.kept and len(whole.pending) == 18  # nothing chosen before the end
    df = pd.DataFrame({"row_id": list(range(18)), "ase_atoms": candidates})
    chosen = select_structures_maxvol(df, bconf, extra_A0_projections_dict={st: a.copy() for st, a in extra.items()},
                                      batch_size_option="none", max_structures=5, verbose=False)
    assert sorted(k for k, _ in whole.ranked()) == sorted(int(k) for k in chosen["row_id"])


def test_the_gamma_figure_counts_every_candidate_in_its_row_and_draws_the_thresholds(tmp_path):
    import xml.etree.ElementTree as ET

    from autopipec_hpc.active.gamma_figure import write_gamma_figure

    rng = np.random.default_rng(4)
    rows = [("bulk <fcc>", 10 ** rng.uniform(-1, 0.5, 40)), ("surface & co", 10 ** rng.uniform(0, 3, 17)),
            ("empty", np.array([]))]
    path = tmp_path / "gamma.svg"
    assert write_gamma_figure(path, rows, "generation 2", [(1.0, "gamma_min"), (5.0, "extrapolating")])
    svg = "{http://www.w3.org/2000/svg}"
    root = ET.parse(path).getroot()  # well-formed: the labels' < > & are escaped
    labels = [t.text for t in root.iter(f"{svg}text")]
    assert "bulk <fcc>" in labels and "surface & co" in labels and "empty" not in labels
    cells = [r for r in root.iter(f"{svg}rect") if r.find(f"{svg}title") is not None]
    by_row: dict[str, int] = {}
    for cell in cells:
        by_row[cell.get("y")] = by_row.get(cell.get("y"), 0) + int(cell.find(f"{svg}title").text)
    assert sorted(by_row.values()) == [17, 40]  # every candidate lands in one cell of its row
    assert sum(1 for line in root.iter(f"{svg}line") if line.get("stroke") == "red") == 2
    assert not write_gamma_figure(tmp_path / "none.svg", [("empty", np.array([]))], "t", [])
    assert not (tmp_path / "none.svg").exists()
