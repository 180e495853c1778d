"""Cancel resumable uploads that were left behind (``skyframe cleanup``).

An upload interrupted for good (its file deleted, the job dead-lettered, the sink removed
from the config) keeps its journal record, and on the server an S3 multipart upload (whose
parts are billed), a GCS resumable session or a hidden SFTP temporary file. These are the
uploads skyframe started itself: only journaled ones are touched, and only once their record
has not moved for the given age, so an upload still under way is never cancelled.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from skyframe.journal import JournalKey, UploadJournal, stale_uploads
from skyframe.protocols import Protocol, Protocols
from skyframe.storage import Sink, TransferRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cleaned:
    """One stale upload and what became of it."""

    key: JournalKey
    protocol: str
    idle: float  #: seconds since its record last moved
    done: str  #: what was found or cancelled, for people
    ok: bool  #: False when it could not be cancelled (its record is kept)


def span(seconds: float) -> str:
    """A duration for people: ``45s``, ``12m``, ``3h05m``, ``2d04h``."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def describe(record: dict[str, Any], spec: Protocol | None) -> str:
    """What the server holds for an upload, as far as the journal knows (as its protocol
    says)."""
    if spec is not None and spec.describe_upload is not None:
        return spec.describe_upload(record)
    return f"{record.get('protocol')} upload"


def cancel(sink: Sink, record: dict[str, Any]) -> None:
    """Cancel one upload on its sink (one already gone is fine), as its protocol does."""
    spec = sink.spec
    if spec is None or spec.cancel_upload is None:
        raise ValueError(f"{sink.display}: no way to cancel a {record.get('protocol')} upload")
    spec.cancel_upload(sink.fs, record)


def cleanup(
    journal: UploadJournal,
    sinks: dict[str, Sink],
    older_than: float,
    *,
    dry_run: bool = False,
    protocols: Protocols | None = None,
) -> list[Cleaned]:
    """Cancel every journaled upload idle for ``older_than`` seconds on a configured sink."""
    now = time.time()
    out = []
    for key, record in stale_uploads(journal, older_than, now):
        protocol = str(record.get("protocol"))
        idle = now - float(record["updated_at"])
        sink = sinks.get(key.sink)
        spec = sink.spec if sink is not None else None
        if spec is None and protocols is not None:  # a sink no longer in the config
            spec = protocols.named(protocol)
        what = describe(record, spec)
        if sink is None:
            out.append(Cleaned(key, protocol, idle, f"{what}; sink not in the config", False))
            continue
        if dry_run:
            out.append(Cleaned(key, protocol, idle, f"{what}; would cancel", True))
            continue
        try:
            with sink.guard():
                cancel(sink, record)
        except Exception as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            out.append(Cleaned(key, protocol, idle, f"{what}; not cancelled: {reason}", False))
            continue
        journal.forget(key)
        out.append(Cleaned(key, protocol, idle, f"{what}; cancelled", True))
    return out


def drop_stale(request: TransferRequest) -> None:
    """Cancel a journaled upload to this request's path that it will not resume (the file is
    now small enough for one request), and drop its record; if it cannot be cancelled now, the
    record stays for ``skyframe cleanup``."""
    journal = request.journal
    record = journal.get(request.journal_key) if journal is not None else None
    if journal is None or record is None:
        return
    try:
        cancel(request.sink, record)
    except Exception as exc:
        log.info(
            "%s: could not cancel the stale upload of %s: %s",
            request.sink.display,
            request.remote_path,
            exc,
        )
        return
    journal.forget(request.journal_key)
