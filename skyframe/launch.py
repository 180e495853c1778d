"""The ``skyframe`` command's entry point, light enough to load before anything else.

Loading the command line and the libraries it needs is a noticeable part of a short run. This
module pauses Python's cyclic garbage collector first (see :class:`StartupGC`), and a Ctrl-C
that comes while they load ends the command with one line and exit code 130, as a Ctrl-C
later does, rather than with a Python traceback.
"""

from __future__ import annotations

import gc
import sys


class StartupGC:
    """The pause of the cyclic garbage collector while the command line starts.

    Loading the storage libraries and building their clients makes tens of thousands of
    objects that live as long as the process; the collector's repeated passes over them, with
    the last one at exit, took a noticeable share of a short run (measured in CHANGELOG.md).
    ``run`` ends the pause once the sinks have answered the pre-flight check (with ``--once``
    the engine is built and the scan under way by then); other commands when they end.
    """

    paused = False

    @classmethod
    def pause(cls) -> None:
        if gc.isenabled():
            gc.disable()
            cls.paused = True

    @classmethod
    def settle(cls) -> None:
        """End the pause; no-op when there is none.

        What start-up created (modules, clients, the project) is frozen first: it lives as
        long as the process, so later collections, and the one at exit, need not go through
        it again. The little cyclic garbage start-up left is frozen with it, once: a full
        collection to free it first would cost more time than that garbage is worth.
        """
        if cls.paused:
            cls.paused = False
            gc.freeze()
            gc.enable()


def main() -> None:
    """Console-script entry point: load the command line, then run it."""
    StartupGC.pause()
    try:
        from skyframe.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("skyframe: interrupted while starting\n")
        raise SystemExit(130) from None
    cli_main()
