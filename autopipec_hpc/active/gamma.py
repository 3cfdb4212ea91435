"""Extrapolation grades of candidates: which ones can be scored, and their per-atom gamma.

``GammaScorer`` reads a published potential (``potential.yaml``) and its active set
(``potential.asi``). ``GammaScorer.gamma`` scores one structure through pyace's ASE
calculator (``PyACECalculator`` + ``set_active_set``); ``GammaScorer.gammas`` scores a
whole batch the way ``pace_select`` / ``pace_activeset`` do (pyace's
``compute_B_projections`` on the B-basis, then gamma = max_j |B . A_active^-1|_j per
atom): the same neighbour list, basis and active set, so the same numbers, without an
ASE calculator round trip per structure. ``score_batch`` is what ``select`` calls: per
structure, its unknown elements, or why it cannot be scored, or its gamma; one bad
structure never costs the others their batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autopipec_hpc import registry
from autopipec_hpc.errors import JobStopped, SelectionError, one_line

# Closer than this, two atoms overlap: no physical structure, and no grade means anything.
OVERLAP_A = 0.1


def _closest_pair(atoms, cutoff: float) -> float | None:
    """The shortest distance between two atoms (periodic images included) if it is below
    ``cutoff``, else None. A k-d tree over the atoms' wrapped positions and their 26
    neighbouring images: ASE's neighbor_list gives the same answer at ~7 ms a structure, too
    slow for the frames an exploration checks (explore.py; select uses pyace's neighbour
    list, ``GammaScorer.check``). Cells thinner than ``cutoff`` (an atom within reach of
    its own image two cells away) go to ASE."""
    from scipy.spatial import cKDTree

    positions = atoms.positions
    pbc = atoms.pbc
    if len(atoms) < 2 and not pbc.any():
        return None
    if pbc.any():
        cell = atoms.cell.array
        # Heights of the cell (volume / face area): an image closer than the cutoff lies
        # in a neighbouring cell only when every periodic height is at least the cutoff.
        faces = np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
        heights = abs(np.linalg.det(cell)) / faces
        if np.any(heights[pbc] < cutoff):
            return _closest_pair_ase(atoms, cutoff)
        frac = np.linalg.solve(cell.T, positions.T).T
        frac[:, pbc] %= 1.0
        positions = frac @ cell
        steps = [(-1, 0, 1) if p else (0,) for p in pbc]
        shifts = np.array([(i, j, k) for i in steps[0] for j in steps[1] for k in steps[2]]) @ cell
        images = (positions[None, :, :] + shifts[:, None, :]).reshape(-1, 3)
    else:
        images = positions
    # The nearest point to each atom is itself (distance 0); the second is its closest neighbour.
    distance, _ = cKDTree(images).query(positions, k=2, distance_upper_bound=cutoff)
    closest = float(distance[:, 1].min())
    return closest if closest < cutoff else None


def _closest_pair_ase(atoms, cutoff: float) -> float | None:
    from ase.neighborlist import neighbor_list

    close = neighbor_list("d", atoms, cutoff)
    return float(close.min()) if len(close) else None


def basic_problem(atoms) -> str | None:
    """Why a candidate cannot even be handed to pyace (named in the summary), or None. The
    overlap check needs a neighbour list: ``GammaScorer.check`` uses pyace's own."""
    if len(atoms) == 0:
        return "it has no atoms"
    if not np.all(np.isfinite(atoms.positions)) or not np.all(np.isfinite(atoms.cell.array)):
        return "its positions or cell hold NaN or inf"
    if atoms.pbc.any() and abs(atoms.cell.volume) < 1e-6:
        return "its periodic cell has no volume"
    return None


@dataclass
class Score:
    """One candidate's outcome: unknown elements, or a reason it cannot be scored, or its gamma."""

    unknown: list[str] = field(default_factory=list)
    problem: str | None = None
    gamma: np.ndarray | None = None  # per atom, in the structure's atom order
    # {species type: B-projections of its atoms}, where the caller asked for them (D-optimal)
    projections: dict[int, np.ndarray] | None = None


class GammaScorer:
    """Per-atom extrapolation grades of a published potential (ACE part, with its active set)."""

    def __init__(self, folder: Path) -> None:
        from pyace import ACEBBasisSet, BBasisConfiguration, PyACECalculator
        from pyace.activelearning import load_active_inverse_set

        self.folder = folder
        self.elements = set(registry.read_manifest(folder).elements)
        yaml_file, asi_file = folder / registry.POTENTIAL_YAML, folder / registry.ACTIVE_SET
        try:
            self.basis = ACEBBasisSet(BBasisConfiguration(str(yaml_file)))
            self.calc = PyACECalculator(self.basis)
        except Exception as exc:  # pyace's YAML and C++ readers raise whatever they meet
            raise SelectionError(f"{yaml_file}: not a readable potential ({one_line(exc)[:160]})") from None
        try:
            self.calc.set_active_set(str(asi_file))
            # The same file the calculator read, as pace_select reads it: {species type: A^-1}.
            self.inverse = load_active_inverse_set(str(asi_file))
        except Exception as exc:
            raise SelectionError(f"{asi_file}: not a readable active set ({one_line(exc)[:160]})") from None

    def check(self, atoms) -> tuple[Any, str | None]:
        """pyace's atomic environment of ``atoms`` (its neighbour list, which ``gammas``
        reuses), or why the structure cannot be scored: ``basic_problem``, or two atoms
        closer than OVERLAP_A (periodic images included). The check costs nothing beyond
        the neighbour list the grades need anyway; a Python one cost 0.14 ms a structure,
        a sixth of select's time at 7,000 candidates."""
        from pyace.atomicenvironment import aseatoms_to_atomicenvironment

        problem = basic_problem(atoms)
        if problem is not None:
            return None, problem
        try:
            env = aseatoms_to_atomicenvironment(atoms, cutoff=self.basis.cutoffmax,
                                                elements_mapper_dict=self.basis.elements_to_index_map)
        except Exception as exc:  # pyace raises what its C++ meets
            return None, f"pyace cannot build its neighbour list ({one_line(exc)[:160]})"
        closest = env.get_minimal_nn_distance()
        if closest < OVERLAP_A:
            return None, f"two atoms are {closest:.3f} A apart (overlapping)"
        return env, None

    def unknown(self, atoms) -> list[str]:
        return sorted(set(atoms.get_chemical_symbols()) - self.elements)

    def gamma(self, atoms) -> np.ndarray:
        """One structure through the ASE calculator (the reference ``gammas`` must agree with)."""
        atoms = atoms.copy()
        atoms.calc = self.calc
        atoms.get_potential_energy()
        return np.asarray(self.calc.results["gamma"], dtype=float)

    def gammas(self, batch: list, with_projections: bool = False, environments: list | None = None) -> list:
        """Per-atom gamma of every structure of ``batch``, in one pass of pyace's batch API.
        With ``with_projections``, each as ``(gamma, {species type: B-projections})``: the
        rows a D-optimal choice needs, so that it never computes them a second time.
        ``environments``: the batch's atomic environments from ``check`` (else built here).
        Raises what pyace raises if any structure of the batch cannot be evaluated."""
        from pyace.activelearning import compute_B_projections

        if not batch:
            return []
        projections, owner = compute_B_projections(self.basis, list(environments or batch),
                                                   return_structure_ind_dict=True)
        index = self.basis.elements_to_index_map
        out = [np.empty(len(atoms)) for atoms in batch]
        own: list[dict[int, np.ndarray]] = [{} for _ in batch]
        for st, proj in projections.items():
            if not len(proj):
                continue
            grade = np.abs(proj @ self.inverse[st]).max(axis=1)
            # pyace lists a species' atoms structure by structure, each in its atom order.
            for s in np.unique(owner[st]):
                rows = owner[st] == s
                mask = np.array([index[e] == st for e in batch[s].get_chemical_symbols()])
                out[s][mask] = grade[rows]
                if with_projections:
                    own[int(s)][int(st)] = proj[rows]
        return list(zip(out, own)) if with_projections else out


def score_batch(scorer: GammaScorer, batch: list, with_projections: bool = False) -> list[Score]:
    """Every structure of ``batch`` checked and scored (one ``Score`` each, same order).
    Structures with unknown elements or that ``scorer.check`` refuses are left out of the
    batched pass; if pyace still fails on the rest, each is scored alone, so that only
    the structure at fault is named."""
    scores = [Score() for _ in batch]
    ready: list[int] = []
    environments: list[Any] = []
    for k, atoms in enumerate(batch):
        scores[k].unknown = scorer.unknown(atoms)
        if not scores[k].unknown:
            env, scores[k].problem = scorer.check(atoms)
            if scores[k].problem is None:
                ready.append(k)
                environments.append(env)
    try:
        grades = _grades(scorer, [batch[k] for k in ready], environments, with_projections)
    except JobStopped:  # a cancelled select ends now, not after scoring on
        raise
    except Exception:  # pyace raises what its C++ meets: find the structure at fault
        grades = []
        for k, env in zip(ready, environments):
            try:
                grades.extend(_grades(scorer, [batch[k]], [env], with_projections))
            except JobStopped:
                raise
            except Exception as exc:
                grades.append(None)
                scores[k].problem = f"scoring failed ({one_line(exc)[:160]})"
    for k, grade in zip(ready, grades):
        if grade is None:
            continue
        g, projections = grade
        if not np.all(np.isfinite(g)):
            scores[k].problem = "its extrapolation grade is not finite"
        else:
            scores[k].gamma, scores[k].projections = g, projections
    return scores


def _grades(scorer: GammaScorer, batch: list, environments: list, with_projections: bool) -> list:
    """(gamma, projections or None) per structure: stand-in scorers of tests know only gammas."""
    if with_projections:
        return scorer.gammas(batch, with_projections=True, environments=environments)
    return [(g, None) for g in scorer.gammas(batch, environments=environments)]
