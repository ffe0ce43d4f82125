"""Jobs submitted to the local server's POST /run, and the bounded store of their results.

A finished job's answer is kept until it is older than the time limit, or until newer answers push
it out (count and size limits), so a server that takes /run jobs for days holds bounded memory.
The newest answer is always kept, however large, so the client that asked for it can fetch it.
Unfinished jobs are counted with their cost (request bytes), which the server bounds.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum


class JobStatus(str, Enum):
    """RunPod's job statuses."""

    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


FINISHED = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})


@dataclass
class Job:
    id: str
    status: JobStatus = JobStatus.IN_QUEUE
    answer: bytes | None = None  # the serialised /status answer, once finished
    finished_at: float | None = None
    cost: int = 0  # the request's bytes, counted in `JobStore.queued_bytes` until it finishes
    task: asyncio.Task | None = field(default=None, repr=False)  # held so it is not collected

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


class JobStore:
    """Unfinished jobs, and finished answers kept for `ttl_s`, at most `max_finished` of them and
    about `max_bytes` in all (oldest dropped first)."""

    def __init__(
        self,
        *,
        ttl_s: float,
        max_finished: int,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_finished = max_finished
        self.max_bytes = max_bytes
        self._clock = clock
        self._jobs: dict[str, Job] = {}
        self._finished: OrderedDict[str, int] = OrderedDict()  # job id -> answer size, oldest first
        self._finished_bytes = 0
        # /runsync jobs hold no stored answer: counted only, in progress and finished by status.
        self._sync_counts = {status: 0 for status in JobStatus}
        self._unfinished = 0
        self._queued_bytes = 0

    def sync_started(self) -> None:
        self._sync_counts[JobStatus.IN_PROGRESS] += 1

    def sync_finished(self, status: JobStatus) -> None:
        self._sync_counts[JobStatus.IN_PROGRESS] -= 1
        self._sync_counts[status] += 1

    def add(self, cost: int = 0) -> Job:
        job = Job(id=str(uuid.uuid4()), cost=cost)
        self._jobs[job.id] = job
        self._unfinished += 1
        self._queued_bytes += cost
        return job

    @property
    def unfinished_count(self) -> int:
        return self._unfinished

    @property
    def queued_bytes(self) -> int:
        """The summed cost of the unfinished jobs."""
        return self._queued_bytes

    def get(self, job_id: str) -> Job | None:
        self._drop_expired()
        return self._jobs.get(job_id)

    def finish(self, job: Job, status: JobStatus, answer: bytes) -> None:
        if job.finished or job.id not in self._jobs:
            return
        job.status = status
        job.answer = answer
        job.finished_at = self._clock()
        job.task = None
        self._unfinished -= 1
        self._queued_bytes -= job.cost
        self._finished[job.id] = len(answer)
        self._finished_bytes += len(answer)
        self._drop_expired()
        while len(self._finished) > 1 and (
            len(self._finished) > self.max_finished or self._finished_bytes > self.max_bytes
        ):
            self._drop_oldest()

    def unfinished(self) -> list[Job]:
        return [job for job in self._jobs.values() if not job.finished]

    def counts(self) -> dict[str, int]:
        """Jobs by status, in RunPod's /health field names: /run jobs while their answers are
        kept, /runsync jobs since the start."""
        self._drop_expired()
        by_status = dict(self._sync_counts)
        for job in self._jobs.values():
            by_status[job.status] += 1
        return {
            "inQueue": by_status[JobStatus.IN_QUEUE],
            "inProgress": by_status[JobStatus.IN_PROGRESS],
            "completed": by_status[JobStatus.COMPLETED],
            "failed": by_status[JobStatus.FAILED],
            "cancelled": by_status[JobStatus.CANCELLED],
        }

    @property
    def finished_bytes(self) -> int:
        return self._finished_bytes

    def _drop_expired(self) -> None:
        deadline = self._clock() - self.ttl_s
        while self._finished:
            oldest = self._jobs[next(iter(self._finished))]
            if oldest.finished_at is None or oldest.finished_at > deadline:
                break
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        job_id, size = self._finished.popitem(last=False)
        self._finished_bytes -= size
        del self._jobs[job_id]
