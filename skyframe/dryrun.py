"""``skyframe run --dry-run``: what a run would do with each file, changing nothing.

Each source is scanned as a run scans it (same names refused, same links followed); each file
goes through the pipeline's rules and, when accepted, its processes (in a scratch folder that
is removed: derived files are named, not sent), then the manifest says whether each sink has
this version already. Nothing is queued, recorded or sent; the state directory is only read,
and not created when it does not exist. A running daemon is left alone.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

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
    try:
        rejection = evaluate_rules(pipeline.rules, event)
    except RuleError as exc:
        decision.verdict, decision.reason = "error", str(exc)
        return decision
    if rejection is not None:
        decision.verdict, decision.reason = "reject", f"{rejection[0]}: {rejection[1]}"
        return decision
    job = Job(event, scratch_dir=scratch / "job")
    try:
        for step in pipeline.processes:
            step(job)
        decision.remote = safe_relative_path(job.remote_name)
        decision.derived = [safe_relative_path(d.resolve(decision.remote)) for d in job.derived]
    except SkyframeError as exc:
        decision.verdict, decision.reason = "error", str(exc)
        return decision
    except Exception as exc:  # a process of the user's: as a run would dead-letter it
        decision.verdict, decision.reason = "error", f"{type(exc).__name__}: {exc}"
        return decision
    finally:
        shutil.rmtree(job.scratch_dir, ignore_errors=True)
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
