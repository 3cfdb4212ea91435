"""The ASE database: labelled structures in, training records out.

Structure rows are ordinary ASE rows: energy and forces as single-point
results, ``status`` and ``config_type`` as key-value pairs, an optional
per-atom ``force_mask`` in ``data``. Training records are rows too (with no
atoms and ``record=training``), so ``ase db FILE record=training`` lists them
next to the data they came from.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import math
import os
import random
import socket
import re
import sqlite3
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import ase.db
import ase.io
import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from autopipec_hpc.errors import ClaimError, DatabaseBusyError, DatabaseError, ImportDataError

log = logging.getLogger(__name__)

TRAINING_RECORD = "training"
SELECTION_RECORD = "selection"  # one row per `select` run (active_learning.py)


class StructureStatus(StrEnum):
    """The ``status`` of a structure row that the pipeline selects (import may set any word)."""

    TRAINING_READY = "TRAINING_READY"
    # Active learning (active_learning.py): unlabelled frames waiting to be scored,
    # and the ones chosen for labelling; `label` makes the latter TRAINING_READY.
    CANDIDATE = "CANDIDATE"
    DFT_REQUESTED = "DFT_REQUESTED"


class RecordState(StrEnum):
    """The ``status`` of a training record, stored as this plain string."""

    SUBMITTED = "SUBMITTED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    DIVERGED = "DIVERGED"
    CANCELLED = "CANCELLED"

    @property
    def is_final(self) -> bool:
        return self in FINAL_RECORD_STATES

    @property
    def is_active(self) -> bool:
        """Submitted or running: a generation in flight."""
        return self in (RecordState.SUBMITTED, RecordState.RUNNING)


# Which state a record may move to from each: only forward. A requeue may take a
# running generation back to SUBMITTED; a final state never changes.
ALLOWED_MOVES: dict[RecordState, frozenset[RecordState]] = {
    RecordState.SUBMITTED: frozenset(RecordState),
    RecordState.RUNNING: frozenset(RecordState),
    RecordState.SUCCEEDED: frozenset(),
    RecordState.FAILED: frozenset(),
    RecordState.DIVERGED: frozenset(),
    RecordState.CANCELLED: frozenset(),
}
LOCK_TIMEOUT_S = 60.0

FINAL_RECORD_STATES = frozenset(
    {RecordState.SUCCEEDED, RecordState.FAILED, RecordState.DIVERGED, RecordState.CANCELLED}
)
RECORD_STATES = tuple(state.value for state in RecordState)


def is_url(target: str) -> bool:
    return "://" in target


def absolute_target(database: str) -> str:
    """A database path as every node sees it (absolute); a URL as it is."""
    return database if is_url(database) else str(Path(database).resolve())


@dataclass(frozen=True, kw_only=True)
class TrainingRecord:
    """One generation's training record: a row with ``record=training``.

    Typed fields for what the pipeline reads; ``values`` keeps every key-value
    pair of the row (the typed ones included) and ``data`` its data.
    """

    generation: int
    status: RecordState
    reason: str
    row_id: int
    values: dict[str, Any]
    data: dict[str, Any]
    run_dir: Path | None = None
    potential_path: Path | None = None
    train_job: str | None = None
    evaluate_job: str | None = None
    iterations: int | None = None
    wall_time_s: float | None = None
    train_energy_rmse_mev: float | None = None
    train_force_rmse_mev: float | None = None
    test_energy_rmse_mev: float | None = None
    test_energy_mae_mev: float | None = None
    test_force_rmse_mev: float | None = None

    @property
    def log_tail(self) -> str:
        """pacemaker's last log lines, kept when a fit failed."""
        return str(self.data.get("log_tail", ""))

    @property
    def metrics(self) -> dict[str, Any] | None:
        """The holdout metrics (metrics.json) of a generation that succeeded."""
        return self.data.get("metrics")


SQLITE_HEADER = b"SQLite format 3\x00"
MAX_LABEL_LENGTH = 200
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
    exact = row.data.get("config_type") if row.data else None
    return str(exact) if exact is not None else str(row.get("config_type", "default"))


def _guarded(method):
    """Database errors from below (a locked, read-only or corrupt file) become one
    DatabaseError naming the database."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (sqlite3.Error, OSError) as exc:
            message = describe_database_error(self.target, exc)
            busy = "locked" in str(exc) or "busy" in str(exc)
            raise (DatabaseBusyError if busy else DatabaseError)(message) from exc

    return wrapper


def describe_database_error(target: str, exc: BaseException) -> str:
    target = redact(target)
    text = " ".join((str(exc) or type(exc).__name__).split())
    if "locked" in text or "busy" in text:
        return f"database {target} is locked by another process (gave up after waiting): {text}"
    if "readonly" in text or "read-only" in text or isinstance(exc, PermissionError):
        return f"database {target} cannot be written: {text}"
    return f"database {target}: {text}"


class DatabaseManager:
    """One ASE database (a SQLite path by default, or any URL ``ase.db`` accepts)."""

    def __init__(self, target: str | Path, must_exist: bool = False) -> None:
        self.target = str(target)
        if is_url(self.target) and redact(self.target) != self.target:
            raise DatabaseError(
                f"database {redact(self.target)}: a password in the URL would be written into run folders and "
                "job scripts; give it in PGPASSWORD or ~/.pgpass (or PGPASSFILE) instead"
            )
        if not is_url(self.target):
            path = Path(self.target)
            if path.suffix not in (".db", ".json"):
                raise DatabaseError(
                    f"database {self.target!r}: expected a .db (SQLite) or .json path, or a URL"
                )
            if path.is_dir():
                raise DatabaseError(f"database {self.target}: is a directory")
            if must_exist and not path.exists():
                raise DatabaseError(f"database {self.target} does not exist")
            if path.suffix == ".db" and path.exists() and path.stat().st_size > 0:
                with open(path, "rb") as handle:
                    if handle.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                        raise DatabaseError(f"database {self.target} is not a SQLite database")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DatabaseError(f"database {self.target}: cannot create its folder ({exc.strerror})") from None
            network = network_filesystem(path.parent)
            if network:
                log.warning("database %s lies on a %s filesystem, where SQLite's locking is unsafe with several "
                            "writers (jobs on other nodes): use PostgreSQL there (README: Databases)",
                            self.target, network)
        self._lock_depth = 0
        try:
            self._db = ase.db.connect(self.target, append=True)
        except Exception as exc:  # ase raises many kinds; the path is what the user needs
            raise DatabaseError(f"cannot open database {redact(self.target)!r}: {exc}") from exc

    # -- structures ---------------------------------------------------------
    @_guarded
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
        for path in paths:
            frames = 0
            for index, atoms in read_frames(path):
                _labels_of(atoms, f"{path}: frame {index}")
                check_label(config_type or str(atoms.info.get("config_type", "default")), f"{path}: frame {index}")
                frames += 1
            if frames == 0:
                raise ImportDataError(f"{path}: holds no structures; nothing was imported")
        count = 0
        with self._transaction() as db:
            for path in paths:
                for index, atoms in read_frames(path):
                    energy, forces = _labels_of(atoms, f"{path}: frame {index}")
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

    @_guarded
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

        Labels in the file are not kept (a candidate is labelled by `label`); each
        frame's ``config_type`` and its other scalar ``info`` entries (provenance:
        the generator, MD step, temperature...) become key-value pairs.
        """
        frames = []
        for path in paths:
            for index, atoms in read_frames(path):
                check_label(config_type or str(atoms.info.get("config_type", "default")), f"{path}: frame {index}")
                frames.append((Path(path).name, index, atoms))
            if not frames:
                raise ImportDataError(f"{path}: holds no structures; nothing was imported")
        with self._transaction() as db:
            for source, index, atoms in frames:
                ctype = config_type or str(atoms.info.get("config_type", "default"))
                self._write_candidate(db, atoms, ctype, provenance_of(atoms.info), source=source, frame=index)
        return len(frames)

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

    def iter_rows(self, page: int = 500, **selection: Any) -> Iterator[Any]:
        """The rows matching ``selection`` (ase.db rows), in id order, a page at a time."""
        sel = {k: str(v) if isinstance(v, StrEnum) else v for k, v in selection.items()}
        return self._select_paged(page=page, **sel)

    def get_row(self, row_id: int):
        return self._db.get(id=int(row_id))

    def update_rows(self, updates: Sequence[tuple[int, dict[str, Any]]]) -> None:
        """Key-value updates of several rows in one transaction."""
        with self._transaction() as db:
            for row_id, values in updates:
                clean = {k: _clean_value(v) for k, v in values.items()}
                db.update(int(row_id), **{k: v for k, v in clean.items() if v is not None})

    def set_labels(self, row_id: int, energy: float, forces: np.ndarray, status: str, **values: Any) -> None:
        """Store a row's labels and new status; the row keeps its id, unique_id,
        key-value pairs and data (ase.db's ``update(atoms=...)`` would draw a new unique_id)."""
        from ase.db.row import AtomsRow

        old = self._db.get(id=int(row_id))
        atoms = old.toatoms()
        atoms.calc = SinglePointCalculator(atoms, energy=float(energy), forces=np.asarray(forces, dtype=float))
        kvp = dict(old.key_value_pairs)
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

    def add_marker(self, kind: str, generation: int, values: dict[str, Any] | None = None,
                   data: dict[str, Any] | None = None) -> int:
        """A row with no atoms that records a finished step (``record=kind``), e.g. a selection."""
        clean = {k: _clean_value(v) for k, v in (values or {}).items()}
        return self._db.write(Atoms(), record=kind, generation=int(generation), updated=time.time(),
                              data=data or {}, **{k: v for k, v in clean.items() if v is not None})

    def markers(self, kind: str, generation: int | None = None) -> list[Any]:
        selection: dict[str, Any] = {"record": kind}
        if generation is not None:
            selection["generation"] = int(generation)
        with self._transaction():
            return list(self._db.select(sort="id", **selection))

    def commit_selection(self, generation: int, row_ids: Sequence[int], values: dict[str, Any],
                         data: dict[str, Any]) -> int:
        """In one transaction: the chosen CANDIDATE rows become DFT_REQUESTED (any other
        row is left alone) and a ``record=selection`` row records the step; returns how
        many rows changed status."""
        changed = 0
        clean = {k: _clean_value(v) for k, v in values.items()}
        with self._transaction() as db:
            for row_id in row_ids:
                if db.get(id=int(row_id)).get("status") != StructureStatus.CANDIDATE:
                    continue
                db.update(int(row_id), status=StructureStatus.DFT_REQUESTED.value,
                          selected_by_generation=int(generation))
                changed += 1
            db.write(Atoms(), record=SELECTION_RECORD, generation=int(generation), updated=time.time(),
                     data=data, **{k: v for k, v in clean.items() if v is not None})
        return changed

    @_guarded
    def count(self, **selection: Any) -> int:
        return self._db.count(**{k: str(v) if isinstance(v, StrEnum) else v for k, v in selection.items()})

    def ready_structures(self, status: str = StructureStatus.TRAINING_READY) -> "ReadyStructures":
        return ReadyStructures(self, status)

    def iter_structures(self, status: str = StructureStatus.TRAINING_READY) -> Iterator[Atoms]:
        """Stream the rows with ``status``, as Atoms carrying their labels.

        ``info`` holds ``db_id`` and ``config_type``; the calculator holds the
        DFT energy and forces (``None`` where a row lacks them); a force mask
        is in ``arrays['force_mask']``.
        """
        for row in self._select_paged(status=str(status)):
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

    def _select_paged(self, page: int = 500, **selection: Any):
        """Rows in id order, ``page`` at a time: ase.db's SQLite backend fetches a
        whole result set at once, which would grow with the database."""
        last = 0
        while True:
            try:
                rows = self._page(f"id>{last}", page, selection)
            except (sqlite3.Error, OSError) as exc:
                raise DatabaseError(describe_database_error(self.target, exc)) from exc
            yield from rows
            if len(rows) < page:
                return
            last = rows[-1].id

    def _page(self, after: str, page: int, selection: dict[str, Any]) -> list[Any]:
        with self._transaction():
            return list(self._db.select(after, sort="id", limit=page, **selection))

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        """One connection, and one transaction, for several ase.db calls. Outside a
        `with`, ase.db connects anew for every call and for every row it converts (to
        look up its external tables): ~7 ms each on PostgreSQL, which made streaming
        40x and record updates 8x slower than they need to be. Re-entrant."""
        if self._db.connection is not None:
            yield self._db
            return
        # Not `with self._db`: its rollback fails on ase-db-backends' PostgreSQL
        # connection wrapper, which has no rollback() (psycopg2's own is `.con`).
        connection = self._db._connect()
        self._db.connection, self._db.change_count = connection, 0
        try:
            yield self._db
        except BaseException:
            getattr(connection, "con", connection).rollback()
            raise
        else:
            connection.commit()
        finally:
            self._db.connection = None
            connection.close()

    @_guarded
    def mark_used(self, generation: int, train_ids: Sequence[int], test_ids: Sequence[int]) -> None:
        """Record which generation trained (or tested) on each structure, in one transaction."""
        with self._transaction() as db:
            for ids, split in ((train_ids, "train"), (test_ids, "test")):
                for row_id in ids:
                    db.update(int(row_id), generation=int(generation), split=split)

    # -- training records ---------------------------------------------------
    def _record_row(self, generation: int):
        rows = list(self._db.select(record=TRAINING_RECORD, generation=int(generation)))
        return rows[0] if rows else None

    @_guarded
    def get_record(self, generation: int) -> TrainingRecord | None:
        with self._transaction():
            row = self._record_row(generation)
        return None if row is None else _record_from_row(row)

    @_guarded
    def records(self) -> list[TrainingRecord]:
        with self._transaction():
            rows = list(self._db.select(record=TRAINING_RECORD, sort="generation"))
        return [_record_from_row(row) for row in rows]

    @_guarded
    def next_generation(self) -> int:
        gens = [r.generation for r in self.records()]
        return max(gens) + 1 if gens else 1

    @_guarded
    def write_record(
        self,
        generation: int,
        status: RecordState | str,
        reason: str = "",
        values: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
    ) -> int:
        """Create or update the record of ``generation``; earlier values and data are kept."""
        if status not in RECORD_STATES:
            raise DatabaseError(f"unknown training status {status!r}; expected one of {RECORD_STATES}")
        status = RecordState(status).value  # the row holds the plain string
        clean = {k: _clean_value(v) for k, v in (values or {}).items()}
        clean = {k: v for k, v in clean.items() if v is not None}
        row = self._record_row(generation)
        stamp = time.time()
        if row is None:
            return self._db.write(
                Atoms(),
                record=TRAINING_RECORD,
                generation=int(generation),
                status=status,
                reason=reason,
                updated=stamp,
                data=data or {},
                **clean,
            )
        merged = dict(row.data or {})
        merged.update(data or {})
        self._db.update(
            row.id, status=status, reason=reason, updated=stamp, data=merged, **clean
        )
        return row.id


    # -- claims and forward-only updates -------------------------------------------
    @contextmanager
    def locked(self, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        """Hold the records' lock: one writer of training records at a time, across
        processes and hosts that share the database. SQLite (and JSON): an flock on
        ``<database>.records-lock`` beside the file; PostgreSQL: an advisory lock. Re-entrant
        within this manager."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        release = self._acquire(timeout_s)
        self._lock_depth = 1
        try:
            yield
        finally:
            self._lock_depth = 0
            release()

    def _acquire(self, timeout_s: float) -> Callable[[], None]:
        if is_url(self.target):
            return _advisory_lock(self.target, timeout_s)
        # Not "<db>.lock": ase.db keeps a lock of its own under that name.
        path = Path(f"{self.target}.records-lock")
        try:
            handle = open(path, "a+")
        except OSError as exc:
            raise DatabaseError(f"database {self.target}: cannot open its lock file {path} ({exc.strerror})") from None
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    handle.close()
                    raise DatabaseBusyError(
                        f"database {self.target}: its record lock {path} stayed held by another process "
                        f"for {timeout_s:.0f} s"
                    ) from None
                # Short, jittered polls: a holder that takes the lock again at once (a busy
                # writer) would otherwise starve waiters that all wake on the same beat.
                time.sleep(random.uniform(0.002, 0.02))

        def release() -> None:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

        return release

    @_guarded
    def claim(
        self,
        generation: int | None,
        make_run_dir: Callable[[int], Path],
        force: bool = False,
        values: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
    ) -> tuple[int, Path]:
        """Choose a generation (the given one, or one past the highest) and claim it for a
        new run folder, in one step under the records' lock: of any number of
        simultaneous claims of one generation exactly one wins, and plain claims get
        distinct generations. The winner's record is new (nothing of an earlier run of
        that generation is merged into it). Raises ClaimError for a generation in flight,
        or one that succeeded unless ``force``."""
        with self.locked(), self._transaction():
            number = self.next_generation() if generation is None else int(generation)
            existing = self.get_record(number)
            if existing is not None and existing.status.is_active:
                raise ClaimError(
                    f"generation {number} is {existing.status} (run folder {existing.run_dir}); "
                    f"cancel it first: autopipec-hpc cancel --generation {number}"
                )
            if existing is not None and existing.status == RecordState.SUCCEEDED and not force:
                raise ClaimError(
                    f"generation {number} already succeeded ({existing.potential_path or ''}); "
                    "use --force to train it again"
                )
            run_dir = make_run_dir(number)
            owner = {"run_dir": str(run_dir), "claimed_by": f"{socket.gethostname()}:{os.getpid()}",
                     "claimed_at": time.time()}
            if existing is not None:
                self._db.delete([existing.row_id])
            self.write_record(number, RecordState.SUBMITTED, values={**(values or {}), **owner}, data=data)
            return number, run_dir

    @_guarded
    def update_record(
        self,
        generation: int,
        owner: str | Path,
        status: RecordState | str,
        reason: str = "",
        values: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
    ) -> bool:
        """Move the record of ``generation`` to ``status`` if the run folder ``owner``
        still holds the claim and the move is forward (``ALLOWED_MOVES``); else leave
        it, log why and return False. A late, repeated or losing job can never
        overwrite a final state or another run's record."""
        status = RecordState(status)
        with self.locked(), self._transaction():
            record = self.get_record(generation)
            if record is None or record.run_dir is None or str(record.run_dir) != str(owner):
                holder = None if record is None else record.run_dir
                log.warning("generation %s: %s does not hold the record (held by %s); %s not written",
                            generation, owner, holder, status)
                return False
            if status not in ALLOWED_MOVES[record.status]:
                log.warning("generation %s is %s already; %s not written", generation, record.status, status)
                return False
            self.write_record(generation, status, reason=reason, values=values, data=data)
            return True

    @_guarded
    def add_values(
        self,
        generation: int,
        owner: str | Path,
        values: dict[str, Any],
        data: dict[str, Any] | None = None,
    ) -> bool:
        """Add ``values`` (and ``data``) to the record of ``generation`` and keep its state
        and reason: for facts learned after a state was written, such as the job ids that
        `submit` learns only after the training job may already have written RUNNING
        (writing SUBMITTED then would move the record back). Only for the run folder
        ``owner`` that holds the claim; returns False (and writes nothing) otherwise."""
        with self.locked(), self._transaction():
            record = self.get_record(generation)
            if record is None or record.run_dir is None or str(record.run_dir) != str(owner):
                log.warning("generation %s: %s does not hold the record; its values not written", generation, owner)
                return False
            self.write_record(generation, record.status, reason=record.reason, values=values, data=data)
            return True


def _advisory_lock(url: str, timeout_s: float) -> Callable[[], None]:
    """A PostgreSQL session advisory lock on its own connection (released with it)."""
    try:
        import psycopg2
    except ImportError:
        raise DatabaseError("PostgreSQL needs psycopg2: pip install 'autopipec-hpc[postgresql]'") from None
    key = int.from_bytes(hashlib.sha256(b"autopipec-hpc training records").digest()[:8], "big", signed=True)
    try:
        connection = psycopg2.connect(url, connect_timeout=30)
    except psycopg2.Error as exc:
        raise DatabaseError(f"database {redact(url)}: {' '.join(str(exc).split())}") from None
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = %s", (f"{int(timeout_s * 1000)}ms",))
            cursor.execute("SELECT pg_advisory_lock(%s)", (key,))
    except psycopg2.Error as exc:
        connection.close()
        raise DatabaseBusyError(
            f"database {redact(url)}: the record lock stayed held for {timeout_s:.0f} s ({' '.join(str(exc).split())})"
        ) from None

    def release() -> None:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s)", (key,))
        finally:
            connection.close()

    return release


NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "fuse.sshfs",
                       "glusterfs", "ceph", "9p")


def network_filesystem(folder: Path) -> str | None:
    """The type of the network filesystem ``folder`` lies on, or None (local, or unknown)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    where = str(folder.resolve())
    best = ("", "")
    for mount_point, fs_type in mounts:
        inside = where == mount_point or where.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > len(best[0]):
            best = (mount_point, fs_type)
    return best[1] if best[1] in NETWORK_FILESYSTEMS else None


def redact(target: str) -> str:
    """A database URL without its password, for messages and records."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", target)


class ReadyStructures:
    """A re-iterable view of the ready rows: each ``iter`` is a fresh streaming query."""

    def __init__(self, db: DatabaseManager, status: str) -> None:
        self._db = db
        self._status = status

    def __iter__(self) -> Iterator[Atoms]:
        return self._db.iter_structures(self._status)

    def __len__(self) -> int:
        return self._db.count(status=self._status)


def _clean_value(value: Any) -> Any:
    """ASE key-value pairs take bool, int, float and str only; NaN cannot be a key."""
    if isinstance(value, str):
        # ase.db refuses strings that read as numbers (job ids): store those as numbers.
        try:
            return int(value)
        except ValueError:
            pass
        try:
            float(value)
            return f"'{value}'"
        except ValueError:
            return value
    if isinstance(value, (bool, int)):
        return value
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return str(value)


# Keys the pipeline writes on structure rows; provenance never overwrites them.
PIPELINE_KEYS = frozenset({
    "status", "config_type", "source", "frame", "generation", "split", "record",
    "gamma_max", "gamma_mean", "scored_by_generation", "selected_by_generation", "labelled_by",
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


def _record_from_row(row) -> TrainingRecord:
    skip = {"record", "generation", "status", "reason"}
    values = {k: v for k, v in row.key_value_pairs.items() if k not in skip}
    return TrainingRecord(
        generation=int(row.generation),
        status=RecordState(row.status),
        reason=str(row.get("reason", "")),
        row_id=row.id,
        values=values,
        data=dict(row.data or {}),
        run_dir=_typed(values, "run_dir", Path),
        potential_path=_typed(values, "potential_path", Path),
        train_job=_typed(values, "train_job", _text),
        evaluate_job=_typed(values, "evaluate_job", _text),
        iterations=_typed(values, "iterations", int),
        wall_time_s=_typed(values, "wall_time_s", float),
        train_energy_rmse_mev=_typed(values, "train_energy_rmse_mev", float),
        train_force_rmse_mev=_typed(values, "train_force_rmse_mev", float),
        test_energy_rmse_mev=_typed(values, "test_energy_rmse_mev", float),
        test_energy_mae_mev=_typed(values, "test_energy_mae_mev", float),
        test_force_rmse_mev=_typed(values, "test_force_rmse_mev", float),
    )


def _typed(values: dict[str, Any], key: str, kind: Any) -> Any:
    """``values[key]`` as ``kind``; None where it is absent or empty."""
    value = values.get(key)
    return None if value is None or value == "" else kind(value)


def _text(value: Any) -> str:
    """A string stored by ``_clean_value``: numbers come back as numbers, number-like text quoted."""
    text = str(value)
    return text[1:-1] if len(text) > 1 and text[0] == text[-1] == "'" else text


def read_frames(path: str | Path) -> Iterator[tuple[int, Atoms]]:
    """(index, Atoms) of every frame of an ASE-readable file; a file that is missing,
    a folder, or not a structure file is named in one ImportDataError."""
    path = Path(path)
    if not path.exists():
        raise ImportDataError(f"{path}: no such file")
    if path.is_dir():
        raise ImportDataError(f"{path}: is a directory, not a structure file")
    if path.stat().st_size == 0:
        raise ImportDataError(f"{path}: is empty; nothing was imported")
    try:
        yield from enumerate(ase.io.iread(str(path), index=":"))
    except ImportDataError:
        raise
    except Exception as exc:  # ASE's readers raise whatever their parser meets
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImportDataError(
            f"{path}: not a readable structure file ({type(exc).__name__}: {reason[:160]}); nothing was imported"
        ) from None


def _labels_of(atoms: Atoms, where: str) -> tuple[float, np.ndarray]:
    """Energy and forces of an imported frame, or an error naming the frame."""
    calc = atoms.calc
    results = getattr(calc, "results", {}) if calc is not None else {}
    energy = results.get("energy", atoms.info.get("energy"))
    forces = results.get("forces", atoms.arrays.get("forces"))
    if energy is None:
        raise ImportDataError(f"{where} has no energy; nothing was imported")
    if forces is None:
        raise ImportDataError(f"{where} has no forces; nothing was imported")
    forces = np.asarray(forces, dtype=float)
    if forces.shape != (len(atoms), 3):
        raise ImportDataError(
            f"{where} has forces of shape {forces.shape}, expected ({len(atoms)}, 3); nothing was imported"
        )
    return float(energy), forces
