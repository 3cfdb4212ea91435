"""The database connection: which targets are accepted, one transaction per call, paged reads.

A SQLite path (``.db``) by default, or any URL ``ase.db`` accepts (PostgreSQL through
ase-db-backends); JSON files are refused. Every public method of the store is guarded:
errors from below become one DatabaseError naming the database, never with its
password. No lock is taken that would outlive a killed holder (not ase's ``<db>.lock``).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import ase.db
import numpy as np

from autopipec_hpc.errors import DatabaseBusyError, DatabaseError
from autopipec_hpc.store.sqlite_rows import StructureRow, config_label, structure_rows

log = logging.getLogger(__name__)

def is_url(target: str) -> bool:
    return "://" in target

def absolute_target(database: str) -> str:
    """A database path as every node sees it (absolute); a URL as it is."""
    return database if is_url(database) else str(Path(database).resolve())

SQLITE_HEADER = b"SQLite format 3\x00"

def _from_below(exc: BaseException) -> bool:
    """Whether ``exc`` is the database's own failure (SQLite, PostgreSQL, the file system)."""
    if isinstance(exc, (sqlite3.Error, OSError)):
        return True
    # psycopg2 is imported only where a PostgreSQL URL is used: no module, no such error.
    psycopg2 = sys.modules.get("psycopg2")
    return psycopg2 is not None and isinstance(exc, psycopg2.Error)


def as_database_error(target: str, exc: BaseException) -> DatabaseError:
    """The one-line error naming the database, busy or not, for a failure from below."""
    busy = "locked" in str(exc) or "busy" in str(exc)
    return (DatabaseBusyError if busy else DatabaseError)(describe_database_error(target, exc))


def _guarded(method):
    """Database errors from below (a locked, read-only or corrupt file, a server that
    cannot be reached) become one DatabaseError naming the database; for a generator,
    while it is iterated. Idempotent."""
    if getattr(method, "_guarded", False):
        return method
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            try:
                yield from method(self, *args, **kwargs)
            except Exception as exc:
                if not _from_below(exc):
                    raise
                raise as_database_error(self.target, exc) from exc
    else:
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except Exception as exc:
                if not _from_below(exc):
                    raise
                raise as_database_error(self.target, exc) from exc

    wrapper._guarded = True
    return wrapper


def guard_public_methods(cls: type) -> type:
    """Every public method ``cls`` defines, guarded (``_guarded``): a method added later
    cannot be forgotten, as update_rows, set_labels, get_row, markers and
    commit_selection once were."""
    for name, value in list(vars(cls).items()):
        if not name.startswith("_") and inspect.isfunction(value):
            setattr(cls, name, _guarded(value))
    return cls

def _existing_only(connect: Callable[[], Any], path: Path, target: str) -> Callable[[], Any]:
    """``connect`` for a database that must exist: SQLite would make an empty file in place
    of one gone since (moved away, or a job on a node where its folder is not mounted), and
    records would be written into that."""

    def connect_existing() -> Any:
        if not path.exists():
            raise DatabaseError(f"database {target} does not exist (any more)")
        return connect()

    return connect_existing


def describe_database_error(target: str, exc: BaseException) -> str:
    target = redact(target)
    text = " ".join((str(exc) or type(exc).__name__).split())
    if "locked" in text or "busy" in text:
        return f"database {target} is locked by another process (gave up after waiting): {text}"
    if "readonly" in text or "read-only" in text or isinstance(exc, PermissionError):
        return f"database {target} cannot be written: {text}"
    return f"database {target}: {text}"

class Database:
    """One ASE database: the connection that structure rows and training records share.
    Every public method, here and in subclasses, is guarded (``guard_public_methods``)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        guard_public_methods(cls)

    def __init__(self, target: str | Path, must_exist: bool = False) -> None:
        self.target = str(target)
        if is_url(self.target) and redact(self.target) != self.target:
            raise DatabaseError(
                f"database {redact(self.target)}: a password in the URL would be written into run folders and "
                "job scripts; give it in PGPASSWORD or ~/.pgpass (or PGPASSFILE) instead"
            )
        if not is_url(self.target):
            path = Path(self.target)
            if path.suffix == ".json":
                # ase's JSON backend has no transactions (an import could not be all or
                # nothing) and its lock file outlives a killed writer, blocking every later one.
                raise DatabaseError(
                    f"database {self.target}: JSON databases are not supported (no transactions, no lock "
                    "that dies with a killed writer); use a .db path (SQLite) or a PostgreSQL URL"
                )
            if path.suffix != ".db":
                raise DatabaseError(
                    f"database {self.target!r}: expected a .db (SQLite) path or a PostgreSQL URL"
                )
            if path.is_dir():
                raise DatabaseError(f"database {self.target}: is a directory")
            if must_exist and not path.exists():
                raise DatabaseError(f"database {self.target} does not exist")
            if path.exists():
                check_ase_sqlite(path, self.target, must_exist)
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
            # No ase lock file (``<db>.lock``): ase's Lock has no timeout and outlives a
            # writer killed inside a write, and every later writer then waits for ever.
            # SQLite's own locks die with their holder, and our writes are transactions.
            self._db = ase.db.connect(self.target, append=True, use_lock_file=False)
        except Exception as exc:  # ase raises many kinds; the path is what the user needs
            raise DatabaseError(f"cannot open database {redact(self.target)!r}: {exc}") from exc
        if must_exist and not is_url(self.target):
            self._db._connect = _existing_only(self._db._connect, Path(self.target), self.target)

    def iter_rows(self, page: int = 500, **selection: Any) -> Iterator[Any]:
        """The rows matching ``selection`` (ase.db rows), in id order, a page at a time."""
        sel = {k: str(v) if isinstance(v, StrEnum) else v for k, v in selection.items()}
        return self._select_paged(page=page, **sel)

    def iter_structure_rows(self, status: str, page: int = 500) -> Iterator[StructureRow]:
        """The rows with ``status`` as (id, Atoms, config_type label), in id order, a page at
        a time: read from ase's SQLite schema directly where it can (``sqlite_rows``), else
        through ase.db (PostgreSQL)."""

        def fetch(last: int) -> list[StructureRow]:
            with self._transaction() as db:
                rows = None if is_url(self.target) else structure_rows(db, str(status), last, page)
                if rows is None:
                    rows = [StructureRow(r.id, r.toatoms(), config_label(r.key_value_pairs, r.data))
                            for r in db.select(f"id>{last}", sort="id", limit=page, status=str(status))]
                return rows

        return self._paged(fetch, page)

    def get_row(self, row_id: int):
        return self._db.get(id=int(row_id))

    def count(self, **selection: Any) -> int:
        return self._db.count(**{k: str(v) if isinstance(v, StrEnum) else v for k, v in selection.items()})

    def _select_paged(self, page: int = 500, **selection: Any) -> Iterator[Any]:
        return self._paged(lambda last: self._page(f"id>{last}", page, selection), page)

    def _paged(self, fetch: Callable[[int], list[Any]], page: int) -> Iterator[Any]:
        """Rows in id order, ``page`` at a time (``fetch(last id)`` reads the next page):
        ase.db's SQLite backend fetches a whole result set at once, which would grow with
        the database."""
        last = 0
        while True:
            try:
                rows = fetch(last)
            except Exception as exc:
                if not _from_below(exc):
                    raise
                raise as_database_error(self.target, exc) from exc
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
        try:
            # ase makes its schema on first use and commits it; made here, before the held
            # commits, so that a rollback cannot leave its tables without their version row.
            self._db._initialize(connection)
            self._db.connection, self._db.change_count = _HeldCommits(connection), 0
            yield self._db
        except BaseException:
            getattr(connection, "con", connection).rollback()
            raise
        else:
            connection.commit()
        finally:
            self._db.connection = None
            connection.close()

guard_public_methods(Database)


class _HeldCommits:
    """A transaction's connection as ase.db sees it, its commit() held for the end of the
    transaction: ase.db commits inside one every 5,000 calls (``managed_connection``'s
    commit_frequency), so a kill, an error or a full disk in an import of more rows left
    the first thousands written."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    def commit(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self.connection, name)


def delete_rows(db: Any, ids: list[int]) -> None:
    """ase.db's ``delete`` in the open transaction of ``db`` (``Database._transaction``).
    ase's own commits what the transaction did so far and then VACUUMs, rewriting the whole
    file: a claim's delete committed apart from the write it belongs with."""
    from ase.db.sqlite import all_tables

    tables = db._get_external_table_names() + all_tables[::-1]
    db._delete(db.connection.cursor(), [int(row_id) for row_id in ids], tables=tables)

# A table every ASE SQLite database has (ase/db/sqlite.py: init_statements).
ASE_TABLE = "systems"
# How long the schema check waits for a writer's lock before leaving the check to the
# calls that follow (which wait, and say so, as every call does).
SCHEMA_CHECK_WAIT_S = 1.0


def check_ase_sqlite(path: Path, target: str, must_exist: bool) -> None:
    """Refuse a file that is not an ASE SQLite database, reading it only (ase.db would
    write its schema into any SQLite file it opens). A file with no tables at all (empty)
    is a database a writer may start; one that must exist already is refused."""
    if path.stat().st_size == 0:
        if must_exist:
            raise DatabaseError(f"database {target} is empty (no ASE database yet): nothing to read")
        return
    with open(path, "rb") as handle:
        if handle.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            raise DatabaseError(f"database {target} is not a SQLite database")
    try:
        connection = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True,
                                     timeout=SCHEMA_CHECK_WAIT_S)
        try:
            tables = [name for (name,) in connection.execute(
                "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        finally:
            connection.close()
    except sqlite3.DatabaseError as exc:
        if isinstance(exc, sqlite3.OperationalError):
            return  # locked, or a hot journal to roll back: ase.db's own open deals with it
        raise DatabaseError(describe_database_error(target, exc)) from None
    if ASE_TABLE in tables:
        return
    if tables:
        shown = ", ".join(tables[:8]) + (", ..." if len(tables) > 8 else "")
        raise DatabaseError(f"database {target} is a SQLite file but not an ASE database (its tables: {shown}); "
                            "nothing was written to it")
    if must_exist:
        raise DatabaseError(f"database {target} is empty (no ASE database yet): nothing to read")


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


T = TypeVar("T")


# A job that finds the database busy (locked by another process) retries this long
# before it gives up; the login side's reconciliation then tells the truth.
JOB_DB_PATIENCE_S = 300.0


def patiently(action: Callable[[], T], what: str, patience_s: float = JOB_DB_PATIENCE_S) -> T:
    """Run a job's database ``action``, retried (bounded) while the database is busy."""
    deadline = time.monotonic() + patience_s
    delay = 1.0
    while True:
        try:
            return action()
        except DatabaseError as exc:
            if not _busy(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s: database busy (%s); retrying in %.0f s", what, exc, delay)
            time.sleep(delay)
            delay = min(2 * delay, 30.0)


def _busy(exc: DatabaseError) -> bool:
    return isinstance(exc, DatabaseBusyError) or "locked" in str(exc) or "busy" in str(exc)
