"""Active learning: score candidates by extrapolation grade, choose what to label, label it.

``select_candidates`` reads the CANDIDATE rows a page at a time, computes each
one's extrapolation grade gamma (per atom, with generation N's published ACE
potential and its active set ``potential.asi``: exactly ``PyACECalculator`` +
``set_active_set``), writes ``gamma_max``, ``gamma_mean`` and
``scored_by_generation`` on every scored row, and chooses at most M of those with
``gamma_max > gamma_min`` by D-optimality together with the existing active set,
with pacemaker's own MaxVol selection (``pyace.aceselect.select_structures_maxvol``,
the body of ``pace_select``). The choice is made chunk by chunk (the chunk's
candidates plus the ones chosen so far), so memory follows the chunk and M,
never the pool. Chosen rows become DFT_REQUESTED; ``label_requested`` labels them
with any ASE calculator and makes them TRAINING_READY. These are the only status
changes either makes: CANDIDATE -> DFT_REQUESTED -> TRAINING_READY.

On a SLURM site ``run_selection`` submits the selection as one job (``SelectJob``,
``submit_selection``) and waits for its summary (``wait_for_selection``); its folder
is named in ``selection_folder.py``.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autopipec_hpc import registry
from autopipec_hpc.states import RecordState, StructureStatus
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.store.structures import label_of
from autopipec_hpc.errors import ConfigError, SelectionError
from autopipec_hpc.files import atomic_write_text, fresh_dir
from autopipec_hpc.active.selection_folder import SelectionFolder, default_selection_dir

log = logging.getLogger(__name__)

STRATEGIES = ("d-optimal", "top-gamma", "random")
# pacemaker's customary thresholds: above 5 a structure is extrapolative, above 25 unreliable.
GAMMA_WRITE = registry.GAMMA_WRITE
GAMMA_STOP = registry.GAMMA_STOP


@dataclass
class ConfigTypeSummary:
    scored: int = 0
    above: int = 0
    above_5: int = 0
    selected: int = 0
    gamma_max: list[float] = field(default_factory=list)  # per structure, for the histogram

    def row(self) -> dict[str, Any]:
        g = np.asarray(self.gamma_max) if self.gamma_max else np.asarray([np.nan])
        return {"scored": self.scored, "above_gamma_min": self.above, "above_5": self.above_5,
                "selected": self.selected, "gamma_max_median": float(np.median(g)),
                "gamma_max_max": float(np.max(g))}


@dataclass
class SelectionResult:
    generation: int
    strategy: str
    max_select: int
    gamma_min: float
    folder: str
    scored: int
    above: int
    selected_ids: list[int]
    skipped: dict[int, list[str]]  # row id -> elements the potential does not know
    by_config_type: dict[str, dict[str, Any]]
    histograms: list[str]

    @property
    def share_above_5(self) -> float:
        n = sum(c["scored"] for c in self.by_config_type.values())
        return sum(c["above_5"] for c in self.by_config_type.values()) / n if n else 0.0


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


def check_selection_args(max_select: int, gamma_min: float, strategy: str, batch: int,
                         max_option: str = "--max") -> None:
    """Refuse bad selection settings by the option the user typed (``loop`` and
    ``demo --loop`` call the budget ``--select``)."""
    if max_select < 1:
        raise ConfigError(f"{max_option} must be at least 1, got {max_select}")
    if not math.isfinite(gamma_min) or gamma_min < 0:
        raise ConfigError(f"--gamma-min must be a finite number >= 0, got {gamma_min}")
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if batch < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch}")


class GammaScorer:
    """Per-atom extrapolation grades of a published potential (ACE part, with its active set)."""

    def __init__(self, folder: Path) -> None:
        from pyace import PyACECalculator

        self.calc = PyACECalculator(str(folder / registry.POTENTIAL_YAML))
        self.calc.set_active_set(str(folder / registry.ACTIVE_SET))
        self.elements = set(registry.read_manifest(folder).elements)

    def unknown(self, atoms) -> list[str]:
        return sorted(set(atoms.get_chemical_symbols()) - self.elements)

    def gamma(self, atoms) -> np.ndarray:
        atoms = atoms.copy()
        atoms.calc = self.calc
        atoms.get_potential_energy()
        return np.asarray(self.calc.results["gamma"], dtype=float)


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
    each chunk is offered to pace_select's MaxVol together with the structures kept so far."""

    def __init__(self, folder: Path, max_select: int) -> None:
        from pyace import BBasisConfiguration
        from pyace.activelearning import compute_A_active_inverse, load_active_inverse_set

        self.bconf = BBasisConfiguration(str(folder / registry.POTENTIAL_YAML))
        self.extra = compute_A_active_inverse(load_active_inverse_set(str(folder / registry.ACTIVE_SET)))
        self.max_select = max_select
        self.kept: list[tuple[int, Any]] = []  # (row id, atoms)

    def offer(self, chunk: list[tuple[int, Any, float]]) -> None:
        import pandas as pd
        from pyace.aceselect import select_structures_maxvol

        pool = self.kept + [(row_id, atoms) for row_id, atoms, _ in chunk]
        if not pool:
            return
        df = pd.DataFrame({"row_id": [p[0] for p in pool], "ase_atoms": [p[1] for p in pool]})
        extra = {st: a.copy() for st, a in self.extra.items()}
        chosen = select_structures_maxvol(df, self.bconf, extra_A0_projections_dict=extra, batch_size_option="none",
                                          max_structures=self.max_select, verbose=False)
        self.kept = [(int(r), a) for r, a in zip(chosen["row_id"], chosen["ase_atoms"])]

    def ids(self) -> list[int]:
        return [row_id for row_id, _ in self.kept]


def select_candidates(
    database: str,
    generation: int,
    max_select: int = 20,
    gamma_min: float = 1.0,
    strategy: str = "d-optimal",
    batch: int = 200,
    seed: int = 0,
    out_dir: str | Path | None = None,
    notify: Callable[[str], None] | None = None,
    folder_made: SelectionFolder | None = None,
) -> SelectionResult:
    """Score every CANDIDATE row with generation ``generation``'s potential and choose at most
    ``max_select`` for labelling (module docstring). Writes gamma on every scored row, the
    chosen rows' DFT_REQUESTED and a ``record=selection`` row; a summary and histograms
    per config_type go to a new folder ``out_dir`` (default: ``<output>/selections/gen-N``),
    or into ``folder_made``, the folder a submitted select job was given."""
    check_selection_args(max_select, gamma_min, strategy, batch)
    db = DatabaseManager(database)
    folder = published_potential(db, generation)
    say = notify or (lambda message: None)
    scorer = GammaScorer(folder)
    chooser = _DOptimalChooser(folder, max_select) if strategy == "d-optimal" else None
    rng = np.random.default_rng(seed)
    heap: list[tuple[float, int]] = []  # top-gamma or random keys
    summary: dict[str, ConfigTypeSummary] = defaultdict(ConfigTypeSummary)
    skipped: dict[int, list[str]] = {}
    scored = above = 0
    for rows in _batches(db.iter_rows(status=StructureStatus.CANDIDATE), batch):
        updates, chunk = [], []
        for row in rows:
            atoms = row.toatoms()
            unknown = scorer.unknown(atoms)
            if unknown:
                skipped[row.id] = unknown
                continue
            g = scorer.gamma(atoms)
            gmax, gmean = float(g.max()), float(g.mean())
            ctype = label_of(row)
            s = summary[ctype]
            s.scored += 1
            s.gamma_max.append(gmax)
            s.above_5 += gmax > GAMMA_WRITE
            updates.append((row.id, {"gamma_max": gmax, "gamma_mean": gmean, "scored_by_generation": generation}))
            scored += 1
            if gmax <= gamma_min:
                continue
            s.above += 1
            above += 1
            if chooser is not None:
                chunk.append((row.id, atoms, gmax))
            else:
                key = gmax if strategy == "top-gamma" else float(rng.random())
                item = (key, row.id)
                if len(heap) < max_select:
                    heapq.heappush(heap, item)
                else:
                    heapq.heappushpop(heap, item)
        db.update_rows(updates)
        if chooser is not None and chunk:
            chooser.offer(chunk)
        say(f"scored {scored} candidates ({above} with gamma > {gamma_min:g})")
    chosen = chooser.ids() if chooser is not None else [row_id for _, row_id in sorted(heap, reverse=True)]
    ctype_of = {}
    for row_id in chosen:
        ctype = str(db.get_row(row_id).get("config_type", "default"))
        ctype_of[row_id] = ctype
        summary[ctype].selected += 1
    out = folder_made.path if folder_made else fresh_dir(Path(out_dir) if out_dir else
                                                         default_selection_dir(folder.parent.parent, generation))
    histograms = _histograms(summary, out, generation, gamma_min)
    result = SelectionResult(
        generation=generation, strategy=strategy, max_select=max_select, gamma_min=gamma_min, folder=str(out),
        scored=scored, above=above, selected_ids=sorted(chosen), skipped=skipped,
        by_config_type={ct: s.row() for ct, s in sorted(summary.items())}, histograms=histograms,
    )
    db.commit_selection(
        generation, chosen,
        values={"strategy": strategy, "n_scored": scored, "n_above": above, "n_selected": len(chosen),
                "gamma_min": gamma_min, "max_select": max_select, "folder": str(out)},
        data={"selected_ids": sorted(chosen), "skipped": {str(k): v for k, v in skipped.items()},
              "by_config_type": result.by_config_type},
    )
    # Written after the commit, so that a summary always tells of a selection that happened.
    atomic_write_text(SelectionFolder(out).summary_file, json.dumps(asdict(result), indent=2))
    return result


def _histograms(summary: dict[str, ConfigTypeSummary], out: Path, generation: int, gamma_min: float) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for ctype, s in sorted(summary.items()):
        if not s.gamma_max:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        g = np.asarray(s.gamma_max)
        bins = np.logspace(np.log10(max(g.min(), 1e-3)), np.log10(max(g.max(), 1e-2) * 1.01), 30)
        ax.hist(g, bins=bins, color="tab:blue")
        ax.set_xscale("log")
        for x, style in ((gamma_min, "--"), (GAMMA_WRITE, ":"), (GAMMA_STOP, "-.")):
            ax.axvline(x, color="k", ls=style, lw=0.8)
        ax.set_xlabel("structure max gamma")
        ax.set_ylabel("candidates")
        ax.set_title(f"generation {generation}: {ctype} ({s.scored} scored, {s.selected} selected)")
        fig.tight_layout()
        name = f"gamma_{re.sub(r'[^A-Za-z0-9_.-]', '_', ctype)}.png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        names.append(name)
    return names


