"""Warnings ignored for a block, in one thread at a time (``skyframe.quiet``)."""

from __future__ import annotations

import threading
import warnings

from skyframe.quiet import ignored_warnings


def test_only_the_category_and_message_asked_for_are_ignored() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with ignored_warnings(UserWarning, "project not set"):
            warnings.warn("project not set, using none", UserWarning, stacklevel=1)
            warnings.warn("another thing", UserWarning, stacklevel=1)
            warnings.warn("project not set", DeprecationWarning, stacklevel=1)
        warnings.warn("project not set, after", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == [
        "another thing",
        "project not set",
        "project not set, after",
    ]


def test_two_threads_take_turns_and_put_the_filters_back() -> None:
    # With warnings.catch_warnings() alone, the second block would start inside the first
    # and put back, as it ends, the list holding the first one's filter.
    before = list(warnings.filters)
    inside, leave = threading.Event(), threading.Event()
    order: list[str] = []

    def first() -> None:
        with ignored_warnings(RuntimeWarning):
            order.append("first in")
            inside.set()
            leave.wait(5)
            order.append("first out")

    def second() -> None:
        inside.wait(5)
        with ignored_warnings(UserWarning):
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    assert inside.wait(5)
    threads[1].join(0.3)
    assert order == ["first in"]  # the second waits for the first to end
    leave.set()
    for thread in threads:
        thread.join(5)
    assert order == ["first in", "first out", "second in"]
    assert warnings.filters == before
