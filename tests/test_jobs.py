"""The /run job store keeps finished answers for a bounded time, count and size."""

from __future__ import annotations

from embedding_worker.transports.jobs import JobStatus, JobStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def store(clock: Clock, **limits) -> JobStore:
    settings = {"ttl_s": 60.0, "max_finished": 100, "max_bytes": 10_000, **limits}
    return JobStore(clock=clock, **settings)


def finish(jobs: JobStore, size: int = 10, status: JobStatus = JobStatus.COMPLETED):
    job = jobs.add()
    jobs.finish(job, status, b"x" * size)
    return job


def test_finished_answers_beyond_the_count_drop_oldest_first():
    jobs = store(Clock(), max_finished=3)
    finished = [finish(jobs) for _ in range(5)]
    assert [jobs.get(j.id) is not None for j in finished] == [False, False, True, True, True]
    assert jobs.counts()["completed"] == 3


def test_finished_answers_expire_after_the_time_limit():
    clock = Clock()
    jobs = store(clock, ttl_s=60.0)
    old = finish(jobs)
    clock.now += 30
    newer = finish(jobs)
    clock.now += 31  # old is 61 s old, newer 31 s
    assert jobs.get(old.id) is None
    assert jobs.get(newer.id) is newer
    clock.now += 30
    assert jobs.get(newer.id) is None
    assert jobs.finished_bytes == 0


def test_size_bound_drops_oldest_but_always_keeps_the_newest():
    jobs = store(Clock(), max_bytes=100)
    first, second = finish(jobs, 40), finish(jobs, 40)
    third = finish(jobs, 40)  # 120 bytes: the oldest goes
    assert jobs.get(first.id) is None
    assert jobs.get(second.id) and jobs.get(third.id)
    assert jobs.finished_bytes == 80
    huge = finish(jobs, 500)  # over the bound on its own: kept, everything older goes
    assert jobs.get(huge.id) is huge
    assert jobs.get(second.id) is None and jobs.get(third.id) is None
    assert jobs.finished_bytes == 500


def test_unfinished_jobs_are_never_dropped_by_the_bounds():
    clock = Clock()
    jobs = store(clock, max_finished=1, ttl_s=1.0)
    waiting = jobs.add()
    for _ in range(3):
        finish(jobs)
    clock.now += 100
    assert jobs.get(waiting.id) is waiting
    assert jobs.unfinished() == [waiting]
    assert jobs.counts() == {
        "inQueue": 1,
        "inProgress": 0,
        "completed": 0,
        "failed": 0,
        "cancelled": 0,
    }


def test_a_finished_job_is_not_finished_again():
    jobs = store(Clock())
    job = jobs.add()
    jobs.finish(job, JobStatus.CANCELLED, b'{"status": "CANCELLED"}')
    jobs.finish(job, JobStatus.COMPLETED, b"late answer")  # the task ended after the cancel
    assert job.status is JobStatus.CANCELLED
    assert job.answer == b'{"status": "CANCELLED"}'
    assert jobs.finished_bytes == len(b'{"status": "CANCELLED"}')


def test_unfinished_jobs_count_with_their_cost_until_they_finish():
    jobs = store(Clock())
    first, second = jobs.add(cost=100), jobs.add(cost=50)
    assert (jobs.unfinished_count, jobs.queued_bytes) == (2, 150)
    jobs.finish(first, JobStatus.CANCELLED, b"{}")
    jobs.finish(first, JobStatus.COMPLETED, b"{}")  # a late second finish releases nothing
    assert (jobs.unfinished_count, jobs.queued_bytes) == (1, 50)
    jobs.finish(second, JobStatus.COMPLETED, b"{}")
    assert (jobs.unfinished_count, jobs.queued_bytes) == (0, 0)
