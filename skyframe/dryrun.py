"""``skyframe run --dry-run``: what a run would do with each file, changing nothing.

Each source is scanned as a run scans it (same names refused, same links followed); each file
goes through the pipeline's rules and, when accepted, its processes (in a scratch folder that
is removed: derived files are named, not sent), then the manifest says whether each sink has
this version already. Nothing is queued, recorded or sent; the state directory is only read,
and not created when it does not exist. A running daemon is left alone.

:func:`run_steps` (rules, then processes, on one file) is what ``skyframe test`` runs too.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skyframe.errors import RuleError, SkyframeError
from skyframe.events import FileEvent, Job
from skyframe.pipeline import Pipeline, evaluate_rules
from skyframe.scanner import scan_source
from skyframe.state import Manifest
from skyframe.storage import safe_relative_path


@dataclass
class Decision:
    """What a run would do with one file."""

    pipeline: str
    relpath: str
    size: int
    verdict: str  #: "send", "delivered" (every sink has this version), "reject" or "error"
    reason: str = ""  #: the rule and its reason, or the error
    remote: str = ""  #: the remote name, for accepted files
    #: per sink: "new", "changed" or "delivered"
    sinks: dict[str, str] = field(default_factory=dict)
    derived: list[str] = field(default_factory=list)  #: remote names of derived files


@dataclass
class DryRun:
    """Every decision, in scan order, and their counts."""

    decisions: list[Decision] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)


def dry_run(
    pipelines: list[Pipeline],
    state_dir: Path,
    on_decision: Callable[[Decision], None] | None = None,
) -> DryRun:
    """Decide for every file of every source, as a run would; change nothing."""
    out = DryRun()
    manifest = Manifest(state_dir / "manifest") if (state_dir / "manifest").is_dir() else None
    try:
        for pipeline in pipelines:
            for decision in _decide_all(pipeline, manifest):
                out.decisions.append(decision)
                out.counts[decision.verdict] += 1
                if on_decision is not None:
                    on_decision(decision)
    finally:
        if manifest is not None:
            manifest.close()
    return out


def _decide_all(pipeline: Pipeline, manifest: Manifest | None) -> Iterator[Decision]:
    scratch = Path(tempfile.mkdtemp(prefix="skyframe-dry-run-"))
    try:
        for event in scan_source(
            pipeline.name,
            pipeline.source_root,
            recursive=pipeline.recursive,
            follow_symlinks=pipeline.source.follow_symlinks,
        ):
            yield _decide(pipeline, event, manifest, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _decide(
    pipeline: Pipeline, event: FileEvent, manifest: Manifest | None, scratch: Path
) -> Decision:
    decision = Decision(pipeline.name, event.relpath, event.size, "send")
    outcome = run_steps(pipeline, event, scratch / "job")
    if outcome.error:
        decision.verdict, decision.reason = "error", outcome.error
        return decision
    if outcome.rejection is not None:
        rule, reason = outcome.rejection
        decision.verdict, decision.reason = "reject", f"{rule}: {reason}"
        return decision
    decision.remote, decision.derived = outcome.remote, outcome.derived
    for sink in pipeline.sinks:
        entry = manifest.get(pipeline.name, sink.key, event.relpath) if manifest else None
        if entry is None:
            decision.sinks[sink.key] = "new"
        elif entry.matches(event.size, event.mtime_ns):
            decision.sinks[sink.key] = "delivered"
        else:
            decision.sinks[sink.key] = "changed"
    if decision.sinks and all(state == "delivered" for state in decision.sinks.values()):
        decision.verdict = "delivered"
    return decision


@dataclass
class StepsOutcome:
    """What a pipeline's rules and processes made of one file."""

    rejection: tuple[str, str] | None = None  #: the rule that refused the file, and its reason
    error: str = ""  #: a rule or process failed: the reason a run would dead-letter it with
    remote: str = ""  #: the remote name, for accepted files
    derived: list[str] = field(default_factory=list)  #: remote names of derived files
    meta: dict[str, Any] = field(default_factory=dict)  #: ``job.meta`` once every process ran


def run_steps(pipeline: Pipeline, event: FileEvent, scratch_dir: Path) -> StepsOutcome:
    """Run the pipeline's rules on a file and, when they accept it, its processes, as a run
    does; ``scratch_dir`` is the job's own folder for derived files, removed afterwards."""
    try:
        rejection = evaluate_rules(pipeline.rules, event)
    except RuleError as exc:
        return StepsOutcome(error=str(exc))
    if rejection is not None:
        return StepsOutcome(rejection=rejection)
    job = Job(event, scratch_dir=scratch_dir)
    try:
        for step in pipeline.processes:
            step(job)
        remote = safe_relative_path(job.remote_name)
        derived = [safe_relative_path(d.resolve(remote)) for d in job.derived]
    except SkyframeError as exc:
        return StepsOutcome(error=str(exc))
    except Exception as exc:  # a process of the user's: as a run would dead-letter it
        return StepsOutcome(error=f"{type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(job.scratch_dir, ignore_errors=True)
    return StepsOutcome(remote=remote, derived=derived, meta=job.meta)
