"""``skyframe test``: pipeline tests written in YAML beside the config (docs/testing.md).

Each case names a file (its path in the source, and its size, text or a fixture to copy) and
what the pipeline must make of it: accepted or rejected (by which rule, with which reason),
the remote name, derived files and metadata. The file is written to a temporary source folder
and goes through the pipeline's rules and processes as in a run (:func:`run_steps`); nothing
is queued, recorded or sent, and the state directory and the sinks are not touched.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The config's YAML loader: safe, with the position of every key and the expansion bound.
from skyframe.config import YamlPath, format_key, load_yaml
from skyframe.display import escape
from skyframe.dryrun import StepsOutcome, run_steps
from skyframe.errors import ConfigError, Location, SkyframeError, UnsafePathError
from skyframe.events import FileEvent
from skyframe.pipeline import Pipeline
from skyframe.storage import safe_relative_path
from skyframe.units import Size, expand_home

#: ``skyframe.yaml`` is tested by ``skyframe.tests.yaml`` beside it.
TESTS_INFIX = ".tests"
#: Numbers in ``meta`` match when this close, unless the file or the case says otherwise.
DEFAULT_TOLERANCE = 1e-9


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputFile(_Model):
    """The file a case puts in the source folder."""

    path: str = Field(description="its path relative to the source folder")
    size: Size | None = Field(
        None, ge=0, le=2**44, description="that many zero bytes (a sparse file), up to 16 TiB"
    )
    content: str | None = Field(None, description="this text, in UTF-8")
    fixture: str | None = Field(None, description="a copy of this file, relative to the test file")
    mtime: datetime | None = Field(None, description="its modification time (default: now)")

    @field_validator("path")
    @classmethod
    def _relative(cls, path: str) -> str:
        try:
            return safe_relative_path(path)
        except UnsafePathError:
            raise ValueError(
                f"{path!r} is not a path relative to the source folder "
                "(no leading /, no '..', no backslash or control character)"
            ) from None

    @model_validator(mode="after")
    def _one_content(self) -> InputFile:
        given = [k for k in ("size", "content", "fixture") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of size, content or fixture, not {' and '.join(given)}")
        return self


class Expectation(_Model):
    """What the pipeline must make of the file; what is left out is not checked."""

    accepted: bool | None = None
    rejected_by: str | None = None
    reason: str | None = None
    reason_matches: str | None = None
    error: str | None = None
    remote: str | dict[str, str] | None = None
    derived: list[str] | None = None
    meta: dict[str, Any] | None = None
    tolerance: float | None = Field(None, ge=0)

    @field_validator("remote", mode="before")
    @classmethod
    def _remote(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            return value
        raise ValueError("expected a remote name, or a mapping of sink name to remote name")

    @field_validator("reason_matches")
    @classmethod
    def _regex(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
        return pattern

    @model_validator(mode="after")
    def _consistent(self) -> Expectation:
        rejected = [k for k in ("rejected_by", "reason", "reason_matches") if self._has(k)]
        accepted = [k for k in ("remote", "derived", "meta") if self._has(k)]
        if self.error is not None and (rejected or accepted or self.accepted is not None):
            others = ", ".join(k for k in ("accepted", *rejected, *accepted) if self._has(k))
            raise ValueError(f"error cannot be combined with {others}")
        if rejected and accepted:
            raise ValueError(
                f"{rejected[0]} is about a rejected file and {accepted[0]} about an accepted one: "
                "expect one or the other"
            )
        if self.accepted is True and rejected:
            raise ValueError(f"{rejected[0]} says the file is rejected, but accepted is true")
        if self.accepted is False and accepted:
            raise ValueError(f"{accepted[0]} says the file is accepted, but accepted is false")
        return self

    def _has(self, key: str) -> bool:
        return getattr(self, key) is not None

    @property
    def outcome(self) -> str:
        """``accepted``, ``rejected`` or ``error``: what the case expects."""
        if self.error is not None:
            return "error"
        if self.accepted is not None:
            return "accepted" if self.accepted else "rejected"
        rejected = any(self._has(k) for k in ("rejected_by", "reason", "reason_matches"))
        return "rejected" if rejected else "accepted"


class CaseSpec(_Model):
    """One case as written."""

    name: str = Field(min_length=1)
    pipeline: str | None = None
    file: InputFile
    expect: Expectation


class SuiteSpec(_Model):
    """A whole test file."""

    tolerance: float = Field(DEFAULT_TOLERANCE, ge=0)
    tests: list[CaseSpec]

    @field_validator("tests")
    @classmethod
    def _not_empty(cls, tests: list[CaseSpec]) -> list[CaseSpec]:
        if not tests:
            raise ValueError("the list of tests is empty")
        return tests


@dataclass(frozen=True)
class Case:
    """A case, checked against the project: its pipeline exists, its fixture too."""

    name: str
    location: Location  #: where the case starts in its test file
    pipeline: str
    file: InputFile
    fixture: Path | None  #: the fixture's absolute path
    expect: Expectation
    tolerance: float


@dataclass(frozen=True)
class Difference:
    """One expectation the outcome did not meet, written for people."""

    field: str
    expected: str
    actual: str


@dataclass
class CaseResult:
    """A case, what the pipeline made of its file, and what differed."""

    case: Case
    outcome: StepsOutcome
    differences: list[Difference] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when every expectation was met."""
        return not self.differences


# --- finding and loading test files -----------------------------------------------------------


def default_tests_file(config_file: Path) -> Path:
    """``skyframe.yaml`` -> ``skyframe.tests.yaml`` beside it."""
    if config_file.suffix in (".yaml", ".yml"):
        return config_file.with_name(config_file.stem + TESTS_INFIX + config_file.suffix)
    return config_file.with_name(config_file.name + TESTS_INFIX + ".yaml")


def find_test_files(config_file: Path, paths: Sequence[Path] = ()) -> list[Path]:
    """The test files named (a folder stands for every ``*.yaml`` and ``*.yml`` under it), or
    the one beside the config; ConfigError when there is none."""
    if not paths:
        default = default_tests_file(config_file)
        if not default.is_file():
            raise ConfigError(
                f"no tests for {config_file}: write them in {default} (see docs/testing.md), "
                "or name a file or folder with --tests"
            )
        return [default]
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()
            )
            if not found:
                raise ConfigError(f"no test files (*.yaml, *.yml) in the folder {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"test file not found: {path}")
    return list(dict.fromkeys(files))


class _Positions:
    """Where each key of a test file is, as the config's errors say it."""

    def __init__(self, shown: str, marks: dict[YamlPath, tuple[int, int]]) -> None:
        self.shown = shown
        self.marks = marks

    def locate(self, path: YamlPath) -> Location:
        for end in range(len(path), -1, -1):
            mark = self.marks.get(path[:end])
            if mark is not None:
                return Location(self.shown, *mark)
        return Location(self.shown, 1, 1)

    def error(self, message: str, path: YamlPath) -> ConfigError:
        return ConfigError(message, self.locate(path), format_key(path))


def load_tests(file: Path, pipelines: Sequence[Pipeline]) -> list[Case]:
    """Read and check a test file against the project's pipelines; ConfigError, naming file,
    line and key, at the first problem."""
    shown = str(file)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"test file not found: {shown}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read test file {shown}: {exc}") from None
    data, marks = load_yaml(text, shown)
    where = _Positions(shown, marks)
    if not isinstance(data, dict):
        problem = "is empty" if data is None else "must be a mapping"
        raise where.error(f"the test file {problem}: write tests: [...] (see docs/testing.md)", ())
    try:
        spec = SuiteSpec.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc, where) from None
    by_name = {p.name: p for p in pipelines}
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for i, case in enumerate(spec.tests):
        at: YamlPath = ("tests", i)
        if case.name in seen:
            line = where.locate(("tests", seen[case.name])).line
            raise where.error(f"two tests named {case.name!r} (the other at line {line})", at)
        seen[case.name] = i
        tolerance = case.expect.tolerance
        cases.append(
            Case(
                name=case.name,
                location=where.locate(at),
                pipeline=_pipeline_of(case, by_name, where, at),
                file=case.file,
                fixture=_fixture_of(case.file, file.parent, where, (*at, "file", "fixture")),
                expect=case.expect,
                tolerance=spec.tolerance if tolerance is None else tolerance,
            )
        )
    return cases


def _pipeline_of(
    case: CaseSpec, pipelines: dict[str, Pipeline], where: _Positions, at: YamlPath
) -> str:
    names = list(pipelines)
    if case.pipeline is None:
        if len(names) == 1:
            return names[0]
        raise where.error(f"which pipeline? add pipeline: (one of {', '.join(names)})", at)
    if case.pipeline not in pipelines:
        close = difflib.get_close_matches(case.pipeline, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise where.error(
            f"no pipeline named {case.pipeline!r} ({hint}the config has: {', '.join(names)})",
            (*at, "pipeline"),
        )
    return case.pipeline


def _fixture_of(spec: InputFile, base: Path, where: _Positions, at: YamlPath) -> Path | None:
    if spec.fixture is None:
        return None
    try:
        path = (base / expand_home(spec.fixture)).absolute()
    except ValueError as exc:
        raise where.error(f"fixture {exc}", at) from None
    if not path.is_file():
        problem = "is not a file" if path.exists() else "not found"
        raise where.error(f"fixture {spec.fixture} {problem} (relative to the test file)", at)
    return path


def _validation_error(exc: ValidationError, where: _Positions) -> ConfigError:
    """pydantic's errors as ConfigErrors at their places in the file, in the file's order."""
    found = []
    for error in exc.errors(include_url=False, include_input=False):
        path = tuple(
            p
            for p in error["loc"]
            if isinstance(p, int) or not (str(p).startswith("function-") or p == "[key]")
        )
        found.append(_describe(error["type"], str(error["msg"]), path, where))
    found.sort(key=lambda e: (e.location.line, e.location.column) if e.location else (0, 0))
    return ConfigError(found[0].message, found[0].location, found[0].key, found[1:])


#: The keys of each mapping in a test file, by the last key of its path.
_MODELS: dict[str, type[BaseModel]] = {
    "": SuiteSpec,
    "tests": CaseSpec,
    "file": InputFile,
    "expect": Expectation,
}


def _describe(kind: str, message: str, path: YamlPath, where: _Positions) -> ConfigError:
    if kind == "extra_forbidden":
        parent = next((str(p) for p in reversed(path[:-1]) if isinstance(p, str)), "")
        known = [k for k in _MODELS[parent].model_fields] if parent in _MODELS else []
        close = difflib.get_close_matches(str(path[-1]), known, n=1)
        hint = f": did you mean {close[0]!r}?" if close else ""
        expected = f" (expected one of: {', '.join(known)})" if known else ""
        return where.error(f"unknown key {path[-1]!r}{hint}{expected}", path)
    if path and path[-1] == "mtime":
        return where.error(
            "expected a time such as 2024-05-17T10:15:02Z (UTC when it has no offset), "
            "a date, or seconds since 1970",
            path,
        )
    if kind == "missing":
        return ConfigError(
            f"missing required key {path[-1]!r}", where.locate(path), format_key(path[:-1])
        )
    return where.error(message.removeprefix("Value error, "), path)


# --- running ----------------------------------------------------------------------------------


def run_tests(
    cases: Iterable[Case],
    pipelines: Sequence[Pipeline],
    on_result: Callable[[CaseResult], None] | None = None,
) -> list[CaseResult]:
    """Run every case, each in a temporary source folder of its own; nothing is sent."""
    by_name = {p.name: p for p in pipelines}
    results = []
    with tempfile.TemporaryDirectory(prefix="skyframe-test-") as tmp:
        for i, case in enumerate(cases):
            result = run_case(case, by_name[case.pipeline], Path(tmp) / f"case-{i}")
            results.append(result)
            if on_result is not None:
                on_result(result)
    return results


def run_case(case: Case, pipeline: Pipeline, workdir: Path) -> CaseResult:
    """Put the case's file in ``workdir``, run the pipeline's steps on it, compare."""
    path = workdir / "source" / case.file.path
    try:
        try:
            _write_input(case, path)
            st = path.stat()
        except OSError as exc:
            raise SkyframeError(
                f"{case.location}: cannot write the file of test {case.name!r}: {exc}"
            ) from None
        event = FileEvent.from_stat(pipeline.name, path, case.file.path, st, "scanned")
        outcome = run_steps(pipeline, event, workdir / "scratch")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    sinks = [s.key for s in pipeline.sinks]
    return CaseResult(case, outcome, compare(case, outcome, sinks))


def _write_input(case: Case, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = case.file
    if case.fixture is not None:
        shutil.copyfile(case.fixture, path)
    elif spec.content is not None:
        path.write_bytes(spec.content.encode("utf-8"))
    else:
        with path.open("wb") as f:
            f.truncate(spec.size or 0)  # sparse where the file system allows it
    if spec.mtime is not None:
        when = spec.mtime if spec.mtime.tzinfo else spec.mtime.replace(tzinfo=UTC)
        delta = when - datetime(1970, 1, 1, tzinfo=UTC)
        ns = (delta.days * 86400 + delta.seconds) * 10**9 + delta.microseconds * 1000
        os.utime(path, ns=(ns, ns))


# --- comparing --------------------------------------------------------------------------------


def compare(case: Case, outcome: StepsOutcome, sinks: Sequence[str]) -> list[Difference]:
    """Every expectation of ``case`` that ``outcome`` does not meet."""
    expect = case.expect
    actual = "error" if outcome.error else "rejected" if outcome.rejection else "accepted"
    if expect.outcome == "error":
        if actual == "error" and expect.error is not None and expect.error in outcome.error:
            return []
        return [
            Difference("error", f"an error containing {_show(expect.error)}", _summary(outcome))
        ]
    if actual != expect.outcome:
        wanted = expect.outcome
        if wanted == "rejected" and expect.rejected_by is not None:
            wanted += f" by {expect.rejected_by}"
        return [Difference("accepted", wanted, _summary(outcome))]
    if outcome.rejection is not None:
        return _compare_rejection(expect, *outcome.rejection)
    return _compare_accepted(case, outcome, sinks)


def _compare_accepted(case: Case, outcome: StepsOutcome, sinks: Sequence[str]) -> list[Difference]:
    expect = case.expect
    out = _compare_remote(expect.remote, outcome.remote, sinks)
    if expect.derived is not None and sorted(expect.derived) != sorted(outcome.derived):
        out.append(
            Difference("derived", _show(sorted(expect.derived)), _show(sorted(outcome.derived)))
        )
    if expect.meta is not None:
        try:
            meta = json.loads(json.dumps(outcome.meta, default=str))
        except (TypeError, ValueError) as exc:  # a circular structure: a run fails on it too
            out.append(
                Difference("meta", "metadata a run can record", f"{type(exc).__name__}: {exc}")
            )
        else:
            _compare_meta(expect.meta, meta, "meta", case.tolerance, out)
    return out


def _compare_remote(
    expected: str | dict[str, str] | None, remote: str, sinks: Sequence[str]
) -> list[Difference]:
    """Every sink receives the file under the same remote name, relative to its root."""
    if expected is None:
        return []
    if isinstance(expected, str):
        return [] if expected == remote else [Difference("remote", _show(expected), _show(remote))]
    out = []
    for sink, name in expected.items():
        if sink not in sinks:
            there = f"no sink named {sink!r} (the pipeline has: {', '.join(sinks)})"
            out.append(Difference(f"remote[{sink}]", _show(name), there))
        elif name != remote:
            out.append(Difference(f"remote[{sink}]", _show(name), _show(remote)))
    return out


def _compare_rejection(expect: Expectation, rule: str, reason: str) -> list[Difference]:
    out = []
    if expect.rejected_by is not None and expect.rejected_by != rule:
        out.append(Difference("rejected_by", _show(expect.rejected_by), _show(rule)))
    if expect.reason is not None and expect.reason not in reason:
        out.append(Difference("reason", f"containing {_show(expect.reason)}", _show(reason)))
    if expect.reason_matches is not None and not re.search(expect.reason_matches, reason):
        out.append(
            Difference("reason_matches", f"matching /{expect.reason_matches}/", _show(reason))
        )
    return out


_MISSING = "(missing)"


def _compare_meta(
    expected: Any, actual: Any, where: str, tolerance: float, out: list[Difference]
) -> None:
    """Only what ``expected`` names is compared: a mapping's other keys may be anything."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        for key, value in expected.items():
            if key not in actual:
                if value is not None:  # null stands for "absent or null"
                    out.append(Difference(f"{where}.{key}", _show(value), _MISSING))
                continue
            _compare_meta(value, actual[key], f"{where}.{key}", tolerance, out)
        return
    if not _matches(expected, actual, tolerance):
        label = where
        if tolerance and (isinstance(expected, float) or isinstance(actual, float)):
            label += f" (tolerance {tolerance:g})"
        out.append(Difference(label, _show(expected), _show(actual)))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _matches(expected: Any, actual: Any, tolerance: float) -> bool:
    if _is_number(expected) and _is_number(actual):
        return math.isclose(expected, actual, rel_tol=0.0, abs_tol=tolerance)
    if isinstance(expected, bool) or isinstance(actual, bool):
        return expected is actual
    if isinstance(expected, date) and isinstance(actual, str):
        return _same_time(expected, actual)
    if isinstance(expected, dict) and isinstance(actual, dict):
        return all(
            (k in actual and _matches(v, actual[k], tolerance)) or (k not in actual and v is None)
            for k, v in expected.items()
        )
    if isinstance(expected, list) and isinstance(actual, list):
        return len(expected) == len(actual) and all(
            _matches(e, a, tolerance) for e, a in zip(expected, actual, strict=True)
        )
    return bool(expected == actual)


def _same_time(expected: date, actual: str) -> bool:
    """An unquoted YAML date or time against the text a process recorded."""
    try:
        got = datetime.fromisoformat(actual)
    except ValueError:
        return False
    if not isinstance(expected, datetime):
        return got.date() == expected and got.time() == datetime.min.time()
    if (expected.tzinfo is None) != (got.tzinfo is None):
        return False
    return got == expected


def _show(value: Any) -> str:
    """A value as JSON: strings quoted, so that a trailing space or an empty name shows."""
    if isinstance(value, date):
        value = value.isoformat()
    return json.dumps(value, ensure_ascii=False, default=str)


def _summary(outcome: StepsOutcome) -> str:
    if outcome.error:
        return f"error: {outcome.error}"
    if outcome.rejection is not None:
        rule, reason = outcome.rejection
        return f"rejected by {rule}: {_show(reason)}"
    return f"accepted -> {_show(outcome.remote)}"


# --- reporting --------------------------------------------------------------------------------


def report(result: CaseResult) -> list[str]:
    """``ok`` and the case's name, or ``FAIL``, its place, and each difference as
    ``- expected`` / ``+ actual`` lines."""
    case = result.case
    name = escape(case.name)
    if result.passed:
        return [f"ok    {name}"]
    where = f"{case.location.file}:{case.location.line}"
    lines = [f"FAIL  {name}  ({escape(where)}, pipeline {case.pipeline})"]
    for d in result.differences:
        lines += [
            f"      {escape(d.field)}:",
            f"        - expected: {escape(d.expected)}",
            f"        + actual:   {escape(d.actual)}",
        ]
    return lines


def select(cases: Iterable[Case], filters: Sequence[str]) -> list[Case]:
    """The cases whose name contains one of ``filters`` (case-insensitive); all without."""
    wanted = [f.casefold() for f in filters]
    return [c for c in cases if not wanted or any(w in c.name.casefold() for w in wanted)]
