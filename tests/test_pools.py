"""PriorityPool: urgent tasks first, an express thread for them, big tasks never stopped."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from skyframe.pools import PriorityPool

TIMEOUT = 5.0


class Task:
    """A task that says when it started and runs until released."""

    def __init__(self, name: str, log: list[str], *, hold: bool = True) -> None:
        self.name = name
        self.log = log
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self) -> None:
        self.log.append(self.name)
        self.started.set()
        assert self.release.wait(TIMEOUT)


@pytest.fixture
def pool() -> Iterator[PriorityPool]:
    pool = PriorityPool(1, name="test-pool")
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


def test_an_urgent_task_runs_on_the_express_thread_while_workers_are_busy(
    pool: PriorityPool,
) -> None:
    log: list[str] = []
    video = Task("video", log)
    pool.submit(video)
    assert video.started.wait(TIMEOUT)
    photo = Task("photo", log, hold=False)
    pool.submit(photo, urgent=True)
    assert photo.started.wait(TIMEOUT)  # while the video still runs
    assert not video.release.is_set()
    video.release.set()


def test_the_express_thread_never_takes_other_tasks(pool: PriorityPool) -> None:
    log: list[str] = []
    first, second = Task("video1", log), Task("video2", log, hold=False)
    pool.submit(first)
    assert first.started.wait(TIMEOUT)
    pool.submit(second)
    assert not second.started.wait(0.2)  # waits for the one worker, not the express thread
    first.release.set()
    assert second.started.wait(TIMEOUT)


def test_waiting_urgent_tasks_start_before_waiting_others() -> None:
    pool = PriorityPool(1, express=0)
    log: list[str] = []
    blocker = Task("blocker", log)
    pool.submit(blocker)
    assert blocker.started.wait(TIMEOUT)
    tasks = [Task(name, log, hold=False) for name in ("video1", "photo1", "video2", "photo2")]
    for task in tasks:
        pool.submit(task, urgent=task.name.startswith("photo"))
    assert pool.waiting == 4
    blocker.release.set()
    assert tasks[2].started.wait(TIMEOUT)
    assert log == ["blocker", "photo1", "photo2", "video1", "video2"]
    pool.shutdown(wait=True)


def test_threads_start_only_as_needed_and_up_to_the_limit() -> None:
    pool = PriorityPool(3, name="lazy")
    log: list[str] = []
    tasks = [Task(f"t{n}", log) for n in range(5)]
    for task in tasks:
        pool.submit(task)
    for task in tasks[:3]:
        assert task.started.wait(TIMEOUT)
    assert not tasks[3].started.wait(0.1)  # three workers; the express one takes none of these
    names = {t.name for t in threading.enumerate() if t.name.startswith("lazy-")}
    assert names == {"lazy-1", "lazy-2", "lazy-3"}
    for task in tasks:
        task.release.set()
    pool.shutdown(wait=True)
    assert sorted(log) == ["t0", "t1", "t2", "t3", "t4"]


def test_shutdown_drops_what_has_not_started_and_refuses_more() -> None:
    pool = PriorityPool(1)
    log: list[str] = []
    running, waiting = Task("running", log), Task("waiting", log, hold=False)
    pool.submit(running)
    assert running.started.wait(TIMEOUT)
    pool.submit(waiting)
    pool.shutdown(wait=False, cancel_futures=True)
    with pytest.raises(RuntimeError):
        pool.submit(waiting)
    running.release.set()  # a task under way is never stopped
    pool.shutdown(wait=True)
    assert log == ["running"]


def test_a_failing_task_is_logged_and_the_thread_goes_on(
    pool: PriorityPool, caplog: pytest.LogCaptureFixture
) -> None:
    def boom() -> None:
        raise RuntimeError("a bug")

    log: list[str] = []
    after = Task("after", log, hold=False)
    pool.submit(boom)
    pool.submit(after)
    assert after.started.wait(TIMEOUT)
    assert "a task of test-pool failed" in caplog.text
