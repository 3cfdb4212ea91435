"""Structure rows: labelled structures in, candidates and their labels, selections.

Structure rows are ordinary ASE rows: energy and forces as single-point
results, ``status`` and ``config_type`` as key-value pairs, an optional
per-atom ``force_mask`` in ``data``.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from autopipec_hpc.errors import ImportDataError
from autopipec_hpc.frames import carried_labels, labels_of, read_frames
from autopipec_hpc.states import StructureStatus
from autopipec_hpc.store.database import Database, _clean_value, delete_rows, is_url
from autopipec_hpc.store.sqlite_rows import config_label, index_row_ids, key_values_of, update_key_values

# The marker row of a `select` run (active/selection.py): a record written with the rows it changed.
SELECTION_RECORD = "selection"
# The claim of a selection in flight (active/selection_claim.py): written under the records'
# lock before anything is scored or submitted, deleted in the transaction that commits.
SELECTION_CLAIM = "selection-claim"
# What a labeller writes on the row it claimed (LABELLING), and why a label failed.
# Who holds a LABELLING row: a process (host:pid), and for a label job array's task its job
# id and label folder, so the login side can ask the scheduler whether that task ended.
LABEL_CLAIM_KEYS = ("label_claimed_by", "label_claimed_at", "label_job", "label_folder")
LABEL_ERROR_KEY = "label_error"
# Times a row's labeller died while computing it (a task killed: out of memory, a crash of
# the code, a node lost). A row that kills its task every time would otherwise go back to
# DFT_REQUESTED and cost a task in every rerun and every loop generation, for ever.
LABEL_DEATHS_KEY = "label_deaths"
MAX_LABEL_DEATHS = 2
MAX_LABEL_LENGTH = 200
_LABEL_WORDS = {"energy": "an energy", "forces": "forces"}
_STATUS_WORD = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


def check_label(value: str, where: str) -> str:
    """A label (config_type) as files carry it: any printable text, unicode, quotes and
    shell characters included. Control characters (newline, tab, carriage return, ...)
    would break the Extended XYZ comment line and are refused, as are absurd lengths."""
    text = str(value)
    bad = next((ch for ch in text if unicodedata.category(ch) in ("Cc", "Cs")), None)
    if bad is not None:
        raise ImportDataError(f"{where}: config_type {text[:40]!r} holds the control character {bad!r}")
    if len(text) > MAX_LABEL_LENGTH:
        raise ImportDataError(f"{where}: config_type is {len(text)} characters long (at most {MAX_LABEL_LENGTH})")
    if not text.strip():
        raise ImportDataError(f"{where}: config_type is empty")
    return text


def check_status_word(status: str) -> str:
    if not _STATUS_WORD.match(str(status)):
        raise ImportDataError(f"status {str(status)!r} must be one word of letters, digits and '_' (e.g. TRAINING_READY)")
    return str(status)


def label_key(label: str, data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The key-value form of a label, and the row's data. ase.db refuses text that reads
    as a number or a bool ("1234", "3.5", "True"): such a label is kept exactly in the
    row's data and shown quoted as its key, so `ase db` still lists it."""
    try:
        float(label)
        storable = False
    except ValueError:
        storable = label not in ("True", "False")
    if storable:
        return label, data
    return f"'{label}'", {**data, "config_type": label}


def label_of(row) -> str:
    """The exact label of a structure row (see ``label_key``)."""
    return config_label(row.key_value_pairs, row.data)


class ReadyStructures:
    """A re-iterable view of the ready rows: each ``iter`` is a fresh streaming query."""

    def __init__(self, db: StructureRows, status: str, level: str | None = None) -> None:
        self._db = db
        self._status = status
        self._level = level  # only rows of this level of theory (or of none recorded): levels.py

    def __iter__(self) -> Iterator[Atoms]:
        return self._db.iter_structures(self._status, level=self._level)

    def __len__(self) -> int:
        if self._level is None:
            return self._db.count(status=self._status)
        return sum(1 for row in self._db.iter_rows(status=self._status) if _at_level(row, self._level))


def _at_level(row, level: str | None) -> bool:
    """Whether ``row`` belongs in a training set restricted to ``level`` (NAME#HASH)."""
    name = row.get("labeller")
    return level is None or name is None or f"{name}#{row.get('labeller_hash', '')}" == level


# Keys the pipeline writes on structure rows; provenance never overwrites them.
PIPELINE_KEYS = frozenset({
    "status", "config_type", "source", "frame", "generation", "split", "record",
    "gamma_max", "gamma_mean", "scored_by_generation", "selected_by_generation", "labelled_by",
    "labeller", "labeller_code", "labeller_version", "labeller_hash", "label_retries",
    *LABEL_CLAIM_KEYS, LABEL_ERROR_KEY, LABEL_DEATHS_KEY,
})


def provenance_of(info: dict[str, Any]) -> dict[str, Any]:
    """The scalar entries of a frame's ``info`` that can be ase.db key-value pairs
    (a valid, unreserved key that the pipeline does not own; bool/int/float/str)."""
    from ase.db.core import reserved_keys, word

    kept: dict[str, Any] = {}
    for key, value in info.items():
        if key in PIPELINE_KEYS or key in reserved_keys or not word.match(str(key)):
            continue
        if isinstance(value, (bool, int, float, str, np.integer, np.floating, np.bool_)):
            clean = _clean_value(value.item() if isinstance(value, np.generic) else value)
            if clean is not None:
                kept[str(key)] = clean
    return kept


def _check_frames(paths: Sequence[str | Path], config_type: str | None,
                  check: Callable[[Atoms, str], object]) -> None:
    """An import's first pass: every frame of every file checked (its label, then
    ``check``), a file with no frame named; nothing is held but the frame at hand."""
    for path in paths:
        frames = 0
        for index, atoms in read_frames(path):
            where = f"{path}: frame {index}"
            check_label(config_type or str(atoms.info.get("config_type", "default")), where)
            check(atoms, where)
            frames += 1
        if frames == 0:
            raise ImportDataError(f"{path}: holds no structures; nothing was imported")


def _refuse_labels(atoms: Atoms, where: str) -> None:
    carried = carried_labels(atoms)
    if carried:
        raise ImportDataError(
            f"{where} carries {' and '.join(_LABEL_WORDS[k] for k in carried)}, which a CANDIDATE "
            "row does not keep (`label` labels it): if they are DFT labels, import with "
            "--status TRAINING_READY; if they are a model's, write the frames without them; "
            "nothing was imported"
        )


class StructureRows(Database):
    # -- structures ---------------------------------------------------------
    def import_files(
        self,
        paths: Sequence[str | Path],
        status: str = StructureStatus.TRAINING_READY,
        config_type: str | None = None,
    ) -> int:
        """Add every frame of ``paths``; all or nothing.

        Every frame is checked before the first row is written, and the rows are
        written in one transaction, so a refused file leaves the database as it was.
        CANDIDATE frames need no labels (``import_candidates``).
        """
        check_status_word(status)
        if config_type is not None:
            check_label(config_type, "--config-type")
        if str(status) == StructureStatus.CANDIDATE:
            return self.import_candidates(paths, config_type)
        _check_frames(paths, config_type, lambda atoms, where: labels_of(atoms, where))
        count = 0
        with self._transaction() as db:
            for path in paths:
                for index, atoms in read_frames(path):
                    energy, forces = labels_of(atoms, f"{path}: frame {index}")
                    ctype = config_type or str(atoms.info.get("config_type", "default"))
                    row_atoms = Atoms(
                        numbers=atoms.numbers,
                        positions=atoms.positions,
                        cell=atoms.cell,
                        pbc=atoms.pbc,
                    )
                    row_atoms.calc = SinglePointCalculator(row_atoms, energy=energy, forces=forces)
                    data = {}
                    if "force_mask" in atoms.arrays:
                        data["force_mask"] = np.asarray(atoms.arrays["force_mask"], dtype=np.int8)
                    key, data = label_key(ctype, data)
                    db.write(
                        row_atoms,
                        status=str(status),
                        config_type=key,
                        source=Path(path).name,
                        frame=index,
                        data=data,
                    )
                    count += 1
        return count

    def add_structure(
        self,
        atoms: Atoms,
        energy: float,
        forces: np.ndarray,
        config_type: str,
        status: str = StructureStatus.TRAINING_READY,
        force_mask: np.ndarray | None = None,
    ) -> int:
        """Write one labelled structure. Energies and forces are stored as given, even
        bad ones: the dataset stage is where they are judged, and it names the row at
        fault. The label must be one a file can carry (``check_label``)."""
        check_label(config_type, "structure")
        check_status_word(status)
        row_atoms = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        row_atoms.calc = SinglePointCalculator(row_atoms, energy=energy, forces=forces)
        data = {} if force_mask is None else {"force_mask": np.asarray(force_mask, dtype=np.int8)}
        key, data = label_key(config_type, data)
        return self._db.write(row_atoms, status=str(status), config_type=key, data=data)

    # -- active learning: candidates, scores, labels ----------------------------
    def import_candidates(self, paths: Sequence[str | Path], config_type: str | None = None) -> int:
        """Add every frame of ``paths`` as an unlabelled CANDIDATE row; all or nothing.

        Two passes over the files, as ``import_files``: every frame is checked, then the
        rows are written in one transaction; no more than one frame is held at a time.
        Each frame's ``config_type`` and its other scalar ``info`` entries (provenance:
        the generator, MD step, temperature...) become key-value pairs.

        A frame that carries an energy or forces is refused: they are DFT labels (then
        TRAINING_READY is the status, and dropping them would waste that DFT) or a model's
        predictions (then keeping them as the row's labels would pass them off as DFT).
        Only the user knows which.
        """
        _check_frames(paths, config_type, _refuse_labels)
        count = 0
        with self._transaction() as db:
            for path in paths:
                for index, atoms in read_frames(path):
                    ctype = config_type or str(atoms.info.get("config_type", "default"))
                    self._write_candidate(db, atoms, ctype, provenance_of(atoms.info), source=Path(path).name,
                                          frame=index)
                    count += 1
        return count

    def add_candidate(self, atoms: Atoms, config_type: str, **provenance: Any) -> int:
        """Write one unlabelled structure as a CANDIDATE row."""
        return self._write_candidate(self._db, atoms, config_type, provenance_of(provenance))

    @staticmethod
    def _write_candidate(db, atoms: Atoms, config_type: str, provenance: dict[str, Any], **extra: Any) -> int:
        row_atoms = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        key, data = label_key(config_type, {})
        return db.write(
            row_atoms, status=StructureStatus.CANDIDATE.value, config_type=key, data=data, **provenance, **extra
        )

    def update_rows(self, updates: Sequence[tuple[int, dict[str, Any]]]) -> None:
        """Key-value updates of several rows in one transaction (on SQLite, with ase's key
        tables indexed by row first, ``sqlite_rows.index_row_ids``, and written in a few
        statements, ``sqlite_rows.update_key_values``)."""
        cleaned = [(int(row_id), {k: c for k, v in values.items() if (c := _clean_value(v)) is not None})
                   for row_id, values in updates]
        if cleaned and not is_url(self.target):
            index_row_ids(Path(self.target))
            with self._transaction() as db:
                return update_key_values(db, cleaned)  # ase.db's update, many rows at once
        with self._transaction() as db:
            for row_id, values in cleaned:
                db.update(row_id, **values)

    def set_labels(self, row_id: int, energy: float, forces: np.ndarray, status: str,
                   stress: np.ndarray | None = None, **values: Any) -> None:
        """Store a row's labels and new status; the row keeps its id, unique_id,
        key-value pairs and data (ase.db's ``update(atoms=...)`` would draw a new unique_id)."""
        from ase.db.row import AtomsRow

        old = self._db.get(id=int(row_id))
        atoms = old.toatoms()
        extra = {} if stress is None else {"stress": np.asarray(stress, dtype=float)}
        atoms.calc = SinglePointCalculator(atoms, energy=float(energy), forces=np.asarray(forces, dtype=float),
                                           **extra)
        # A labelled row no longer has a claimant or an error.
        kvp = {k: v for k, v in old.key_value_pairs.items() if k not in (*LABEL_CLAIM_KEYS, LABEL_ERROR_KEY)}
        kvp.update({k: _clean_value(v) for k, v in values.items() if _clean_value(v) is not None})
        kvp["status"] = str(status)
        row = AtomsRow(atoms)
        row._data = old._data
        row.__dict__.update(kvp)
        row._keys = list(kvp)
        row.ctime = old.ctime
        row.user = old.user
        row.id = old.id
        row.unique_id = old.unique_id
        data = dict(old.data) if old.get("data") else None
        with self._transaction() as db:
            db._write(row, kvp, data or None, old.id)

    def commit_selection(self, generation: int, row_ids: Sequence[int], values: dict[str, Any],
                         data: dict[str, Any], claim_row: int | None = None) -> int:
        """In one transaction: the chosen CANDIDATE rows become DFT_REQUESTED (any other
        row is left alone), a ``record=selection`` row records the step and the selection's
        claim row ``claim_row`` is deleted; returns how many rows changed status."""
        clean = {k: _clean_value(v) for k, v in values.items()}
        chosen = {"status": StructureStatus.DFT_REQUESTED.value, "selected_by_generation": int(generation)}
        with self._transaction() as db:
            if claim_row is not None:
                delete_rows(db, [int(claim_row)])
            if is_url(self.target):
                current = {int(i): db.get(id=int(i)).key_value_pairs for i in row_ids}
            else:
                current = key_values_of(db, list(row_ids))
            changed = [int(i) for i in row_ids if current.get(int(i), {}).get("status") == StructureStatus.CANDIDATE]
            if is_url(self.target):
                for row_id in changed:
                    db.update(row_id, **chosen)
            else:
                update_key_values(db, [(row_id, chosen) for row_id in changed])
            db.write(Atoms(), record=SELECTION_RECORD, generation=int(generation), updated=time.time(),
                     data=data, **{k: v for k, v in clean.items() if v is not None})
        return len(changed)

    # -- claims: a selection in flight, a row being labelled ------------------------
    # Each is decided by the caller under the records' lock (``DatabaseManager.locked``).
    def selection_claims(self, generation: int | None = None) -> list[Any]:
        selection: dict[str, Any] = {"record": SELECTION_CLAIM}
        if generation is not None:
            selection["generation"] = int(generation)
        with self._transaction():
            return list(self._db.select(sort="id", **selection))

    def write_selection_claim(self, generation: int, values: dict[str, Any]) -> int:
        clean = {k: _clean_value(v) for k, v in values.items()}
        return self._db.write(Atoms(), record=SELECTION_CLAIM, generation=int(generation),
                              **{k: v for k, v in clean.items() if v is not None})

    def update_selection_claim(self, row_id: int, **values: Any) -> None:
        clean = {k: _clean_value(v) for k, v in values.items()}
        self._db.update(int(row_id), **{k: v for k, v in clean.items() if v is not None})

    def drop_selection_claim(self, row_id: int) -> None:
        with self._transaction() as db:
            delete_rows(db, [int(row_id)])

    def claim_label(self, row_id: int, claimant: str, **holder: Any) -> bool:
        """Make a DFT_REQUESTED row LABELLING, held by ``claimant`` (and ``holder``: its
        ``label_job`` and ``label_folder``); False if it is not DFT_REQUESTED (labelled, or
        claimed, by another)."""
        with self._transaction() as db:
            if db.get(id=int(row_id)).get("status") != StructureStatus.DFT_REQUESTED:
                return False
            extra = {k: _clean_value(v) for k, v in holder.items() if k in LABEL_CLAIM_KEYS}
            db.update(int(row_id), status=StructureStatus.LABELLING.value, label_claimed_by=claimant,
                      label_claimed_at=time.time(), **extra)
            return True

    def fail_label(self, row_id: int, error: str, **values: Any) -> bool:
        """A LABELLING row given up: LABEL_FAILED with its one-line reason (and ``values``:
        the labeller that failed); False if the row is not LABELLING (nothing changed)."""
        with self._transaction() as db:
            if db.get(id=int(row_id)).get("status") != StructureStatus.LABELLING:
                return False
            clean = {k: _clean_value(v) for k, v in values.items()}
            db.update(int(row_id), delete_keys=list(LABEL_CLAIM_KEYS), status=StructureStatus.LABEL_FAILED.value,
                      **{LABEL_ERROR_KEY: error[:500]}, **{k: v for k, v in clean.items() if v is not None})
            return True

    def retry_failed_labels(self) -> list[int]:
        """Every LABEL_FAILED row back to DFT_REQUESTED (its ``label_retries`` counted, its
        last error kept until it is labelled), in one transaction; their ids."""
        ids = [row.id for row in self._select_paged(status=StructureStatus.LABEL_FAILED.value)]
        with self._transaction() as db:
            for row_id in ids:
                retries = int(db.get(id=row_id).get("label_retries", 0))
                db.update(row_id, delete_keys=[LABEL_DEATHS_KEY], status=StructureStatus.DFT_REQUESTED.value,
                          label_retries=retries + 1)
        return ids

    def release_label(self, row_id: int, error: str | None = None, died: bool = False) -> StructureStatus | None:
        """A LABELLING row back to DFT_REQUESTED, with why its label failed (if it did).
        ``died``: its labeller died while computing it; the MAX_LABEL_DEATHS-th such death
        makes it LABEL_FAILED (``LabelTaskDied``) instead. The row's new status, or None
        where it was not LABELLING (nothing changed)."""
        with self._transaction() as db:
            row = db.get(id=int(row_id))
            if row.get("status") != StructureStatus.LABELLING:
                return None
            deaths = int(row.get(LABEL_DEATHS_KEY, 0)) + 1 if died else int(row.get(LABEL_DEATHS_KEY, 0))
            if died and deaths >= MAX_LABEL_DEATHS:
                reason = (f"LabelTaskDied: its labeller died while computing it {deaths} times (last: {error}); "
                          "not tried again: `label --retry-failed` tries it once more")
                db.update(int(row_id), delete_keys=list(LABEL_CLAIM_KEYS), status=StructureStatus.LABEL_FAILED.value,
                          **{LABEL_ERROR_KEY: reason[:500], LABEL_DEATHS_KEY: deaths})
                return StructureStatus.LABEL_FAILED
            extra = {LABEL_ERROR_KEY: error[:500]} if error else {}
            if died:
                extra[LABEL_DEATHS_KEY] = deaths
            db.update(int(row_id), delete_keys=list(LABEL_CLAIM_KEYS), status=StructureStatus.DFT_REQUESTED.value,
                      **extra)
            return StructureStatus.DFT_REQUESTED

    def ready_structures(self, status: str = StructureStatus.TRAINING_READY, level: str | None = None
                         ) -> "ReadyStructures":
        return ReadyStructures(self, status, level)

    def iter_structures(self, status: str = StructureStatus.TRAINING_READY, level: str | None = None
                        ) -> Iterator[Atoms]:
        """Stream the rows with ``status``, as Atoms carrying their labels.

        ``info`` holds ``db_id`` and ``config_type``; the calculator holds the
        DFT energy and forces (``None`` where a row lacks them); a force mask
        is in ``arrays['force_mask']``.
        """
        for row in self._select_paged(status=str(status)):
            if not _at_level(row, level):
                continue
            atoms = Atoms(numbers=row.numbers, positions=row.positions, cell=row.cell, pbc=row.pbc)
            energy = row.get("energy")
            forces = row.get("forces")
            atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
            atoms.info["db_id"] = row.id
            atoms.info["unique_id"] = row.unique_id
            atoms.info["config_type"] = label_of(row)
            # The side a row was given when a generation used it ("train"/"test"), kept
            # for good; and whether active learning chose it for labelling.
            if row.get("split") in ("train", "test"):
                atoms.info["split"] = row.get("split")
            if row.get("selected_by_generation") is not None:
                atoms.info["selected_by_generation"] = int(row.get("selected_by_generation"))
            mask = row.data.get("force_mask") if row.data else None
            if mask is not None:
                atoms.arrays["force_mask"] = np.asarray(mask)
            yield atoms

    def mark_used(self, generation: int, train_ids: Sequence[int], test_ids: Sequence[int]) -> None:
        """Record which generation trained (or tested) on each structure, in one transaction."""
        with self._transaction() as db:
            for ids, split in ((train_ids, "train"), (test_ids, "test")):
                for row_id in ids:
                    db.update(int(row_id), generation=int(generation), split=split)
