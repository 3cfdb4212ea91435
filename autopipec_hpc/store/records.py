"""Training records: one row per generation (``record=training``), claimed, then moved only forward.

Records are rows with no atoms, so ``ase db FILE record=training`` lists them next
to the data they came from. Markers (``record=selection``...) record finished steps.
"""

from __future__ import annotations

from autopipec_hpc.states import ALLOWED_MOVES, RECORD_STATES, RecordState

import fcntl
import hashlib
import json
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ase import Atoms
from pydantic import ConfigDict, ValidationError, field_validator

from autopipec_hpc.errors import ClaimError, DatabaseBusyError, DatabaseError, PublicationError
from autopipec_hpc.store.database import Database, _clean_value, _guarded, delete_rows, is_url, redact
from autopipec_hpc.validate.values import ValidationValues

log = logging.getLogger(__name__)

TRAINING_RECORD = "training"

LOCK_TIMEOUT_S = 60.0
# Keys of a record's data: the published record a forced re-claim keeps until its run replaces it,
# and the outcomes of retrains that did not.
PUBLISHED = "published"
RETRAINS = "retrains"


class RecordValues(ValidationValues):
    """Every key-value pair the pipeline writes on a training record, typed. Each write
    sets some of them (a claim, the job ids, a running attempt, the final metrics);
    the row keeps the union. Keys a newer or older version wrote are ignored here
    and kept in ``TrainingRecord.values``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    # the claim (store/records.py)
    run_dir: Path | None = None
    claimed_by: str | None = None  # host:pid of the submitting process
    claimed_at: float | None = None
    updated: float | None = None  # when the record was last written
    # the submission (submission.py)
    scheduler: str | None = None
    train_job: str | None = None
    evaluate_job: str | None = None
    evaluator: str | None = None
    parameters: int | None = None
    # a running attempt (jobs.py): where and with what it trains
    attempt: int | None = None
    resumed_from: str | None = None
    restarts: int | None = None
    host: str | None = None
    cuda_visible_devices: str | None = None
    devices: str | None = None
    threads: int | None = None
    tensorflow_version: str | None = None
    tensorpotential_version: str | None = None
    python_ace_version: str | None = None
    # the result (jobs.py, at publication); energies meV/atom, forces meV/A per component
    iterations: int | None = None
    wall_time_s: float | None = None
    train_energy_rmse_mev: float | None = None
    train_force_rmse_mev: float | None = None
    test_energy_rmse_mev: float | None = None
    test_energy_mae_mev: float | None = None
    test_force_rmse_mev: float | None = None
    residual_energy_rmse_mev: float | None = None
    residual_force_rmse_mev: float | None = None
    potential_path: Path | None = None
    parent_generation: int | None = None

    @field_validator("train_job", "evaluate_job", "validate_job", "cuda_visible_devices", "resumed_from", mode="before")
    @classmethod
    def _stored_text(cls, value: Any) -> str | None:
        # ase.db refuses number-like strings, so they are stored as numbers or quoted
        # ("'0'"): read back as the text that was written.
        if value is None or value == "":
            return None
        text = str(value)
        return text[1:-1] if len(text) > 1 and text[0] == text[-1] == "'" else text

    def stored(self) -> dict[str, Any]:
        """The values that were set, as ase.db key-value pairs take them."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.model_dump(exclude_none=True).items()}


class TrainingRecord(RecordValues):
    """One generation's training record: a row with ``record=training``. The typed
    values above, plus ``values`` (every key-value pair of the row, as stored) and
    ``data`` (pacemaker's log tail on failure, the holdout metrics on success, the
    training config at the claim)."""

    generation: int
    status: RecordState
    reason: str = ""
    row_id: int
    values: dict[str, Any] = {}
    data: dict[str, Any] = {}

    @property
    def log_tail(self) -> str:
        """pacemaker's last log lines, kept when a fit failed."""
        return str(self.data.get("log_tail", ""))

    @property
    def metrics(self) -> dict[str, Any] | None:
        """The holdout metrics (metrics.json) of a generation that succeeded."""
        return self.data.get("metrics")


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


def _still_published(published: dict[str, Any], retrain_dir: Path | None) -> bool:
    """Whether the potential a kept record names is still the one published: its folder
    holds a readable manifest, and this retrain did not publish over it."""
    from autopipec_hpc import registry

    folder = (published.get("values") or {}).get("potential_path")
    if not folder:
        return False
    try:
        registry.read_manifest(folder)
    except PublicationError:
        return False
    try:  # the metrics name the attempt that made the potential
        attempt = str(json.loads((Path(folder) / registry.METRICS).read_text()).get("attempt", ""))
    except (OSError, ValueError, AttributeError):
        attempt = ""
    return not (retrain_dir is not None and attempt and Path(attempt).parent == Path(retrain_dir))


def _record_from_row(row) -> TrainingRecord:
    skip = {"record", "generation", "status", "reason"}
    values = {k: v for k, v in row.key_value_pairs.items() if k not in skip}
    typed = {k: v for k, v in values.items() if k in RecordValues.model_fields and v != ""}
    common = dict(generation=int(row.generation), status=RecordState(row.status), reason=str(row.get("reason", "")),
                  row_id=row.id, values=values, data=dict(row.data or {}))
    try:
        return TrainingRecord(**common, **typed)
    except ValidationError as exc:
        # A value of another type than this version writes (edited by hand, an old
        # version): the record is still shown, without that value's typed field.
        bad = {str(err["loc"][0]) for err in exc.errors() if err["loc"]}
        log.warning("generation %s: record values %s not readable; ignored", row.generation, sorted(bad))
        return TrainingRecord(**common, **{k: v for k, v in typed.items() if k not in bad})


class TrainingRecords(Database):
    def add_marker(self, kind: str, generation: int, values: dict[str, Any] | None = None,
                   data: dict[str, Any] | None = None) -> int:
        """A row with no atoms that records a finished step (``record=kind``), e.g. a selection."""
        raw = values.stored() if isinstance(values, RecordValues) else dict(values or {})
        clean = {k: _clean_value(v) for k, v in raw.items()}
        return self._db.write(Atoms(), record=kind, generation=int(generation), updated=time.time(),
                              data=data or {}, **{k: v for k, v in clean.items() if v is not None})

    def markers(self, kind: str, generation: int | None = None) -> list[Any]:
        selection: dict[str, Any] = {"record": kind}
        if generation is not None:
            selection["generation"] = int(generation)
        with self._transaction():
            return list(self._db.select(sort="id", **selection))

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
        return max((r.generation for r in self.records()), default=0) + 1

    @_guarded
    def write_record(
        self,
        generation: int,
        status: RecordState | str,
        reason: str = "",
        values: RecordValues | dict[str, Any] | None = None,
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
            raise DatabaseError(f"database {self.target} cannot be written: its lock file {path} ({exc.strerror})") from None
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
        values: RecordValues | dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
    ) -> tuple[int, Path]:
        """Choose a generation (the given one, or one past the highest) and claim it for a
        new run folder, in one step under the records' lock: of any number of
        simultaneous claims of one generation exactly one wins, and plain claims get
        distinct generations. The winner's record is new (nothing of an earlier run of
        that generation is merged into it). Raises ClaimError for a generation in flight,
        or one that succeeded unless ``force``."""
        with self.locked(), self._transaction() as db:
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
            owner = RecordValues(run_dir=run_dir, claimed_by=f"{socket.gethostname()}:{os.getpid()}",
                                 claimed_at=time.time()).stored()
            kept = dict(data or {})
            if existing is not None and existing.status == RecordState.SUCCEEDED:
                # Its potential stays published until the new run replaces it: what the
                # record said about it is kept, to be restored if the new run fails.
                kept[PUBLISHED] = {"reason": existing.reason, "values": existing.values,
                                   "data": {k: v for k, v in existing.data.items() if k != PUBLISHED}}
            if existing is not None:
                delete_rows(db, [existing.row_id])  # with the write below, or not at all
            given = values.stored() if isinstance(values, RecordValues) else dict(values or {})
            self.write_record(number, RecordState.SUBMITTED, values={**given, **owner}, data=kept)
            return number, run_dir

    @_guarded
    def update_record(
        self,
        generation: int,
        owner: str | Path,
        status: RecordState | str,
        reason: str = "",
        values: RecordValues | dict[str, Any] | None = None,
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
            published = record.data.get(PUBLISHED)
            if published is not None and status.is_final and status != RecordState.SUCCEEDED:
                if _still_published(published, record.run_dir):
                    self._restore_published(record, published, status, reason, data)
                    return True
                reason = f"{reason}; the potential published before this retrain is gone, so none is published"
            self.write_record(generation, status, reason=reason, values=values, data=data)
            if published is not None and status.is_final:
                self._drop_data_key(generation, PUBLISHED)
            return True

    def _restore_published(self, record: TrainingRecord, published: dict[str, Any], status: RecordState,
                           reason: str, data: dict[str, Any] | None) -> None:
        """The record of the potential still published, back in place of a retrain that
        ended ``status``; the retrain's outcome is kept in ``data["retrains"]``."""
        retrain = {"run_dir": str(record.run_dir), "status": status.value, "reason": reason, "at": time.time(),
                   "log_tail": str((data or {}).get("log_tail", record.log_tail))}
        restored = {**(published.get("data") or {})}
        restored[RETRAINS] = [*restored.get(RETRAINS, []), retrain]
        pairs = {k: _clean_value(v) for k, v in (published.get("values") or {}).items()}
        pairs.update(record=TRAINING_RECORD, generation=record.generation, status=RecordState.SUCCEEDED.value,
                     reason=f"a retrain ({record.run_dir}) ended {status}: {reason}; this potential stays published",
                     updated=time.time())
        self._db.write(Atoms(), key_value_pairs={k: v for k, v in pairs.items() if v is not None},
                       data=restored, id=record.row_id)

    def _drop_data_key(self, generation: int, key: str) -> None:
        row = self._record_row(generation)
        kept = {k: v for k, v in (row.data or {}).items() if k != key}
        self._db.write(Atoms(), key_value_pairs=row.key_value_pairs, data=kept, id=row.id)

    @_guarded
    def run_record(self, generation: int, run_dir: str | Path) -> TrainingRecord | None:
        """The record of ``generation`` as the run in ``run_dir`` ended: the record itself,
        unless that run was a retrain of a published generation whose record was put back;
        then the retrain's own outcome (state, reason, log tail)."""
        record = self.get_record(generation)
        if record is None or record.run_dir is None or str(record.run_dir) == str(run_dir):
            return record
        for retrain in reversed(record.data.get(RETRAINS) or []):
            if retrain.get("run_dir") == str(run_dir):
                return record.model_copy(update={
                    "status": RecordState(retrain["status"]), "reason": str(retrain.get("reason", "")),
                    "run_dir": Path(run_dir), "data": {**record.data, "log_tail": retrain.get("log_tail", "")}})
        return record

    @_guarded
    def add_values(
        self,
        generation: int,
        owner: str | Path,
        values: RecordValues | dict[str, Any],
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
