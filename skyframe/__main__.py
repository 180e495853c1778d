"""``python -m skyframe``."""

from __future__ import annotations

from skyframe.cli import main

main()
