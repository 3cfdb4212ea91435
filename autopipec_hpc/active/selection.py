"""Active learning: score candidates by extrapolation grade, choose what to label, label it.

``select_candidates`` reads the CANDIDATE rows a page at a time, computes each
one's extrapolation grade gamma (per atom, with generation N's published ACE
potential and its active set ``potential.asi``: ``PyACECalculator`` +
``set_active_set``'s values, a batch at a time, ``gamma.py``), writes ``gamma_max``, ``gamma_mean`` and
``scored_by_generation`` on every scored row, and chooses at most M of those with
``gamma_max > gamma_min`` by D-optimality together with the existing active set,
with pacemaker's own MaxVol selection (``pyace.aceselect.select_structures_maxvol``,
the body of ``pace_select``). The choice is made chunk by chunk (up to 1,000
candidates above gamma_min plus the ones chosen so far), so memory follows the chunk
and M, never the pool. ``--strategy random`` is the baseline: uniform among every scorable
candidate, gamma_min or not. A budget in atoms (``max_atoms``) takes the chosen in their
order (highest gamma first for D-optimal, by key otherwise) and stops before the
atoms would exceed it. One selection per generation: it holds a claim
(``selection_claim.py``) from before it scores until its commit. Chosen rows become DFT_REQUESTED; ``label_requested`` labels them
with any ASE calculator and makes them TRAINING_READY. These are the only status
changes either makes: CANDIDATE -> DFT_REQUESTED -> TRAINING_READY.

What to select is one ``SelectionRequest`` (``selection_folder.py``), checked when it is
made; the database is a ``DatabaseManager`` the caller opened. On a SLURM site
``run_selection`` submits the selection as one job (``SelectJob``, ``submit_selection``)
and waits for its summary (``wait_for_selection``).
"""

from __future__ import annotations

import heapq
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from autopipec_hpc import registry
from autopipec_hpc.states import RecordState, Strategy, StructureStatus
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.errors import SelectionError, one_line
from autopipec_hpc.files import atomic_write_text, fresh_dir
from autopipec_hpc.processes import final_commit
from autopipec_hpc.active.selection_claim import SelectionClaim, beat, claim_selection, held, release
from autopipec_hpc.active.selection_folder import SelectionFolder, SelectionRequest, default_selection_dir
from autopipec_hpc.active.gamma import GammaScorer, score_batch

log = logging.getLogger(__name__)

# pacemaker's customary thresholds: above 5 a structure is extrapolative, above 25 unreliable.
GAMMA_WRITE = registry.GAMMA_WRITE
GAMMA_STOP = registry.GAMMA_STOP


class ConfigTypeSummary(BaseModel):
    """One config_type's line of a selection summary (``selection.json``'s ``by_config_type``)."""

    model_config = ConfigDict(frozen=True)

    scored: int
    above_gamma_min: int
    above_5: int
    selected: int
    selected_atoms: int = 0  # DFT cost follows atoms, not structures
    gamma_max_median: float | None  # None: nothing of this type was scored
    gamma_max_max: float | None


class SelectionResult(BaseModel):
    """The summary of one selection, as ``selection.json`` holds it."""

    generation: int
    strategy: Strategy
    max_select: int
    max_atoms: int | None = None  # the budget in atoms, if one was given
    gamma_min: float
    folder: str
    scored: int
    above: int
    selected_ids: list[int]
    selected_atoms: int = 0  # atoms in the selected structures: what labelling them costs
    skipped: dict[int, list[str]]  # row id -> elements the potential does not know
    unusable: dict[int, str] = {}  # row id -> why it cannot be scored (overlapping atoms, NaN, ...)
    by_config_type: dict[str, ConfigTypeSummary]
    histograms: list[str]

    @property
    def share_above_5(self) -> float:
        n = sum(c.scored for c in self.by_config_type.values())
        return sum(c.above_5 for c in self.by_config_type.values()) / n if n else 0.0

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str) -> "SelectionResult":
        return cls.model_validate_json(text)  # JSON's string keys of ``skipped`` become ints


@dataclass
class _Tally:
    """A config_type's counts while the candidates stream by."""

    scored: int = 0
    above: int = 0
    above_5: int = 0
    selected: int = 0
    selected_atoms: int = 0
    gamma_max: list[float] = field(default_factory=list)  # per structure, for the histogram

    def summary(self) -> ConfigTypeSummary:
        g = np.asarray(self.gamma_max)
        return ConfigTypeSummary(scored=self.scored, above_gamma_min=self.above, above_5=self.above_5,
                                 selected=self.selected, selected_atoms=self.selected_atoms,
                                 gamma_max_median=float(np.median(g)) if g.size else None,
                                 gamma_max_max=float(np.max(g)) if g.size else None)


def published_potential(db: DatabaseManager, generation: int) -> Path:
    """The published folder of ``generation``, with its active set; SelectionError if none."""
    record = db.get_record(generation)
    if record is None:
        raise SelectionError(f"generation {generation}: no training record in {db.target}")
    if record.status != RecordState.SUCCEEDED or record.potential_path is None:
        raise SelectionError(f"generation {generation} has no published potential (record {record.status})")
    folder = Path(record.potential_path)
    for name in (registry.POTENTIAL_YAML, registry.ACTIVE_SET, registry.MANIFEST):
        if not (folder / name).exists():
            raise SelectionError(f"generation {generation}: {folder / name} is missing; cannot score candidates")
    return folder


def _batches(rows: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class _DOptimalChooser:
    """At most M structures by D-optimality with the existing active set, chunk by chunk:
    each chunk is offered to pace_select's MaxVol (``compute_active_set``, with the same
    tolerance, iterations and ranking as ``select_structures_maxvol``) together with the
    structures kept so far, on the B-projections the scorer already computed: pace_select's
    own path would compute every candidate's projections a second time."""

    TOLERANCE = 1.01  # select_structures_maxvol's gamma_tolerance
    MAXVOL_ITERS = 300
    # Candidates (above gamma_min) per MaxVol pass: each pass costs about as much as one over
    # the whole pool, so few passes matter more than their size; the B-projections of 1,000
    # candidates of ~30 atoms and 100 functions are ~25 MB, and memory follows this, not the pool.
    CHUNK = 1000

    def __init__(self, folder: Path, max_select: int) -> None:
        from pyace.activelearning import compute_A_active_inverse, load_active_inverse_set

        try:
            self.extra = compute_A_active_inverse(load_active_inverse_set(str(folder / registry.ACTIVE_SET)))
        except Exception as exc:
            raise SelectionError(f"{folder}: its active set cannot be read ({one_line(exc)[:160]})") from None
        self.max_select = max_select
        # (row id, atoms, max gamma, {species type: B-projections})
        self.kept: list[tuple[int, int, float, dict[int, np.ndarray]]] = []
        self.pending: list[tuple[int, int, float, dict[int, np.ndarray]]] = []

    def offer(self, chunk: list[tuple[int, int, float, dict[int, np.ndarray]]]) -> None:
        """Take ``chunk``'s candidates; MaxVol runs once CHUNK of them wait (and at the end)."""
        self.pending.extend(chunk)
        if len(self.pending) >= self.CHUNK:
            self._reduce()

    def _reduce(self) -> None:
        from collections import Counter

        from pyace.activelearning import compute_active_set

        pool, self.pending = self.kept + self.pending, []
        if not pool:
            return
        projections, owner = {}, {}
        for st, active in self.extra.items():
            mine = [(k, p[3][st]) for k, p in enumerate(pool) if st in p[3]]
            projections[st] = np.vstack([rows for _, rows in mine]) if mine else np.empty((0, active.shape[1]))
            owner[st] = np.concatenate([np.full(len(rows), k) for k, rows in mine]) if mine else np.empty(0)
        _, chosen_by_species = compute_active_set(
            projections, owner, tol=self.TOLERANCE, max_iters=self.MAXVOL_ITERS,
            extra_A0_projections_dict={st: a.copy() for st, a in self.extra.items()})
        # pace_select's ranking: structures by how many active-set rows they hold (-1: the old set).
        count: Counter = Counter()
        for chosen in chosen_by_species.values():
            count.update(chosen)
        order = [int(k) for k, _ in count.most_common() if k != -1][: self.max_select]
        self.kept = [pool[k] for k in order]

    def ranked(self) -> list[tuple[int, int]]:
        """(row id, atoms) of the structures kept, the most extrapolative first: the order
        an atoms budget takes them in."""
        if self.pending:
            self._reduce()
        return [(row_id, n) for row_id, n, _, _ in sorted(self.kept, key=lambda k: (-k[2], k[0]))]


def within_atoms(ranked: list[tuple[int, int]], max_atoms: int | None) -> list[int]:
    """The ids of ``ranked`` (row id, atoms; best first) up to the first that would take the
    atoms past ``max_atoms``: the selection stops before its atoms budget is exceeded."""
    chosen, atoms = [], 0
    for row_id, n in ranked:
        if max_atoms is not None and atoms + n > max_atoms:
            break
        chosen.append(row_id)
        atoms += n
    return chosen


def select_candidates(
    db: DatabaseManager,
    request: SelectionRequest,
    notify: Callable[[str], None] | None = None,
    folder_made: SelectionFolder | None = None,
    claim: SelectionClaim | None = None,
) -> SelectionResult:
    """Score every CANDIDATE row with generation ``request.generation``'s potential and choose
    at most ``request.max_select`` (and ``request.max_atoms`` atoms) for labelling (module
    docstring). Writes gamma on every scored row, the chosen rows' DFT_REQUESTED and a
    ``record=selection`` row; a summary and one figure of the gammas go to a new folder
    ``request.out_dir`` (default: ``<output>/selections/gen-N``), or into ``folder_made``,
    the folder a submitted select job was given.

    The selection holds ``claim`` (``selection_claim.py``; taken here when none is given)
    from start to commit: ClaimError while another selection of the generation is in flight
    or once it was selected (``request.again`` selects again). A failure gives the claim up."""
    published_potential(db, request.generation)  # a missing potential is named before any claim
    own = claim is None
    if claim is None:
        claim = claim_selection(db, request.generation, again=request.again)
    try:
        return _select(db, request, claim, notify, folder_made)
    except BaseException:
        if own:
            release(db, claim)
        raise


def _select(db: DatabaseManager, request: SelectionRequest, claim: SelectionClaim,
            notify: Callable[[str], None] | None, folder_made: SelectionFolder | None) -> SelectionResult:
    generation, max_select, gamma_min, strategy = (request.generation, request.max_select,
                                                   request.gamma_min, request.strategy)
    folder = published_potential(db, generation)
    say = notify or (lambda message: None)
    scorer = GammaScorer(folder)
    chooser = _DOptimalChooser(folder, max_select) if strategy == Strategy.D_OPTIMAL else None
    rng = np.random.default_rng(request.seed)
    heap: list[tuple[float, int, int]] = []  # (top-gamma or random key, row id, atoms)
    summary: dict[str, _Tally] = defaultdict(_Tally)
    skipped: dict[int, list[str]] = {}
    unusable: dict[int, str] = {}
    scored = above = 0
    labels: dict[int, str] = {}
    for rows in _batches(db.iter_structure_rows(StructureStatus.CANDIDATE), request.batch):
        updates, chunk = [], []
        # One batched pass per batch (gamma.py); one row that cannot be scored never ends the step.
        scores = score_batch(scorer, [row.atoms for row in rows], with_projections=chooser is not None)
        for row, score in zip(rows, scores):
            if score.unknown:
                skipped[row.id] = score.unknown
                continue
            if score.problem is not None:
                log.warning("candidate id=%s (%s) skipped: %s", row.id, row.label, score.problem)
                unusable[row.id] = score.problem
                continue
            g = score.gamma
            gmax, gmean = float(g.max()), float(g.mean())
            s = summary[row.label]
            s.scored += 1
            s.gamma_max.append(gmax)
            s.above_5 += gmax > GAMMA_WRITE
            updates.append((row.id, {"gamma_max": gmax, "gamma_mean": gmean, "scored_by_generation": generation}))
            scored += 1
            # The random baseline draws among every scorable candidate, as users expect of
            # "random": gamma_min is a filter of the gamma strategies only.
            if gmax > gamma_min:
                s.above += 1
                above += 1
            elif strategy != Strategy.RANDOM:
                continue
            labels[row.id] = row.label  # of a structure that may be chosen
            if chooser is not None:
                chunk.append((row.id, len(row.atoms), gmax, score.projections))
            else:
                key = gmax if strategy == Strategy.TOP_GAMMA else float(rng.random())
                # The best keys, as many as could ever be chosen (an atoms budget takes a prefix).
                item = (key, row.id, len(row.atoms))
                if len(heap) < max_select:
                    heapq.heappush(heap, item)
                else:
                    heapq.heappushpop(heap, item)
        db.update_rows(updates)
        beat(db, claim)
        if chooser is not None and chunk:
            chooser.offer(chunk)
        say(f"scored {scored} candidates ({above} with gamma > {gamma_min:g})")
    ranked = chooser.ranked() if chooser is not None else [(row_id, n) for _, row_id, n in sorted(heap, reverse=True)]
    chosen = within_atoms(ranked, request.max_atoms)
    atoms_of = dict(ranked)
    for row_id in chosen:
        tally = summary[labels[row_id]]
        tally.selected += 1
        tally.selected_atoms += atoms_of[row_id]
    selected_atoms = sum(atoms_of[row_id] for row_id in chosen)
    out = folder_made.path if folder_made else fresh_dir(request.out_dir or
                                                         default_selection_dir(folder.parent.parent, generation))
    histograms = _histogram(summary, SelectionFolder(out), generation, gamma_min)
    result = SelectionResult(
        generation=generation, strategy=strategy, max_select=max_select, max_atoms=request.max_atoms,
        gamma_min=gamma_min, folder=str(out), scored=scored, above=above, selected_ids=sorted(chosen),
        selected_atoms=selected_atoms, skipped=skipped, unusable=unusable,
        by_config_type={ct: s.summary() for ct, s in sorted(summary.items())}, histograms=histograms,
    )
    with db.locked():  # the claim is checked and dropped in the commit's own transaction
        held(db, claim)
        final_commit(f"committing the selection of generation {generation}")  # a stopped select job commits nothing
        db.commit_selection(
            generation, chosen,
            values={"strategy": str(strategy), "n_scored": scored, "n_above": above, "n_selected": len(chosen),
                    "n_selected_atoms": selected_atoms, "gamma_min": gamma_min, "max_select": max_select,
                    "max_atoms": request.max_atoms, "folder": str(out)},
            data={"selected_ids": sorted(chosen), "skipped": {str(k): v for k, v in skipped.items()},
                  "unusable": {str(k): v for k, v in unusable.items()},
                  "by_config_type": {ct: c.model_dump() for ct, c in result.by_config_type.items()}},
            claim_row=claim.row_id,
        )
    # Written after the commit, so that a summary always tells of a selection that happened.
    atomic_write_text(SelectionFolder(out).summary_file, result.to_json())
    return result


def _histogram(summary: dict[str, _Tally], folder: SelectionFolder, generation: int, gamma_min: float) -> list[str]:
    """One figure of every config_type's max-gamma histogram (gamma_figure.py)."""
    from autopipec_hpc.active.gamma_figure import write_gamma_figure

    rows = [(f"{ct} ({s.scored} scored, {s.selected} selected)", np.asarray(s.gamma_max))
            for ct, s in sorted(summary.items()) if s.gamma_max]
    written = write_gamma_figure(
        folder.histogram_file, rows, f"generation {generation}: candidates per max gamma",
        [(gamma_min, "gamma_min"), (GAMMA_WRITE, "extrapolating"), (GAMMA_STOP, "stop")])
    return [folder.histogram_file.name] if written else []
