"""The scheduler factory: the one place that knows the backends (local.py, slurm.py).

The contract they implement is in ``scheduler/base.py``. A backend is made once per
process per site, so that its one state watcher (``scheduler/watcher.py``) follows
every job this process asks about with one batched query.
"""

from __future__ import annotations

from autopipec_hpc.config import SiteConfig
from autopipec_hpc.scheduler.base import Scheduler

_SCHEDULERS: dict[str, Scheduler] = {}


def scheduler_for(site: SiteConfig) -> Scheduler:
    """This process's scheduler for ``site`` (the same object for the same settings)."""
    key = site.model_dump_json()
    scheduler = _SCHEDULERS.get(key)
    if scheduler is None:
        scheduler = _SCHEDULERS[key] = _new_scheduler(site)
    return scheduler


def _new_scheduler(site: SiteConfig) -> Scheduler:
    if site.scheduler == "local":
        from autopipec_hpc.scheduler.local import LocalScheduler

        return LocalScheduler(site)
    from autopipec_hpc.scheduler.slurm import SlurmScheduler

    return SlurmScheduler(site)
