"""``python -m skyframe``."""

from __future__ import annotations

from skyframe.launch import main

main()
