"""SFTP's own sessions, batches, and answers lost to a cut, against the real SFTP server.

The contract every sink kind meets is in ``test_sinks.py``; resuming large files is in
``test_resume.py`` and dropped links in ``test_flaky_sftp.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import servers
from fakes.link import LinkEmulator, mbit
from helpers import (
    WriteConfig,
    batch_requests,
    make_file,
    one_sink_config,
    run_once,
    sftp_sink,
    sftp_through,
)

from skyframe.config import SinkConfig
from skyframe.deps import import_asyncssh
from skyframe.errors import SourceUnreadableError
from skyframe.storage import Sink, TransferResult, open_sink


@pytest.fixture
def sink(tmp_path: Path, sftp_server: servers.SFTPServer) -> Any:
    opened = open_sink(SinkConfig.model_validate(sftp_sink(sftp_server)), tmp_path)
    yield opened
    opened.close()


def remote_folder(sink: Sink) -> Path:
    return Path(sink.root)


def requests_asked(monkeypatch: pytest.MonkeyPatch, *names: str) -> list[str]:
    """The names of the session's requests (asyncssh's ``SFTPClient`` methods ``names``), in
    the order they are made."""
    asyncssh = import_asyncssh()
    asked: list[str] = []
    for name in names:
        original = getattr(asyncssh.SFTPClient, name)

        async def counted(
            self: Any, path: Any, *a: Any, _o: Any = original, _n: str = name, **kw: Any
        ) -> Any:
            asked.append(_n)
            return await _o(self, path, *a, **kw)

        monkeypatch.setattr(asyncssh.SFTPClient, name, counted)
    return asked


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary files left anywhere under ``folder``."""
    return [str(p) for p in folder.rglob(".*") if p.is_file()]


def test_sftp_batch_sends_small_files_and_reports_each(sink: Sink, tmp_path: Path) -> None:
    from skyframe.protocols.sftp.plugin import skyframe_transfer_batch

    send = skyframe_transfer_batch(sink)
    assert send is not None
    files = {f"flight 07/{i:02d} é.jpg": os.urandom(700 + i) for i in range(40)}
    files |= {"日本/deep/er/one.jpg": os.urandom(3000), "empty.jpg": b"", "gone.jpg": b"x"}
    requests = batch_requests(sink, tmp_path / "src", files)
    (tmp_path / "src" / "gone.jpg").unlink()
    outcomes = send(requests)
    root = remote_folder(sink)
    assert isinstance(outcomes[-1], SourceUnreadableError)
    assert not (root / "gone.jpg").exists()
    for request, outcome in zip(requests[:-1], outcomes[:-1], strict=True):
        data = request.local_path.read_bytes()
        assert outcome == TransferResult(len(data), hashlib.sha256(data).hexdigest())
        assert Path(request.remote_path).read_bytes() == data
    assert leftovers(root) == []


def test_sftp_batch_keeps_its_files_in_flight_together(
    sink: Sink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pipelined: every file of the batch is opened before the first open is answered. The
    # opens are held (as a link's round trip would hold them) until as many as expected are
    # in flight, or 2 s: the files are read, and their opens sent, meanwhile.
    from skyframe.protocols.sftp.plugin import skyframe_transfer_batch

    asyncssh = import_asyncssh()
    original = asyncssh.SFTPClient.open
    in_flight = [0, 0]  # now, most
    expected = [32]
    all_sent = asyncio.Event()

    async def counting_open(self: Any, *args: Any, **kwargs: Any) -> Any:
        in_flight[0] += 1
        in_flight[1] = max(in_flight[1], in_flight[0])
        if in_flight[0] >= expected[0]:
            all_sent.set()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_sent.wait(), 2)
            return await original(self, *args, **kwargs)
        finally:
            in_flight[0] -= 1

    monkeypatch.setattr(asyncssh.SFTPClient, "open", counting_open)
    send = skyframe_transfer_batch(sink)
    assert send is not None
    requests = batch_requests(sink, tmp_path / "src", {f"{i}.jpg": b"p" * i for i in range(40)})
    outcomes = send(requests)
    assert all(isinstance(outcome, TransferResult) for outcome in outcomes), outcomes
    assert in_flight[1] == 32  # BATCH_IN_FLIGHT, more than the sink's concurrency (8)
    # Files of 1 MB: at most 1 MiB of their bytes go at once (BATCH_BYTES), but the opens,
    # which carry none, do not wait for that.
    in_flight[:] = [0, 0]
    expected[0] = 12
    all_sent.clear()
    big = {f"big/{i}.jpg": os.urandom(1_000_000) for i in range(12)}
    outcomes = send(batch_requests(sink, tmp_path / "src", big))
    assert all(isinstance(outcome, TransferResult) for outcome in outcomes), outcomes
    assert in_flight[1] == 12


def test_batches_on_a_connection_share_one_budget_and_a_file_follows_the_one_before(
    sftp_server: servers.SFTPServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Over a link with a round trip, two batches at once on one connection: the bytes of all
    # their files in flight (sent, not yet answered) stay within BATCH_BYTES, counted by
    # write request. The next file's requests go as the answers of the one before come back,
    # not after its last answer, so the link does not stand idle for a round trip between
    # two photos; and the batches are served in turn rather than side by side (they ended
    # together, and the link stood idle while both closed and renamed their last files).
    from skyframe.protocols.sftp import batches
    from skyframe.protocols.sftp.plugin import skyframe_transfer_batch

    asyncssh = import_asyncssh()
    original = asyncssh.SFTPClientFile.write
    unanswered: dict[int, int] = {}  # handle -> requests in flight
    seen = {"bytes": 0, "most_bytes": 0, "most_files": 0}

    async def counting_write(self: Any, data: Any, offset: int) -> Any:
        unanswered[id(self)] = unanswered.get(id(self), 0) + 1
        seen["bytes"] += len(data)
        seen["most_bytes"] = max(seen["most_bytes"], seen["bytes"])
        seen["most_files"] = max(seen["most_files"], len(unanswered))
        try:
            return await original(self, data, offset)
        finally:
            seen["bytes"] -= len(data)
            unanswered[id(self)] -= 1
            if not unanswered[id(self)]:
                del unanswered[id(self)]

    monkeypatch.setattr(asyncssh.SFTPClientFile, "write", counting_write)
    photos = {f"{flight}/DJI_{i:04}.JPG": os.urandom(600_000) for flight in "ab" for i in range(5)}
    with LinkEmulator(servers.LOOPBACK, sftp_server.port, up_bps=mbit(24), rtt=0.04) as link:
        sink = open_sink(SinkConfig(**sftp_through(link, sftp_server, tmp_path)), tmp_path)
        try:
            send = skyframe_transfer_batch(sink)
            assert send is not None
            requests = batch_requests(sink, tmp_path / "src", photos)
            outcomes: dict[str, list[Any]] = {}

            def one_batch(flight: str) -> None:
                mine = [r for r in requests if Path(r.remote_path).parent.name == flight]
                outcomes[flight] = send(mine)

            flights = [threading.Thread(target=one_batch, args=(f,)) for f in "ab"]
            for thread in flights:
                thread.start()
            for thread in flights:
                thread.join(60)
            assert all(isinstance(o, TransferResult) for o in outcomes["a"] + outcomes["b"])
            root = remote_folder(sink)
            assert {
                str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()
            } == photos
        finally:
            sink.close()
    assert seen["most_bytes"] <= batches.BATCH_BYTES, seen
    assert seen["most_files"] >= 2, seen  # a file's requests beside the last of the one before


def test_a_batch_cut_on_its_way_goes_on_from_what_the_server_acknowledged(
    sink: Sink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The link drops twice during a batch: once after every write of "done.jpg" was answered,
    # before its close; once while "half.jpg" is written, after its first piece was answered.
    # The next try sends neither again whole: "done.jpg" is closed and renamed, "half.jpg"
    # goes on from its first piece.
    from skyframe.protocols.sftp import session
    from skyframe.protocols.sftp.plugin import skyframe_transfer_batch

    asyncssh = import_asyncssh()
    real_open, real_close = session.open_file, session.close_file
    real_write = asyncssh.SFTPClientFile.write
    names: dict[int, str] = {}  # handle -> file name
    sent: dict[str, int] = {}  # file name -> bytes written, all tries
    cuts: list[str] = []

    async def naming_open(fs: Any, path: str, mode: str, lane: Any = "small") -> Any:
        handle, piece = await real_open(fs, path, mode, lane)
        names[id(handle)] = Path(path).name.split(".skyframe-")[0].lstrip(".")
        return handle, piece

    async def cut_write(self: Any, data: Any, offset: int) -> Any:
        name = names[id(self)]
        if name == "half.jpg" and offset and "half" not in cuts:
            cuts.append("half")
            await asyncio.sleep(0.2)  # the first piece is answered meanwhile
            raise asyncssh.ConnectionLost("the link dropped")
        sent[name] = sent.get(name, 0) + len(data)
        return await real_write(self, data, offset)

    async def cut_close(handle: Any) -> None:
        if names.get(id(handle)) == "done.jpg" and "done" not in cuts:
            cuts.append("done")
            raise asyncssh.ConnectionLost("the link dropped")
        await real_close(handle)

    monkeypatch.setattr(session, "open_file", naming_open)
    monkeypatch.setattr(session, "close_file", cut_close)
    monkeypatch.setattr(asyncssh.SFTPClientFile, "write", cut_write)
    monkeypatch.setattr("skyframe.protocols.sftp.batches.pause", lambda request, wait: None)
    send = skyframe_transfer_batch(sink)
    assert send is not None
    files = {"done.jpg": os.urandom(300_000), "half.jpg": os.urandom(700_000)}
    outcomes = send(batch_requests(sink, tmp_path / "src", files))
    assert all(isinstance(outcome, TransferResult) for outcome in outcomes), outcomes
    assert sorted(cuts) == ["done", "half"]
    root = remote_folder(sink)
    assert {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()} == files
    assert leftovers(root) == []
    assert sent["done.jpg"] == len(files["done.jpg"])  # once
    # Its first piece once; the pieces in flight at the cut, at most, again.
    assert len(files["half.jpg"]) <= sent["half.jpg"] < 2 * len(files["half.jpg"]), sent


def lost_rename_then_a_rewrite_cut(monkeypatch: pytest.MonkeyPatch, size: int) -> list[str]:
    """Three tries of a file of ``size`` bytes: the first gets every byte acknowledged, then
    its rename takes effect but the answer is lost; the second finds no temporary file and
    writes it anew, but only its last piece reaches the server (beyond a hole), unanswered,
    before the next cut. Returns the mode of each open, as they come."""
    from skyframe.protocols.sftp import session

    asyncssh = import_asyncssh()
    real_open, real_rename = session.open_file, session.rename
    real_write = asyncssh.SFTPClientFile.write
    tries: list[str] = []

    async def counting_open(fs: Any, path: str, mode: str, lane: Any = "small") -> Any:
        tries.append(mode)
        return await real_open(fs, path, mode, lane)

    async def rename_then_drop(fs: Any, old: str, new: str) -> None:
        await real_rename(fs, old, new)
        if len(tries) == 1:
            raise asyncssh.ConnectionLost("the link dropped")

    async def second_try_writes_its_last_piece_only(self: Any, data: Any, offset: int) -> Any:
        if len(tries) != 2:
            return await real_write(self, data, offset)
        if offset + len(data) < size:
            raise asyncssh.ConnectionLost("the link dropped")
        await real_write(self, data, offset)  # on the server, its answer lost
        raise asyncssh.ConnectionLost("the link dropped")

    monkeypatch.setattr(session, "open_file", counting_open)
    monkeypatch.setattr(session, "rename", rename_then_drop)
    monkeypatch.setattr(asyncssh.SFTPClientFile, "write", second_try_writes_its_last_piece_only)
    return tries


@pytest.mark.parametrize("alone", [False, True], ids=["in a batch", "alone"])
def test_a_file_rewritten_from_its_start_forgets_what_the_try_before_got(
    sink: Sink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, alone: bool
) -> None:
    # The third try must not take the size of the second's file (with its hole) for what the
    # first got acknowledged: it writes the file again, whole. In a batch, and for a small
    # file sent alone.
    from skyframe.protocols.sftp import batches, transfer
    from skyframe.protocols.sftp.plugin import skyframe_transfer_batch

    data = os.urandom(600_000)
    tries = lost_rename_then_a_rewrite_cut(monkeypatch, len(data))
    monkeypatch.setattr(batches, "pause", lambda request, wait: None)
    monkeypatch.setattr(transfer, "pause", lambda request, wait: None)
    [request] = batch_requests(sink, tmp_path / "src", {"f.jpg": data})
    if alone:
        sink.ensure_folder(sink.root)
        outcomes: list[Any] = [transfer.upload(request)]
    else:
        send = skyframe_transfer_batch(sink)
        assert send is not None
        outcomes = send([request])
    assert outcomes == [TransferResult(len(data), hashlib.sha256(data).hexdigest())]
    assert tries == ["wb", "wb", "wb"]
    assert (remote_folder(sink) / "f.jpg").read_bytes() == data
    assert leftovers(remote_folder(sink)) == []


def test_a_batch_goes_on_while_each_cut_leaves_more_of_a_file_acknowledged(
    sink: Sink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every try gets one more piece of the file through before the link drops: no try
    # delivers a file, but each goes further, so the batch does not give up on it.
    from skyframe.protocols.sftp import batches
    from skyframe.protocols.sftp.plugin import skyframe_transfer_batch

    asyncssh = import_asyncssh()
    real_write = asyncssh.SFTPClientFile.write
    written = [0]  # the next offset the link lets through

    async def one_piece_a_try(self: Any, data: Any, offset: int) -> Any:
        if offset != written[0]:
            raise asyncssh.ConnectionLost("the link dropped")
        answer = await real_write(self, data, offset)
        written[0] = offset + len(data)
        return answer

    monkeypatch.setattr(asyncssh.SFTPClientFile, "write", one_piece_a_try)
    monkeypatch.setattr(batches, "TRIES", 2)  # two tries in a row that get nowhere
    monkeypatch.setattr(batches, "pause", lambda request, wait: None)
    send = skyframe_transfer_batch(sink)
    assert send is not None
    data = os.urandom(1_000_000)  # four pieces: four tries
    outcomes = send(batch_requests(sink, tmp_path / "src", {"f.jpg": data}))
    assert outcomes == [TransferResult(len(data), hashlib.sha256(data).hexdigest())]
    assert (remote_folder(sink) / "f.jpg").read_bytes() == data


def test_a_small_file_sent_alone_goes_on_after_a_cut_from_what_was_acknowledged(
    sink: Sink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A file of less than one chunk has no journal: after a cut within the run, the next try
    # still goes on from the bytes the server acknowledged, not from its start.
    from skyframe.protocols.sftp import transfer
    from skyframe.storage import TransferRequest

    asyncssh = import_asyncssh()
    real_write = asyncssh.SFTPClientFile.write
    sent = [0]
    cut: list[int] = []

    async def cut_write(self: Any, data: Any, offset: int) -> Any:
        if offset >= 1_000_000 and not cut:
            cut.append(offset)
            await asyncio.sleep(0.2)  # the pieces before it are answered meanwhile
            raise asyncssh.ConnectionLost("the link dropped")
        sent[0] += len(data)
        return await real_write(self, data, offset)

    monkeypatch.setattr(asyncssh.SFTPClientFile, "write", cut_write)
    monkeypatch.setattr(transfer, "pause", lambda request, wait: None)
    sink.ensure_folder(sink.root)
    photo = make_file(tmp_path / "src", "pano.jpg", os.urandom(2_000_000))
    st = photo.stat()
    request = TransferRequest(sink, photo, sink.remote_path("pano.jpg"), st.st_size, st.st_mtime_ns)
    result = transfer.upload(request)
    data = photo.read_bytes()
    assert result == TransferResult(len(data), hashlib.sha256(data).hexdigest())
    assert cut
    assert (remote_folder(sink) / "pano.jpg").read_bytes() == data
    assert leftovers(remote_folder(sink)) == []
    # Sent from its start again, it would be 2 MB more; the bytes acknowledged before the
    # cut (a megabyte at least) go once.
    assert len(data) <= sent[0] <= 2 * len(data) - 1_000_000, sent


def test_a_file_the_server_refuses_gets_its_error_and_leaves_nothing(
    sink: Sink, tmp_path: Path
) -> None:
    from skyframe.protocols.sftp.plugin import skyframe_transfer_batch

    send = skyframe_transfer_batch(sink)
    assert send is not None
    root = remote_folder(sink)
    (root / "taken.jpg").mkdir(parents=True)  # a folder where the file should go
    requests = batch_requests(sink, tmp_path / "src", {"a.jpg": b"a", "taken.jpg": b"t"})
    outcomes = send(requests)
    assert isinstance(outcomes[0], TransferResult)
    assert isinstance(outcomes[1], Exception)
    assert sink.translate(outcomes[1]) is outcomes[1]  # the file's error, not the sink's
    assert (root / "a.jpg").read_bytes() == b"a"
    assert (root / "taken.jpg").is_dir()
    assert leftovers(root) == []


def test_without_posix_rename_files_are_moved_into_place_through_sshfs(
    sink: Sink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server without the posix-rename extension: sshfs's move (a copy and a removal).
    from skyframe.protocols.sftp import transfer
    from skyframe.protocols.sftp.plugin import skyframe_transfer_batch

    asyncssh = import_asyncssh()

    async def unsupported(self: Any, old: Any, new: Any) -> None:
        raise asyncssh.SFTPOpUnsupported("no posix-rename here")

    monkeypatch.setattr(asyncssh.SFTPClient, "posix_rename", unsupported)
    send = skyframe_transfer_batch(sink)
    assert send is not None
    small = {"one.jpg": b"1" * 10, "two.jpg": b"2" * 20}
    outcomes = send(batch_requests(sink, tmp_path / "src", small))
    assert all(isinstance(outcome, TransferResult) for outcome in outcomes), outcomes
    big = make_file(tmp_path / "src", "big.mov", os.urandom(transfer.CHUNK + 5))
    st = big.stat()
    from skyframe.storage import TransferRequest

    request = TransferRequest(sink, big, sink.remote_path("big.mov"), st.st_size, st.st_mtime_ns)
    transfer.upload(request)
    root = remote_folder(sink)
    assert {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()} == {
        **small,
        "big.mov": big.read_bytes(),
    }
    assert leftovers(root) == []


def test_one_session_per_connection_started_once(sink: Sink) -> None:
    from skyframe.protocols.sftp import session

    fs = sink.fs

    async def twice() -> tuple[Any, Any]:
        return await asyncio.gather(session.session(fs), session.session(fs))

    first, second = session.run(fs, twice)
    assert first is second
    sink.reset()
    assert session.run(sink.fs, session.session, sink.fs) is not first  # a new connection


def test_small_files_to_sftp_go_in_batches_end_to_end(
    sftp_server: servers.SFTPServer,
    write_config: WriteConfig,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from skyframe.protocols.sftp import batches

    batched: list[int] = []
    original = batches.batch

    def counting_batch(sink: Sink) -> Any:
        send = original(sink)
        return lambda requests: batched.append(len(requests)) or send(requests)

    monkeypatch.setattr(batches, "batch", counting_batch)
    sink = sftp_sink(sftp_server)
    config = write_config(one_sink_config(sink, pipeline="p", retry="{max_attempts: 2}"))
    files = {f"f{i // 25}/{i:03d}.jpg": os.urandom(100 + i) for i in range(100)}
    files["big.mov"] = os.urandom(2 * 1024 * 1024)  # over the batch limit: alone
    for name, data in files.items():
        make_file(config.parent / "incoming", name, data)
    summary = run_once(config)
    assert summary.delivered == len(files), summary
    assert sum(batched) == 100
    root = Path(sink["url"].split(str(sftp_server.port), 1)[1])
    for name, data in files.items():
        assert (root / name).read_bytes() == data
    assert leftovers(root) == []


def test_the_check_goes_on_skyframes_session_not_through_sshfs(
    sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    # sshfs's calls cost about 20 round trips for the check: a channel of its own, and two
    # for every level of the root's path before its write. The session's cost 5.
    from skyframe.storage import probe_sink

    fs = sink.fs

    def not_this(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the check went through sshfs")

    for name in ("pipe_file", "makedirs", "size", "rm", "info", "open"):
        monkeypatch.setattr(fs, name, not_this)
    written: list[bool] = []
    result = probe_sink(sink, lambda: written.append(True))
    assert result.write > 0
    assert written == [True]
    assert list(remote_folder(sink).iterdir()) == []
    assert sink.litter == set()


def test_a_check_file_the_link_kept_from_removing_goes_when_the_sink_closes(
    sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The link drops between the check's write and its removal: the file is remembered and
    # removed when the sink closes (at the end of a run), over the connection it has then.
    from skyframe.protocols.sftp import session
    from skyframe.storage import probe_sink

    async def dropped(*args: Any, **kwargs: Any) -> None:
        raise ConnectionResetError("the link dropped")

    monkeypatch.setattr(session, "remove", dropped)
    written: list[bool] = []
    with pytest.raises(ConnectionResetError):
        probe_sink(sink, lambda: written.append(True))
    assert written == [True]  # told before the removal was tried
    root = remote_folder(sink)
    left = [p.name for p in root.iterdir()]
    assert len(left) == 1
    assert left[0].startswith(".skyframe-check-")
    assert len(sink.litter) == 1
    monkeypatch.undo()
    sink.close()
    assert list(root.iterdir()) == []
    assert sink.litter == set()


def test_a_rename_whose_answer_was_lost_is_not_sent_again(
    sink: Sink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The link drops after the server renamed a large upload into place, before its answer
    # came back: the next try finds the file there and sends nothing again.
    import logging

    from skyframe.journal import UploadJournal
    from skyframe.protocols.sftp import session, transfer
    from skyframe.storage import TransferRequest

    asyncssh = import_asyncssh()
    real_rename = session.rename
    opened: list[str] = []
    real_open = session.open_file

    async def rename_then_drop(fs: Any, old: str, new: str) -> None:
        await real_rename(fs, old, new)
        if "renamed" not in opened:  # the first try only
            opened.append("renamed")
            raise asyncssh.ConnectionLost("the link dropped")

    async def counting_open(fs: Any, path: str, mode: str, lane: Any = "small") -> Any:
        opened.append(mode)
        return await real_open(fs, path, mode, lane)

    sink.ensure_folder(sink.root)
    monkeypatch.setattr(session, "rename", rename_then_drop)
    monkeypatch.setattr(session, "open_file", counting_open)
    big = make_file(tmp_path / "src", "big.mov", os.urandom(transfer.CHUNK + 12345))
    st = big.stat()
    journal = UploadJournal(tmp_path / "journal")
    request = TransferRequest(
        sink, big, sink.remote_path("big.mov"), st.st_size, st.st_mtime_ns, journal=journal
    )
    caplog.set_level(logging.INFO, logger="skyframe")
    try:
        result = transfer.upload(request)
    finally:
        journal.close()
    data = big.read_bytes()
    assert result == TransferResult(len(data), hashlib.sha256(data).hexdigest())
    assert opened == ["wb", "renamed"]  # one upload; the second try opened nothing
    assert (remote_folder(sink) / "big.mov").read_bytes() == data
    assert leftovers(remote_folder(sink)) == []
    assert any("arrived on the last try" in r.getMessage() for r in caplog.records)


def test_folders_are_made_in_few_requests(sink: Sink, monkeypatch: pytest.MonkeyPatch) -> None:
    # asyncssh's makedirs asks two requests for every part of the path; a deep sink root that
    # exists costs one, after every reconnect.
    asyncssh = import_asyncssh()
    asked = requests_asked(monkeypatch, "isdir", "mkdir")
    root = remote_folder(sink)
    sink.ensure_folder(f"{sink.root}/a/b")
    assert (root / "a" / "b").is_dir()
    # root, a and b missing; the root's parent exists
    assert asked == ["isdir"] * 4 + ["mkdir"] * 3
    sink.reset()
    asked.clear()
    sink.ensure_folder(f"{sink.root}/a/b")
    assert asked == ["isdir"]
    (root / "file").write_bytes(b"x")
    with pytest.raises(asyncssh.SFTPError):
        sink.ensure_folder(f"{sink.root}/file/c")


def test_a_file_alone_whose_folder_is_missing_makes_it_with_one_request(
    sink: Sink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Opening its temporary file told it the folder is missing: a mkdir, no stat first
    # (ensure_folder's walk asked two stats before it).
    from skyframe.protocols.sftp import transfer

    sink.ensure_folder(sink.root)
    asked = requests_asked(monkeypatch, "isdir", "mkdir")
    data = os.urandom(5_000)
    [request] = batch_requests(sink, tmp_path / "src", {"flight 08/f.jpg": data})
    assert transfer.upload(request) == TransferResult(len(data), hashlib.sha256(data).hexdigest())
    assert (remote_folder(sink) / "flight 08" / "f.jpg").read_bytes() == data
    assert asked == ["mkdir"]
    asked.clear()
    sink.ensure_folder(f"{sink.root}/flight 08")  # known now
    assert asked == []


@pytest.mark.parametrize(
    ("case", "folder_requests"),
    [
        ("root there", []),
        ("root missing", ["mkdir"]),  # its parent is there
        ("root and its parent missing", ["mkdir", "isdir", "isdir", "isdir", "mkdir", "mkdir"]),
    ],
)
def test_the_check_makes_the_root_only_when_its_file_cannot_be_opened(
    tmp_path: Path,
    sftp_server: servers.SFTPServer,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    folder_requests: list[str],
) -> None:
    # Every run and every daemon start checks its sinks: a root that is there costs no
    # request before the check's file is opened (it cost one), a missing one a mkdir.
    from skyframe.storage import probe_sink

    entry = sftp_sink(sftp_server)
    if case == "root and its parent missing":
        entry["url"] += "/flights"
    sink = open_sink(SinkConfig.model_validate(entry), tmp_path)
    root = remote_folder(sink)
    if case == "root there":
        root.mkdir()
    asked = requests_asked(monkeypatch, "isdir", "mkdir", "open")
    try:
        written: list[list[str]] = []

        def first_files_go() -> None:  # as the check lets them: their folder is known
            before = len(asked)
            sink.ensure_folder(sink.root)
            written.append(asked[before:])

        assert probe_sink(sink, first_files_go).write > 0
        assert written == [[]]
        opens = 1 if case == "root there" else 2
        assert [n for n in asked if n != "open"] == folder_requests
        assert asked.count("open") == opens
        assert root.is_dir()
        assert list(root.iterdir()) == []
    finally:
        sink.close()


@pytest.mark.parametrize(
    ("size", "urgent", "lane"),
    [(100, False, "small"), (5_000_000, False, "large"), (5_000_000, True, "small")],
)
def test_large_files_have_their_own_session_unless_they_go_first(
    sink: Sink,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    size: int,
    *,
    urgent: bool,
    lane: str,
) -> None:
    # A video's pieces fill one session's window; a photo the pipeline puts first goes on the
    # other, so it never queues behind them.
    from skyframe.protocols.sftp import session, transfer
    from skyframe.storage import TransferRequest

    lanes: list[str] = []
    real_open = session.open_file

    async def recording_open(fs: Any, path: str, mode: str, lane: Any = "small") -> Any:
        lanes.append(lane)
        return await real_open(fs, path, mode, lane)

    monkeypatch.setattr(session, "open_file", recording_open)
    path = make_file(tmp_path / "src", "f.bin", os.urandom(size))
    st = path.stat()
    request = TransferRequest(
        sink, path, sink.remote_path("f.bin"), st.st_size, st.st_mtime_ns, urgent=urgent
    )
    transfer.upload(request)
    assert set(lanes) == {lane}
    assert (remote_folder(sink) / "f.bin").read_bytes() == path.read_bytes()


def test_a_server_that_allows_one_channel_gets_one_session(
    sink: Sink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server with a low MaxSessions refuses the large files' channel: they share the small
    # files' session instead of failing as if the link were down.
    from skyframe.protocols.sftp import transfer
    from skyframe.storage import TransferRequest

    asyncssh = import_asyncssh()
    real_start = asyncssh.SSHClientConnection.start_sftp_client
    started: list[int] = []

    async def one_only(self: Any, *args: Any, **kwargs: Any) -> Any:
        started.append(1)
        if len(started) > 1:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "no more sessions"
            )
        return await real_start(self, *args, **kwargs)

    monkeypatch.setattr(asyncssh.SSHClientConnection, "start_sftp_client", one_only)
    sink.ensure_folder(sink.root)  # the small files' session
    for name, size in (("big.mov", transfer.CHUNK + 1), ("other.mov", transfer.CHUNK + 2)):
        path = make_file(tmp_path / "src", name, os.urandom(size))
        st = path.stat()
        request = TransferRequest(sink, path, sink.remote_path(name), st.st_size, st.st_mtime_ns)
        transfer.upload(request)
        assert (remote_folder(sink) / name).read_bytes() == path.read_bytes()
    assert len(started) == 2  # the second channel was asked for once
