"""One selection per generation at a time: the claim a selection holds from before it scores
(or before its job is submitted) until the transaction that commits it.

A claim is a ``record=selection-claim`` row (``store/structures.py``), written under the
records' lock (``DatabaseManager.locked``) after every earlier claim of the generation was
judged: a claim whose holder is gone (its select job ended, its process died, its heartbeat
stopped) is dropped there and then, so no claim is stuck for good; a live one refuses the
new selection by name. A generation already selected is refused too, unless asked
``again``: the loop's and the user's budget is per generation, and two selections one after
the other would label twice the budget.

Who holds a claim: its folder's select job while ``job.json`` names one (asked of the
scheduler: a job's state outlives the process that submitted it); else the process
``claimed_by`` (``host:pid``), checked on its own host, and anywhere by its heartbeat, which
a selection renews with every batch it scores.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autopipec_hpc.config import SiteConfig
from autopipec_hpc.errors import ClaimError, DatabaseError, SchedulerError, one_line
from autopipec_hpc.processes import pid_alive
from autopipec_hpc.states import FINISHED
from autopipec_hpc.store import DatabaseManager
from autopipec_hpc.store.database import is_url
from autopipec_hpc.store.structures import SELECTION_RECORD

log = logging.getLogger(__name__)

# A claim with no job whose holder cannot be asked (another host) is reckoned dead once its
# heartbeat is this old; a selection renews it with every batch (seconds apart).
HEARTBEAT_LEASE_S = 900.0


def whoami() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class SelectionClaim:
    """One claim row: which generation, its token (saved in the request a job is given),
    who took it, when it last beat, and the selection folder once there is one."""

    row_id: int
    generation: int
    token: str
    claimed_by: str
    claimed_at: float
    heartbeat: float
    folder: Path | None

    @classmethod
    def from_row(cls, row: Any) -> "SelectionClaim":
        folder = row.get("folder")
        return cls(row_id=row.id, generation=int(row.generation), token=str(row.get("token", "")),
                   claimed_by=str(row.get("claimed_by", "")), claimed_at=float(row.get("claimed_at", 0.0)),
                   heartbeat=float(row.get("heartbeat", row.get("claimed_at", 0.0))),
                   folder=Path(folder) if folder else None)

    @property
    def job_file(self) -> Path | None:
        if self.folder is None:
            return None
        path = self.folder / "job.json"
        return path if path.exists() else None

    def describe(self) -> str:
        where = f", folder {self.folder}" if self.folder else ""
        job = ""
        if self.job_file is not None:
            from autopipec_hpc.scheduler.base import SubmittedJob

            try:
                job = f", select job {SubmittedJob.load(self.job_file).job_id}"
            except (OSError, ValueError, SchedulerError):
                job = ", a select job"
        return f"claimed by {self.claimed_by}{job}{where}"


def gone(claim: SelectionClaim, site: SiteConfig | None, now: float | None = None) -> str | None:
    """Why ``claim``'s holder is gone (its claim may be dropped), or None while it may live."""
    now = time.time() if now is None else now
    if claim.job_file is not None:
        if site is None:
            return None  # its job can only be asked with the site's scheduler
        from autopipec_hpc.scheduler import scheduler_for
        from autopipec_hpc.scheduler.base import SubmittedJob

        try:
            job = SubmittedJob.load(claim.job_file)
            [state] = scheduler_for(site).states([job])
        except (SchedulerError, OSError, ValueError) as exc:
            log.info("selection claim of generation %s: its job cannot be asked (%s); kept",
                     claim.generation, one_line(exc))
            return None
        return f"its select job {job.job_id} ended {state}" if state in FINISHED else None
    host, _, pid = claim.claimed_by.rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        return None if pid_alive(int(pid)) else f"its process {claim.claimed_by} ended"
    if now - claim.heartbeat > HEARTBEAT_LEASE_S:
        return f"its holder {claim.claimed_by} has not been heard of for {now - claim.heartbeat:.0f} s"
    return None


def live_claims(db: DatabaseManager, generation: int, site: SiteConfig | None = None) -> list[SelectionClaim]:
    """The claims of ``generation`` whose holders may still run; the others are dropped
    (under the records' lock), each logged with why."""
    with db.locked():
        live = []
        for row in db.selection_claims(generation):
            claim = SelectionClaim.from_row(row)
            why = gone(claim, site)
            if why is None:
                live.append(claim)
                continue
            log.warning("generation %s: the selection %s is dropped: %s", generation, claim.describe(), why)
            db.drop_selection_claim(claim.row_id)
            _tell_folder(claim, f"its claim was dropped: {why}")
        return live


def _tell_folder(claim: SelectionClaim, error: str) -> None:
    """The dropped claim's folder says so, for whoever waits on it (a summary it has is kept)."""
    from autopipec_hpc.active.selection_folder import SelectionFolder

    if claim.folder is None or not claim.folder.is_dir():
        return
    folder = SelectionFolder(claim.folder)
    if not folder.summary_file.exists() and folder.failure() is None:
        try:
            folder.record_failure(error)
        except OSError:
            pass


def claim_selection(db: DatabaseManager, generation: int, site: SiteConfig | None = None,
                    again: bool = False) -> SelectionClaim:
    """Claim the selection of ``generation`` for this process, under the records' lock;
    ClaimError (one line) while another selection of it is in flight, or once it has been
    selected (unless ``again``)."""
    folder = None if is_url(db.target) else Path(db.target).resolve().parent
    if folder is not None and not os.access(folder, os.W_OK):
        # Said before the records' lock (a file beside the database) is looked for there.
        raise DatabaseError(f"database {db.target} cannot be written: its folder {folder} is read-only; "
                            "nothing was selected")
    with db.locked():
        live = live_claims(db, generation, site)
        if live:
            raise ClaimError(f"generation {generation} is being selected already ({live[0].describe()}); "
                             "wait for it, or cancel its job")
        markers = db.markers(SELECTION_RECORD, generation)
        if markers and not again:
            last = markers[-1]
            raise ClaimError(
                f"generation {generation} was already selected: {int(last.get('n_selected', 0))} structures "
                f"requested ({last.get('folder', '')}); label them, or select again with --again"
            )
        now = time.time()
        token = f"sel-{uuid.uuid4().hex[:16]}"
        row_id = db.write_selection_claim(generation, {"token": token, "claimed_by": whoami(), "claimed_at": now,
                                                       "heartbeat": now})
        return SelectionClaim(row_id, generation, token, whoami(), now, now, None)


def find_claim(db: DatabaseManager, generation: int, token: str) -> SelectionClaim | None:
    for row in db.selection_claims(generation):
        if row.get("token") == token:
            return SelectionClaim.from_row(row)
    return None


def set_folder(db: DatabaseManager, claim: SelectionClaim, folder: Path) -> SelectionClaim:
    with db.locked():
        held(db, claim)
        db.update_selection_claim(claim.row_id, folder=str(folder))
    return SelectionClaim(claim.row_id, claim.generation, claim.token, claim.claimed_by, claim.claimed_at,
                          claim.heartbeat, folder)


def held(db: DatabaseManager, claim: SelectionClaim) -> None:
    """ClaimError unless ``claim`` is still in the database (not dropped as dead, not taken over)."""
    if find_claim(db, claim.generation, claim.token) is None:
        raise ClaimError(f"generation {claim.generation}: this selection's claim was dropped (its holder was "
                         "reckoned gone) and nothing was committed; select again")


def beat(db: DatabaseManager, claim: SelectionClaim) -> None:
    """Renew the claim's heartbeat (a selection alive on another host)."""
    db.update_selection_claim(claim.row_id, heartbeat=time.time(), beat_by=whoami())


def release(db: DatabaseManager, claim: SelectionClaim) -> None:
    """Give the claim up (a selection that failed): the next one need not wait for it."""
    with db.locked():
        if find_claim(db, claim.generation, claim.token) is not None:
            db.drop_selection_claim(claim.row_id)
