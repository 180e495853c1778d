"""A clock the test moves by hand, and an event that is set after some of its time."""

from __future__ import annotations

import threading


class FakeClock:
    """A monotonic clock the test moves by hand: call it for the time; ``sleep`` advances it
    exactly and records every sleep."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeCancel(threading.Event):
    """An event that is set after ``after`` seconds of (fake) waiting."""

    def __init__(self, fake: FakeClock, after: float) -> None:
        super().__init__()
        self.fake = fake
        self.after = after

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        if timeout < self.after:
            self.fake.now += timeout
            return False
        self.fake.now += self.after
        self.set()
        return True
