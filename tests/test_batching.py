"""``send_batch``, which the S3, GCS and SFTP batches share: each file is sent as soon as it is
read, the outcomes come back in order, and a stop cancels what is on its way."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from helpers import batch_requests

from skyframe.config import SinkConfig
from skyframe.errors import SourceChangedError
from skyframe.protocols import batching
from skyframe.storage import Sink, TransferRequest, TransferResult, open_sink


@pytest.fixture
def sink(tmp_path: Path) -> Sink:
    return open_sink(SinkConfig.model_validate({"url": str(tmp_path / "out")}), tmp_path)


def test_each_file_goes_as_soon_as_it_is_read(
    sink: Sink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first request is on its way before the last file is read: reading a whole batch
    # first held the first request back, and the link stood idle meanwhile.
    events: list[str] = []
    first_sent = threading.Event()
    read_whole = batching.read_whole

    def reading(request: TransferRequest, *, stale: bool = True) -> tuple[bytes, str]:
        if request is requests[-1]:
            # The last file is read only once the first one is on its way (or after 5 s).
            first_sent.wait(5)
        events.append(f"read {request.remote_path.rsplit('/', 1)[-1]}")
        return read_whole(request, stale=stale)

    async def put(request: TransferRequest, data: bytes, sha256: str) -> None:
        events.append(f"put {request.remote_path.rsplit('/', 1)[-1]}")
        first_sent.set()

    monkeypatch.setattr(batching, "read_whole", reading)
    requests = batch_requests(
        sink, tmp_path / "src", {f"{i}.jpg": b"x" * (i + 1) for i in range(5)}
    )
    outcomes = batching.send_batch(sink, requests, put)
    assert [type(o) for o in outcomes] == [TransferResult] * 5
    assert [o.size for o in outcomes if isinstance(o, TransferResult)] == [1, 2, 3, 4, 5]
    assert events.index("put 0.jpg") < events.index("read 4.jpg"), events


def test_outcomes_keep_the_order_of_the_requests(sink: Sink, tmp_path: Path) -> None:
    # Answers come back in any order; a file that changed while it was read is not sent and
    # gets its error; a failed request gets the error it raised.
    requests = batch_requests(sink, tmp_path / "src", {f"{i}.jpg": b"y" * 10 for i in range(6)})
    (tmp_path / "src" / "2.jpg").write_bytes(b"longer than before")
    sent: list[str] = []

    async def put(request: TransferRequest, data: bytes, sha256: str) -> None:
        name = request.remote_path.rsplit("/", 1)[-1]
        await asyncio.sleep(0.01 * (6 - int(name[0])))  # the later ones answer first
        if name == "4.jpg":
            raise OSError("refused")
        sent.append(name)

    outcomes = batching.send_batch(sink, requests, put, width=6)
    assert isinstance(outcomes[2], SourceChangedError)
    assert isinstance(outcomes[4], OSError)
    assert str(outcomes[4]) == "refused"
    assert all(isinstance(outcomes[i], TransferResult) for i in (0, 1, 3, 5))
    assert sent == ["5.jpg", "3.jpg", "1.jpg", "0.jpg"]


def test_a_stop_while_reading_cancels_the_files_on_their_way(
    sink: Sink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every request that began is cancelled, and none is left running; a file handed over
    # but not begun yet is cancelled before it sends anything.
    started = threading.Event()
    began: list[str] = []
    cancelled: list[str] = []
    read_whole = batching.read_whole

    def reading(request: TransferRequest, *, stale: bool = True) -> tuple[bytes, str]:
        if request is requests[-1]:
            started.wait(5)
            raise KeyboardInterrupt  # not one file's doing: the whole batch stops
        return read_whole(request, stale=stale)

    async def put(request: TransferRequest, data: bytes, sha256: str) -> None:
        name = request.remote_path.rsplit("/", 1)[-1]
        began.append(name)
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    monkeypatch.setattr(batching, "read_whole", reading)
    requests = batch_requests(sink, tmp_path / "src", {f"{i}.jpg": b"z" for i in range(3)})
    with pytest.raises(KeyboardInterrupt):
        batching.send_batch(sink, requests, put)
    for _ in range(50):  # the cancellations run on the event loop
        if sorted(cancelled) == sorted(began):
            break
        time.sleep(0.1)
    time.sleep(0.2)  # a request begun late would show here
    assert "0.jpg" in began
    assert "2.jpg" not in began  # its reading stopped the batch
    assert sorted(cancelled) == sorted(began)


def test_unpipelined_the_whole_batch_goes_in_one_turn_of_the_loop(
    sink: Sink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SFTP's batches: every file is read before the first request goes, so that their
    # requests share the turns of the loop (and so their packets).
    events: list[str] = []
    read_whole = batching.read_whole

    def reading(request: TransferRequest, *, stale: bool = True) -> tuple[bytes, str]:
        events.append("read")
        return read_whole(request, stale=stale)

    async def put(request: TransferRequest, data: bytes, sha256: str) -> None:
        events.append("put")

    monkeypatch.setattr(batching, "read_whole", reading)
    requests = batch_requests(sink, tmp_path / "src", {f"{i}.jpg": b"w" for i in range(6)})
    outcomes = batching.send_batch(sink, requests, put, pipelined=False)
    assert all(isinstance(o, TransferResult) for o in outcomes)
    assert events == ["read"] * 6 + ["put"] * 6
