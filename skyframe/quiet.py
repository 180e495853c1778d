"""Warnings ignored for the length of a block, safely when several threads do it.

:func:`warnings.catch_warnings` swaps the process's list of warning filters for a copy and
puts the saved list back at the end. Two such blocks in two threads at once can each put back
the list the other made: a worker's "ignore" filter then stays for good, and the daemon stops
showing any warning, of any code. The processing steps (``geotag``, ``thumbnail``) and the
sinks' connections run in pools of threads, so skyframe's own blocks take turns here.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator

_turns = threading.RLock()


@contextlib.contextmanager
def ignored_warnings(category: type[Warning] = Warning, message: str = "") -> Iterator[None]:
    """Ignore the warnings of ``category`` (whose text starts with ``message``, a regular
    expression) raised inside the block, in any thread, and no others after it.

    Keep the block short: another thread's block waits for it."""
    with _turns, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message, category)
        yield
