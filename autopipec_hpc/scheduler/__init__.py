"""The scheduler factory: the one place that knows the backends (local.py, slurm.py).

The contract they implement is in ``scheduler/base.py``.
"""

from __future__ import annotations

from autopipec_hpc.config import SiteConfig
from autopipec_hpc.scheduler.base import Scheduler


def scheduler_for(site: SiteConfig) -> Scheduler:
    if site.scheduler == "local":
        from autopipec_hpc.scheduler.local import LocalScheduler

        return LocalScheduler(site)
    from autopipec_hpc.scheduler.slurm import SlurmScheduler

    return SlurmScheduler(site)
