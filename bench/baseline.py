"""Which skyframe a benchmark runs: this checkout's, or another checkout's (``--baseline DIR``).

Both run with this venv's interpreter and libraries. The venv holds skyframe installed in
editable mode from this checkout, a ``.pth`` entry that comes after the entries of
``PYTHONPATH``; with another checkout first on ``PYTHONPATH``, ``import skyframe`` (also in the
venv's ``skyframe`` console script) finds that checkout's package instead. Each `Code` carries
the environment for its runs, and is checked against the package a fresh interpreter then
imports (with ``-P``: the working directory does not count, as for the console script or a
``python -m skyframe`` started outside the checkout). The current code is whatever the
environment imports: this checkout, or a checkout put first on ``PYTHONPATH`` when the
benchmark starts (say, a worktree of HEAD while this one holds uncommitted edits).

A checkout with another module layout works as long as it is complete: plugins installed in
the venv that need the other layout fail to load there, which skyframe reports with one
warning and skips (an entry point that fails costs about as little as one that loads).
"""

from __future__ import annotations

import argparse
import compileall
import dataclasses
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Code:
    """One version of skyframe to run: its label, its environment, the package it imports."""

    label: str  #: "current" or "base"
    env: dict[str, str]
    package: Path  #: the folder of the skyframe package it imports
    commit: str  #: e.g. "5893990", "fe878fa + changes" when the package differs from HEAD


def _imported_package(env: dict[str, str]) -> Path:
    """The skyframe package a fresh interpreter with this environment imports."""
    out = subprocess.run(
        [sys.executable, "-P", "-c", "import skyframe; print(skyframe.__file__)"],
        env=env,
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"cannot import skyframe: {out.stderr.strip()}")
    return Path(out.stdout.strip()).resolve().parent


def _commit(checkout: Path) -> str:
    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(checkout), *args], capture_output=True, text=True, check=False
        )
        return out.stdout.strip() if out.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "?"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", "skyframe")
    return f"{head} + changes" if changed else head


def current() -> Code:
    """The code this environment imports: this checkout's, as the venv has it installed, or
    the checkout first on ``PYTHONPATH`` (e.g. a worktree of HEAD, to leave out uncommitted
    edits in this one)."""
    env = dict(os.environ)
    package = _imported_package(env)
    return Code("current", env, package, _commit(package.parent))


def baseline(checkout: Path, current: Code) -> Code:
    """The code of another checkout (e.g. a `git worktree` of an earlier commit)."""
    checkout = checkout.resolve()
    if not (checkout / "skyframe" / "__init__.py").is_file():
        raise SystemExit(f"--baseline {checkout}: no skyframe package there")
    if checkout / "skyframe" == current.package:
        raise SystemExit(f"--baseline {checkout}: that is the current code")
    env = dict(current.env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(checkout), env.get("PYTHONPATH")]))
    package = _imported_package(env)
    if package != checkout / "skyframe":
        raise SystemExit(f"--baseline {checkout}: skyframe is imported from {package} instead")
    return Code("base", env, package, _commit(checkout))


def compile_bytecode(code: Code) -> bool:
    """Write the package's bytecode before the runs, as installing a package does.

    A source checkout has none until a first import writes it, which PYTHONDONTWRITEBYTECODE
    (set on some machines) prevents; every run would then compile the sources again, about
    0.1 s that no installed copy pays, and the same for both versions only if both lack it.
    """
    return bool(compileall.compile_dir(code.package, quiet=1))


def add_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """The ``--baseline DIR`` option of a benchmark."""
    parser.add_argument("--baseline", type=Path, metavar="DIR", help=help)


def prepare(
    checkout: Path | None, name: Callable[[Code], str] = lambda code: code.label
) -> list[Code]:
    """The versions a benchmark runs: the code of ``checkout`` first when one is given (see
    :func:`baseline`), then the current code; each with its bytecode written, and a line
    printed that says which package it is (named by ``name``)."""
    codes = [current()]
    if checkout is not None:
        codes.insert(0, baseline(checkout, codes[0]))
    for code in codes:
        written = compile_bytecode(code)
        print(
            f"{name(code)}: {code.package} ({code.commit}), "
            f"bytecode {'written' if written else 'NOT written'}",
            flush=True,
        )
    return codes
