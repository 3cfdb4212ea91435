"""One watcher of job states per scheduler object, as submitit's ``InfoWatcher``.

Following jobs must not cost the cluster one ``sacct`` per job per second: the
watcher holds every job asked about, answers from its cache, and refreshes all
unfinished ones with ONE batched query when a refresh is due. The delay between
queries doubles while nothing changes (2, 4, 8 ... 60 s by default) and starts
again from the shortest after a change or a forced refresh (a submit, a cancel,
a record that moved). A final state is kept and never asked again.

The query and the clock are injected, so a test can count the queries over a
simulated fit without a cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TypeVar

from autopipec_hpc.states import FINISHED, JobState

Job = TypeVar("Job", bound=Hashable)
# Asks the scheduler once about all of ``jobs``; a job it does not list is UNKNOWN.
Query = Callable[[Sequence[Job]], Mapping[Job, JobState]]


class StateWatcher:
    def __init__(self, query: Query, clock: Callable[[], float] = time.monotonic,
                 min_delay_s: float = 2.0, max_delay_s: float = 60.0) -> None:
        if not 0 < min_delay_s <= max_delay_s:
            raise ValueError(f"watcher delays must satisfy 0 < min ({min_delay_s}) <= max ({max_delay_s})")
        self._query = query
        self._clock = clock
        self.min_delay_s = min_delay_s
        self.max_delay_s = max_delay_s
        self._delay = min_delay_s
        self._due = float("-inf")
        self._states: dict[Hashable, JobState] = {}
        self._asked: set[Hashable] = set()  # jobs a query was made for (answered or not)
        self._jobs: list[Hashable] = []
        self.queries = 0  # how many queries were made (benchmarks and tests read it)
        # The scheduler's error if its last answer was one: until it answers again, what
        # the cache holds is not knowledge, and callers must hear why.
        self._failure: Exception | None = None

    def register(self, *jobs: Hashable) -> None:
        """Follow ``jobs`` from now on (their first ``states`` asks at once)."""
        for job in jobs:
            if job not in self._asked and job not in self._jobs:
                self._jobs.append(job)

    def follow(self, job: Hashable) -> Hashable:
        """A job just submitted: followed from now on, and asked about at the next call."""
        self.register(job)
        self.soon()
        return job

    def state(self, job: Hashable) -> JobState:
        return self.states([job])[0]

    def states(self, jobs: Sequence[Hashable]) -> list[JobState]:
        """The states of ``jobs``: cached, after one query if one is due or a job is new."""
        self.register(*jobs)
        if any(job not in self._asked for job in jobs):
            self.refresh(force=True)
        else:
            self.refresh()
        if self._failure is not None:
            raise self._failure
        return [self._states.get(job, JobState.UNKNOWN) for job in jobs]

    @property
    def next_query_in_s(self) -> float:
        return max(0.0, self._due - self._clock())

    def soon(self) -> None:
        """Expect a change (a job submitted or cancelled, a record moved): the next
        ``states`` asks at once, and the delays start again from the shortest."""
        self._delay = self.min_delay_s
        self._due = self._clock()

    def refresh(self, force: bool = False) -> None:
        """One query for every followed job not yet final, if one is due (or ``force``)."""
        now = self._clock()
        if not force and now < self._due:
            return
        unfinished = [job for job in self._jobs if self._states.get(job) not in FINISHED]
        if not unfinished:
            return
        # Scheduled before asking, so a scheduler that fails is not asked again at once.
        self._due = now + self._delay
        self._asked.update(unfinished)
        self.queries += 1
        try:
            answer = self._query(unfinished)
        except Exception as exc:
            # Due again only a delay after the failure came back, backing off: a query that
            # hangs until its timeout (slurmdbd hanging) would otherwise be due again the
            # moment it returns, and every caller of one `status` would pay it again.
            self._failure = exc
            self._delay = min(self._delay * 2, self.max_delay_s)
            self._due = self._clock() + self._delay
            raise
        self._failure = None
        changed = False
        for job in unfinished:
            new = answer.get(job, JobState.UNKNOWN)
            changed |= self._states.get(job) != new
            self._states[job] = new
        self._delay = self.min_delay_s if (changed or force) else min(self._delay * 2, self.max_delay_s)
        self._due = self._clock() + self._delay
