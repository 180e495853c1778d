"""S3 transfer: straight to the final key, which S3 publishes atomically.

A file smaller than one part goes in a single PUT carrying its sha256 as object metadata
(``x-amz-meta-sha256``). A larger file goes as a multipart upload that survives crashes and
dropped links:

- the file is hashed first (S3 takes metadata only when the upload is created), then the
  upload id, part size and digest are journaled before the first part is sent;
- every part the server confirms is journaled with its ETag;
- a later attempt asks the server which parts it holds (``list_parts``, paged), checks each
  against the local bytes (size, and the ETag where it is the part's MD5) and sends only the
  missing ones, reading one part ahead per slot;
- the parts in flight are lost when the connection drops, so on a slow link there are fewer
  of them and smaller: as many as the link carries in :data:`IN_FLIGHT_SECONDS` (at least one,
  at most ``part_concurrency``), by the rate this upload measures as its parts are confirmed
  (at first the rate the sink's last large upload measured), and parts of about a second of
  the link (``part_size`` at most, S3's 5 MiB at least; a resumed upload keeps its own);
- below ``part_concurrency``, and while no other file goes to the sink, one more part goes
  when the oldest in flight is expected to be :data:`LEAD` of its time from its end, so that
  the link carries it while the server's answer comes back; when the other files are done
  while a part is in flight, the next one goes at once, and so does the one after a part
  that shared the link (its time says nothing of the link alone);
- the upload is completed only once the file is known unchanged. A file that changed since
  the journal, or while it was read, gets its stale upload aborted and starts anew.

On any other error (a dropped link, a kill) the upload stays on the server for the next
attempt; ``skyframe cleanup`` aborts the ones left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections import deque
from concurrent import futures
from concurrent.futures import Future
from typing import Any

from fsspec.asyn import get_loop, sync

from skyframe.errors import DeliveryError, SourceChangedError, SourceUnreadableError
from skyframe.journal import JournalKey, UploadJournal, same_file
from skyframe.protocols.batching import Put, read_whole, send_batch
from skyframe.protocols.s3 import backend
from skyframe.protocols.s3.backend import S3Options
from skyframe.protocols.s3.direct import DirectS3
from skyframe.storage import (
    BatchTransfer,
    Sink,
    SourceReader,
    TransferRequest,
    TransferResult,
)

log = logging.getLogger(__name__)

CLOCK_SLACK = 60.0  #: seconds the server's clock may differ from ours
#: Seconds of the link the parts in flight may hold: a cut loses them (half sent, on average),
#: so that a cut costs about a second of the link.
IN_FLIGHT_SECONDS = 2.0
#: Confirmed parts the rate is measured over (the latest ones: it follows a changing link).
RATE_PARTS = 4
#: Share of a part's expected time before its end at which the next part may go, although the
#: parts in flight are all there may be: the server's answer takes a round trip after the last
#: byte, and the link would stand idle meanwhile. A fifth of a part (parts are about a second
#: of the link) covers the round trips of mobile links; a slow satellite link's parts are
#: longer, and so is the lead.
LEAD = 0.2
_PLAIN_ETAG = re.compile(r'^"?([0-9a-f]{32})"?$')


def cancel_upload(fs: Any, record: dict[str, Any]) -> None:
    """Abort a journaled multipart upload (by its id, or by key and time when the process
    died before noting the id)."""
    bucket, key = record["bucket"], record["key"]
    if record.get("upload_id"):
        abort_upload(fs, bucket, key, record["upload_id"])
    else:
        abort_unrecorded(fs, bucket, key, record["started_at"])


def describe_upload(record: dict[str, Any]) -> str:
    """What the server holds for a journaled multipart upload."""
    return f"S3 multipart upload, {len(record.get('parts') or {})} part(s) sent"


def upload(request: TransferRequest) -> TransferResult:
    """Upload one file to an ``s3://`` sink."""
    sink = request.sink
    settings = sink.settings
    assert isinstance(settings, S3Options)
    part_size = settings.part_size_for(request.size, sink.rate)
    if request.size >= part_size:
        bucket, _, key = request.remote_path.partition("/")
        upload = MultipartUpload(sink.fs, bucket, key, request, part_size)
        return upload.run(width=settings.part_concurrency)
    data, sha256 = read_whole(request)
    sync(get_loop(), _putter(sink), request, data, sha256)
    request.progress(len(data))
    return TransferResult(len(data), sha256)


def batch(sink: Sink) -> BatchTransfer:
    """Small files to an ``s3://`` sink: concurrent PUTs on fsspec's event loop (s3fs's)."""
    return lambda requests: send_batch(sink, requests, _putter(sink))


def _putter(sink: Sink) -> Put:
    """The PUT of one small object with its sha256 as metadata, to run on fsspec's event loop:
    the direct PUT where it applies, else (or when it is declined) s3fs's.

    With the credentials in the sink's options, the direct PUT needs no connected filesystem:
    s3fs is loaded only for a PUT it declines (and then reports that PUT's error)."""
    direct = sink.endpoint.direct
    assert direct is None or isinstance(direct, DirectS3)
    client = session = None
    if direct is None or direct.static is None:
        client = sink.fs.s3  # connects here, outside the event loop, when needed
        session = sink.fs.session

    async def put(request: TransferRequest, data: bytes, sha256: str) -> None:
        bucket, _, key = request.remote_path.partition("/")
        metadata = {"sha256": sha256}
        if direct is not None and await direct.put(
            bucket, key, data, sha256=sha256, metadata=metadata, client=client, session=session
        ):
            return
        # Connecting may load s3fs or wait for another thread's connection: not on the loop.
        fs = await asyncio.to_thread(lambda: sink.fs)
        await backend.call(fs, "put_object", Bucket=bucket, Key=key, Body=data, Metadata=metadata)

    return put


def list_parts(fs: Any, bucket: str, key: str, upload_id: str) -> dict[int, dict[str, Any]] | None:
    """The parts the server holds for an upload (all pages), or None if it is gone."""
    parts: dict[int, dict[str, Any]] = {}
    marker = 0
    while True:
        try:
            page = fs.call_s3(
                "list_parts", Bucket=bucket, Key=key, UploadId=upload_id, PartNumberMarker=marker
            )
        except FileNotFoundError:  # NoSuchUpload: completed, aborted or expired
            return None
        for part in page.get("Parts", []):
            parts[int(part["PartNumber"])] = {"etag": part["ETag"], "size": int(part["Size"])}
        if not page.get("IsTruncated"):
            return parts
        marker = int(page["NextPartNumberMarker"])


def abort_upload(fs: Any, bucket: str, key: str, upload_id: str) -> None:
    """Abort a multipart upload; one that is gone already is fine."""
    with contextlib.suppress(FileNotFoundError):
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)


def uploads_of(fs: Any, bucket: str, key: str) -> list[tuple[str, float]]:
    """Multipart uploads under way for exactly this key: (upload id, epoch started)."""
    found: list[tuple[str, float]] = []
    markers: dict[str, str] = {}
    while True:
        page = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key, **markers)
        for upload in page.get("Uploads", []):
            if upload["Key"] == key:
                found.append((upload["UploadId"], upload["Initiated"].timestamp()))
        if not page.get("IsTruncated"):
            return found
        markers = {
            "KeyMarker": page["NextKeyMarker"],
            "UploadIdMarker": page["NextUploadIdMarker"],
        }


def abort_unrecorded(fs: Any, bucket: str, key: str, since: float) -> int:
    """Abort the uploads of ``key`` begun since ``since`` (a record that never got their id:
    the process died between creating the upload and noting it); returns how many."""
    aborted = 0
    for upload_id, started in uploads_of(fs, bucket, key):
        if started >= since - CLOCK_SLACK:
            abort_upload(fs, bucket, key, upload_id)
            aborted += 1
    return aborted


def _part_matches(held: dict[str, Any] | None, chunk: bytes) -> bool:
    """True when the part the server holds has these bytes (as far as S3 tells)."""
    if held is None or held["size"] != len(chunk):
        return False
    plain = _PLAIN_ETAG.match(str(held["etag"]))
    return plain is None or plain.group(1) == hashlib.md5(chunk, usedforsecurity=False).hexdigest()


class MultipartUpload:
    """One file's multipart upload, resumed from the journal where it can be."""

    def __init__(
        self, fs: Any, bucket: str, key: str, request: TransferRequest, part_size: int
    ) -> None:
        self.fs = fs
        self.bucket = bucket
        self.key = key
        self.request = request
        self.part_size = part_size
        self.journal: UploadJournal | None = request.journal
        self.journal_key: JournalKey = request.journal_key
        self.upload_id = ""
        self.sha256 = ""
        self.held: dict[int, dict[str, Any]] = {}  #: parts on the server: number -> etag, size

    def run(self, *, width: int) -> TransferResult:
        """Send what the server lacks and complete the upload."""
        if not self._resume():
            self._create()
        try:
            size = self._send_parts(width)
            self.fs.call_s3(
                "complete_multipart_upload",
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                MultipartUpload={
                    "Parts": [
                        {"PartNumber": number, "ETag": part["etag"]}
                        for number, part in sorted(self.held.items())
                    ]
                },
            )
        except FileNotFoundError:
            # NoSuchUpload: aborted behind our back (cleanup, a lifecycle rule) mid-way.
            self._forget()
            raise DeliveryError(
                f"{self.request.sink.display}: multipart upload of {self.key} vanished "
                "from the server; it starts again"
            ) from None
        except (SourceChangedError, SourceUnreadableError):
            self._abandon()
            raise
        except BaseException:
            if self.journal is None:  # nothing could resume it: leave nothing behind
                self._abandon()
            raise
        self._forget()
        return TransferResult(size, self.sha256)

    def _resume(self) -> bool:
        """Pick up the journaled upload of this file; False when there is none to resume."""
        if self.journal is None:
            return False
        record = self.journal.get(self.journal_key)
        if record is None:
            return False
        request = self.request
        part_size = record.get("part_size")
        resumable = (
            record.get("protocol") == "s3"
            and same_file(record, request.size, request.mtime_ns)
            and isinstance(part_size, int)
            and part_size >= backend.MIN_PART
            and request.size <= part_size * backend.MAX_PARTS
            and bool(record.get("upload_id"))
        )
        held = (
            list_parts(self.fs, self.bucket, self.key, record["upload_id"]) if resumable else None
        )
        if held is None:
            if not record.get("upload_id"):
                abort_unrecorded(self.fs, self.bucket, self.key, record["started_at"])
            elif not resumable:
                log.info(
                    "%s: %s changed since its upload began; starting anew",
                    request.sink.display,
                    self.key,
                )
                abort_upload(self.fs, self.bucket, self.key, record["upload_id"])
            self.journal.forget(self.journal_key)
            return False
        self.upload_id = record["upload_id"]
        self.sha256 = record["sha256"]
        self.part_size = int(record["part_size"])  # its own parts, whatever the link is now
        self.held = held
        log.info(
            "%s: resuming %s: %d of %d part(s) on the server",
            request.sink.display,
            self.key,
            len(held),
            -(-request.size // self.part_size),
        )
        return True

    def _create(self) -> None:
        request = self.request
        # The client is built (about 0.1 s) while the digest computed ahead is finishing.
        self.fs.s3  # noqa: B018 - connects the client, outside the event loop
        self.sha256 = request.digest()
        if self.journal is not None:
            # Journaled before the upload exists, so cleanup can find it even if we die
            # between creating it and noting its id.
            self.journal.start(
                self.journal_key,
                {
                    "protocol": "s3",
                    "bucket": self.bucket,
                    "key": self.key,
                    "local": str(request.local_path),
                    "size": request.size,
                    "mtime_ns": request.mtime_ns,
                    "part_size": self.part_size,
                    "sha256": self.sha256,
                    "upload_id": None,
                    "parts": {},
                },
            )
        created = self.fs.call_s3(
            "create_multipart_upload",
            Bucket=self.bucket,
            Key=self.key,
            Metadata={"sha256": self.sha256},
        )
        self.upload_id = created["UploadId"]
        if self.journal is not None:
            self.journal.update(self.journal_key, upload_id=self.upload_id)

    def _send_parts(self, width: int) -> int:
        """Upload the missing parts, at most ``width`` at a time (see the module's docstring);
        returns the bytes in the object."""
        request = self.request
        in_flight: deque[tuple[int, int, Future[Any], float]] = deque()
        done = 0
        pace = _Pace(self.part_size, width, request.sink)

        def settle_oldest() -> None:
            nonlocal done
            number, size, future, sent = in_flight.popleft()
            etag = future.result()["ETag"]
            pace.confirmed(size, sent)
            self.held[number] = {"etag": etag, "size": size}
            if self.journal is not None:
                self.journal.add_part(self.journal_key, number, etag, size)
            done += size
            request.progress(done)

        with SourceReader(request.local_path, chunk_size=self.part_size, hashing=False) as reader:
            try:
                for number, chunk in enumerate(reader.chunks(), start=1):
                    if _part_matches(self.held.get(number), chunk):
                        done += len(chunk)
                        continue
                    self.held.pop(number, None)
                    request.pace(len(chunk))
                    sent = pace.sending()
                    call = backend.call(
                        self.fs,
                        "upload_part",
                        Bucket=self.bucket,
                        Key=self.key,
                        UploadId=self.upload_id,
                        PartNumber=number,
                        Body=chunk,
                    )
                    future = asyncio.run_coroutine_threadsafe(call, self.fs.loop)
                    in_flight.append((number, len(chunk), future, sent))
                    while len(in_flight) >= pace.width:
                        if len(in_flight) == pace.width and pace.lead(*in_flight[0][1:]):
                            break  # the next part goes beside the oldest's last stretch
                        settle_oldest()
                while in_flight:
                    settle_oldest()
                reader.check_unchanged(request.size, request.mtime_ns)
            finally:
                for _, _, future, _ in in_flight:
                    future.cancel()
            last = -(-reader.bytes_read // self.part_size)
            for number in [n for n in self.held if n > last]:  # left by a longer version
                del self.held[number]
            return reader.bytes_read

    def _forget(self) -> None:
        if self.journal is not None:
            self.journal.forget(self.journal_key)

    def _abandon(self) -> None:
        """Abort the upload (it can never complete) and drop its record."""
        try:
            abort_upload(self.fs, self.bucket, self.key, self.upload_id)
        except Exception as exc:  # cleanup aborts it later; the original error matters more
            log.debug("could not abort upload of %s: %s", self.key, exc)
        self._forget()


class _Pace:
    """How many parts of an upload may be in flight: as many as the link carries in
    :data:`IN_FLIGHT_SECONDS`, by the rate measured over the latest confirmed parts (at first
    the sink's, from its last large upload; one part while nothing is known). Under an upload
    limit (``bwlimit``) two at least: a part waits for the limit's tokens before it goes, and
    it waits while another one is sent, not after it.

    A part is timed by its share of the link: the parts in flight share it equally, so that
    each is credited with the time it would have taken with the link to itself. Timed from
    its send to its answer instead, two parts side by side would each seem twice as slow,
    and the rate over parts answered close together faster than the link. A part that
    went while other files did says nothing of the link and is not counted."""

    def __init__(self, part_size: int, most: int, sink: Sink) -> None:
        self.part_size = part_size
        self.most = most
        self.least = min(most, 2 if sink.limiter else 1)
        self.sink = sink
        #: (bytes, seconds of the link to itself) of the latest parts confirmed that had it
        self.timed: deque[tuple[int, float]] = deque(maxlen=RATE_PARTS)
        self.rate = sink.rate
        self.width = self._width(sink.rate)
        #: seconds a byte of the latest confirmed part took with the link to itself (its
        #: share counted as below); None before one was, and when other files went meanwhile
        self.latest: float | None = None
        #: the latest confirmed part shared the link with other files: the times measured
        #: then say little of the link this upload now has to itself
        self.shared = False
        #: the parts in flight, by the time each was sent: the seconds of the link each has
        #: had to itself so far, the parts in flight sharing it equally
        self.in_air: dict[float, float] = {}
        self._clock = 0.0  #: when the shares were last counted

    def _width(self, rate: float | None) -> int:
        if rate is None:
            return self.least
        return max(self.least, min(self.most, int(rate * IN_FLIGHT_SECONDS) // self.part_size))

    def _count(self, now: float) -> None:
        """Give each part in flight its share of the link since the last count."""
        if self.in_air and now > self._clock:
            share = (now - self._clock) / len(self.in_air)
            for sent in self.in_air:
                self.in_air[sent] += share
        self._clock = max(self._clock, now)

    def sending(self) -> float:
        """A part is about to go: the time it is sent at."""
        now = time.monotonic()
        self._count(now)
        self.in_air[now] = 0.0
        return now

    def confirmed(self, size: int, sent: float) -> None:
        """A part of ``size`` bytes, sent at ``sent`` (what :meth:`sending` returned), was
        confirmed: measure the rate, set the width."""
        now = time.monotonic()
        self._count(now)
        alone = self.in_air.pop(sent)
        alone_since = self.sink.alone_since
        # Its time was this upload's share of the link, if other files went meanwhile.
        self.shared = alone_since is None or alone_since > sent
        if self.shared or alone <= 0 or size <= 0:
            self.latest = None
            return
        self.latest = alone / size
        self.timed.append((size, alone))
        rate = sum(b for b, _ in self.timed) / sum(t for _, t in self.timed)
        self.sink.rate = self.rate = rate
        self.width = self._width(rate)

    def lead(self, size: int, future: Future[Any], sent: float) -> bool:
        """Whether the next part should go now, beside the oldest one in flight (``size``
        bytes, sent at ``sent``, answering through ``future``): True once that part is
        expected within :data:`LEAD` of its time from its end and still unanswered. Waits
        until then, or until it is answered (False).

        Its time with the link to itself is expected from the time the latest part took
        that way, or from the rate over the latest parts, whichever is shorter (a part sent
        again after a cut took longer); the parts in flight share the link equally, so that
        what it still lacks takes that many times as long. False while neither is known,
        and when ``part_concurrency`` parts are in flight (the most there may be).

        While other files go to the sink, no part goes beside the oldest: they keep the link
        busy during the answer's round trip, and one more part would take its share from
        them (a photo landing beside a video would get a third of the link rather than
        half). When they are done before the oldest part is answered, the link is this
        upload's: the next part goes at once (True), as it does after a part that shared the
        link (its time says nothing of the link alone), else the link would stand idle
        while the oldest part's answer comes back."""
        if self.width >= self.most:
            return False
        if self.sink.limiter:
            # Under an upload limit the parts queue for it here, two at least: the link is
            # not idle while an answer comes back, and one more part would take its tokens
            # from the files beside it.
            if self.sink.sending > 1:
                return False
        elif self.sink.sending > 1:
            return self.sink.wait_alone(future)
        elif self.shared:
            return not future.done()
        guesses = [size * self.latest] if self.latest is not None else []
        if self.rate is not None and self.rate > 0:
            guesses.append(size / self.rate)
        if not guesses:
            return False
        expected = min(guesses)
        self._count(time.monotonic())
        sharing = len(self.in_air)
        wait = ((1 - LEAD) * expected - self.in_air[sent]) * sharing
        if wait > 0:
            futures.wait([future], timeout=wait)
        return not future.done() and self.sink.sending <= 1  # no file came meanwhile


def remote_sha256(fs: Any, path: str) -> str:
    """The sha256 an object carries as metadata (``x-amz-meta-sha256``: every upload of this
    transfer sets it), from a HEAD request; "" when it has none."""
    value = (fs.metadata(path) or {}).get("sha256")
    return str(value) if value else ""
