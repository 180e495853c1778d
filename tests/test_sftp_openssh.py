"""The rest of a large SFTP upload on a fast link, sent by OpenSSH's own ``sftp`` client
(skyframe.protocols.sftp.openssh), against the tests' OpenSSH server."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import servers
from fakes.link import LinkEmulator, mbit
from helpers import make_file, sftp_sink, sftp_through

from skyframe.bandwidth import Limiter, TokenBucket
from skyframe.config import SinkConfig
from skyframe.journal import UploadJournal
from skyframe.protocols.sftp import openssh, transfer
from skyframe.storage import Sink, TransferRequest, TransferResult, open_sink

SIZE = 20 * 1024 * 1024 + 12_345  #: the files sent (the thresholds are lowered to fit)


@pytest.fixture(autouse=True)
def small_thresholds(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Hand over files of a few MiB after 1 MiB at any rate; forget refusals after."""
    if shutil.which("sftp") is None:
        pytest.fail("OpenSSH's sftp is missing: install Debian's openssh-client (.ci/setup does)")
    monkeypatch.setattr(openssh, "MIN_SIZE", 1024 * 1024)
    monkeypatch.setattr(openssh, "PROBE_BYTES", 1024 * 1024)
    monkeypatch.setattr(openssh, "FAST", 1)
    yield
    openssh._off.clear()


@pytest.fixture
def sink(tmp_path: Path, sftp_server: servers.SFTPServer) -> Iterator[Sink]:
    opened = open_sink(SinkConfig.model_validate(sftp_sink(sftp_server)), tmp_path)
    opened.ensure_folder(opened.root)
    yield opened
    opened.close()


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[UploadJournal]:
    opened = UploadJournal(tmp_path / "journal")
    yield opened
    opened.close()


def _request(sink: Sink, path: Path, journal: UploadJournal, **extra: Any) -> TransferRequest:
    st = path.stat()
    return TransferRequest(
        sink,
        path,
        sink.remote_path(path.name),
        st.st_size,
        st.st_mtime_ns,
        journal=journal,
        **extra,
    )


def _arrived(sink: Sink, path: Path, result: TransferResult) -> None:
    data = path.read_bytes()
    assert result == TransferResult(len(data), hashlib.sha256(data).hexdigest())
    folder = Path(sink.root)
    assert (folder / path.name).read_bytes() == data
    assert [p.name for p in folder.iterdir()] == [path.name]  # no temporary file left


def _handed_over(caplog: pytest.LogCaptureFixture) -> bool:
    return any("the link is fast" in r.getMessage() for r in caplog.records)


def _fell_back(caplog: pytest.LogCaptureFixture) -> bool:
    """Whether a handover failed or was refused (asyncssh then went on)."""
    said = [r.getMessage() for r in caplog.records]
    return any("could not take over" in m or "; going on" in m for m in said)


def test_a_large_file_on_a_fast_link_is_finished_by_openssh(
    sink: Sink,
    tmp_path: Path,
    journal: UploadJournal,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="skyframe")
    big = make_file(tmp_path / "src", "flight.mp4", os.urandom(SIZE))
    monkeypatch.setattr(openssh, "PROBE_BYTES", 2 * openssh.EARLY_BYTES)
    started: list[int] = []  # the acknowledged ends at which the probe started sftp
    judged: list[int] = []  # and at which it judged the link fast
    taken: list[object] = []
    probe_call, take = openssh.Probe.__call__, openssh.Probe.take

    def call(probe: openssh.Probe, acknowledged: int) -> bool:
        before = probe._process
        verdict = probe_call(probe, acknowledged)
        if before is None and probe._process is not None:
            started.append(acknowledged)
        if verdict:
            judged.append(acknowledged)
        return verdict

    def took(probe: openssh.Probe) -> object:
        taken.append(take(probe))
        return taken[-1]

    monkeypatch.setattr(openssh.Probe, "__call__", call)
    monkeypatch.setattr(openssh.Probe, "take", took)
    seen: list[int] = []
    result = transfer.upload(_request(sink, big, journal, progress=seen.append))
    assert _handed_over(caplog)
    # sftp logged in while the probe went on, and that sftp sent the rest
    assert len(started) == 1
    assert len(judged) == 1
    assert started[0] <= judged[0]  # the same answer may carry both thresholds
    assert len(taken) == 1
    assert taken[0] is not None
    assert not _fell_back(caplog)  # sftp sent the rest itself
    _arrived(sink, big, result)
    assert seen == sorted(seen)
    assert seen[-1] == SIZE
    assert journal.get(_request(sink, big, journal).journal_key) is None


def test_a_link_below_the_rate_keeps_asyncssh(
    sink: Sink,
    tmp_path: Path,
    journal: UploadJournal,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(openssh, "FAST", 1e15)
    caplog.set_level(logging.INFO, logger="skyframe")
    big = make_file(tmp_path / "src", "flight.mp4", os.urandom(SIZE))
    result = transfer.upload(_request(sink, big, journal))
    assert not _handed_over(caplog)
    _arrived(sink, big, result)


def _sftp_processes(parent: int | None = None) -> set[int]:
    """The ``sftp`` processes that are children of this one (or of ``parent``)."""
    me = str(parent or os.getpid())
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            name = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if fields[1] == me and name in ("sftp", "setpriv"):  # setpriv until it runs sftp
            found.add(int(entry.name))
    return found


def _alive(pids: set[int]) -> bool:
    """Whether any of ``pids`` is still running (a zombie is not)."""
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            return True
    return False


def test_a_link_fast_only_for_its_first_bytes_ends_the_sftp_started_early(
    sink: Sink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first MiB came back fast: sftp starts logging in. By the probe's end the rate has
    # fallen below the bar: that sftp is ended, its pipes closed, and nothing is handed over.
    plan = sink.endpoint.extras
    assert isinstance(plan, openssh.OpenSSH)
    monkeypatch.setattr(openssh, "PROBE_BYTES", 4 * 1024 * 1024)
    before = _sftp_processes()
    probe = openssh.Probe(0, plan)
    mib = 1024 * 1024
    try:
        assert probe(mib) is False  # the first acknowledgement starts the clock
        assert probe(2 * mib + 1) is False
        early = _sftp_processes() - before
        assert len(early) == 1
        monkeypatch.setattr(openssh, "FAST", 1e15)
        assert probe(5 * mib + 1) is False
        assert probe.take() is None
        assert not _sftp_processes() - before
    finally:
        probe.close()


def test_a_slow_link_starts_no_sftp(sink: Sink, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = sink.endpoint.extras
    assert isinstance(plan, openssh.OpenSSH)
    monkeypatch.setattr(openssh, "FAST", 1e15)
    before = _sftp_processes()
    probe = openssh.Probe(0, plan)
    for end in range(1, 64):
        assert probe(end * 256 * 1024) is False
    assert probe.take() is None
    assert not _sftp_processes() - before


@pytest.mark.parametrize("why", ["no sftp", "limit", "urgent", "glob", "small", "server"])
def test_what_stays_on_asyncssh(  # noqa: PLR0917 (fixtures)
    sink: Sink,
    tmp_path: Path,
    journal: UploadJournal,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    why: str,
) -> None:
    caplog.set_level(logging.INFO, logger="skyframe")
    name = "flight[1].mp4" if why == "glob" else "flight.mp4"
    big = make_file(tmp_path / "src", name, os.urandom(SIZE if why != "small" else 900_000))
    extra: dict[str, Any] = {}
    if why == "no sftp":
        monkeypatch.setattr(openssh.shutil, "which", lambda name: None)
    elif why == "limit":
        sink.limiter = Limiter([TokenBucket(1e12, name="test")])
    elif why == "urgent":
        extra["urgent"] = True
    elif why == "server":  # a server that may carry out writes out of order
        monkeypatch.setattr(openssh, "in_order", lambda fs: False)
    result = transfer.upload(_request(sink, big, journal, **extra))
    assert not _handed_over(caplog)
    _arrived(sink, big, result)


def test_a_handover_openssh_refuses_is_turned_off_and_asyncssh_sends_the_file(
    sink: Sink,
    tmp_path: Path,
    journal: UploadJournal,
    sftp_server: servers.SFTPServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # OpenSSH is shown another host key than the one asyncssh checked: it refuses to log in.
    plan = sink.endpoint.extras
    assert isinstance(plan, openssh.OpenSSH)
    wrong = sftp_server.wrong_known_hosts(tmp_path / "wrong_known_hosts")
    sink.endpoint.extras = dataclasses.replace(plan, known_hosts=str(wrong))
    caplog.set_level(logging.INFO, logger="skyframe")
    for name in ("first.mp4", "second.mp4"):
        big = make_file(tmp_path / "src", name, os.urandom(SIZE))
        result = transfer.upload(_request(sink, big, journal))
        data = big.read_bytes()
        assert result == TransferResult(len(data), hashlib.sha256(data).hexdigest())
        assert (Path(sink.root) / name).read_bytes() == data
    refusals = [r.getMessage() for r in caplog.records if "could not take over" in r.getMessage()]
    assert len(refusals) == 1, refusals
    assert "Host key verification failed" in refusals[0]
    # Two handovers that sent nothing (the first might have been a server's login limit).
    assert sum("the link is fast" in r.getMessage() for r in caplog.records) == 2


def test_a_stop_during_the_handover_ends_sftp_and_the_next_try_resumes(
    tmp_path: Path,
    journal: UploadJournal,
    sftp_server: servers.SFTPServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="skyframe")
    with LinkEmulator(servers.LOOPBACK, sftp_server.port, up_bps=mbit(80)) as link:
        entry = sftp_through(link, sftp_server, tmp_path)
        slow = open_sink(SinkConfig.model_validate(entry), tmp_path)
        try:
            slow.ensure_folder(slow.root)
            big = make_file(tmp_path / "src", "flight.mp4", os.urandom(SIZE))

            class Stopped(Exception):
                pass

            def progress(done: int) -> None:
                if _handed_over(caplog) and done > 2 * 1024 * 1024:
                    raise Stopped

            with pytest.raises(Stopped):
                transfer.upload(_request(slow, big, journal, progress=progress))
            assert not _fell_back(caplog)
            record = journal.get(_request(slow, big, journal).journal_key)
            assert record is not None
            assert record["offset"] > 2 * 1024 * 1024
            time.sleep(0.3)  # sftp, ended, sends nothing more
            temporary = Path(record["temporary"])
            size = temporary.stat().st_size
            time.sleep(0.5)
            assert temporary.stat().st_size == size
            caplog.clear()
            result = transfer.upload(_request(slow, big, journal))
            assert any("resuming" in r.getMessage() for r in caplog.records)
            _arrived(slow, big, result)
        finally:
            slow.close()


def test_a_pause_during_the_handover_hands_the_rest_back_to_asyncssh(
    tmp_path: Path,
    journal: UploadJournal,
    sftp_server: servers.SFTPServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="skyframe")
    paused = threading.Event()

    def pace(size: int) -> None:  # as the daemon's: waits while the pipeline is paused
        while paused.is_set():
            time.sleep(0.01)

    # 40 Mbit/s: sftp needs over 3 s for the rest, the pause is seen after PAUSED_AFTER
    with LinkEmulator(servers.LOOPBACK, sftp_server.port, up_bps=mbit(40)) as link:
        slow = open_sink(
            SinkConfig.model_validate(sftp_through(link, sftp_server, tmp_path)), tmp_path
        )
        try:
            slow.ensure_folder(slow.root)
            big = make_file(tmp_path / "src", "flight.mp4", os.urandom(SIZE))
            outcome: list[Any] = []

            def send() -> None:
                try:
                    outcome.append(transfer.upload(_request(slow, big, journal, pace=pace)))
                except BaseException as exc:
                    outcome.append(exc)

            thread = threading.Thread(target=send)
            thread.start()
            deadline = time.monotonic() + 20
            while not _handed_over(caplog) and time.monotonic() < deadline:
                time.sleep(0.01)
            paused.set()
            time.sleep(openssh.PAUSED_AFTER + 1.0)
            paused.clear()
            thread.join(60)
            assert len(outcome) == 1
            result = outcome[0]
            assert isinstance(result, TransferResult), result
            _arrived(slow, big, result)
            assert any("paused; going on" in r.getMessage() for r in caplog.records)
        finally:
            slow.close()


def test_the_plan_logs_in_only_as_asyncssh_would_and_checks_the_host_key() -> None:
    base: dict[str, Any] = {
        "host": "station.example",
        "port": 2222,
        "username": "crew",
        "key_files": ["/keys/id_ed25519"],
        "known_hosts": "/keys/known%hosts",
        "password": None,
        "passphrase": None,
        "ciphers": ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"],
        "timeout": 30.0,
        "keepalive": 15.0,
    }
    plan = openssh.plan(**base)
    assert plan is not None
    argv = plan.command("/usr/bin/sftp")
    assert argv[:5] == ["/usr/bin/sftp", "-b", "-", "-P", "2222"]
    options = {argv[i + 1] for i, arg in enumerate(argv) if arg == "-o"}
    assert {
        "BatchMode=yes",
        "StrictHostKeyChecking=yes",
        "UserKnownHostsFile=/keys/known%%hosts",
        "GlobalKnownHostsFile=none",
        "IdentitiesOnly=yes",
        "User=crew",
        "Ciphers=aes128-gcm@openssh.com,chacha20-poly1305@openssh.com",
        "KexAlgorithms=-sntrup*",  # none that asyncssh would not agree on
    } <= options
    assert argv[-4:] == ["-i", "/keys/id_ed25519", "--", "station.example"]
    no_keys = openssh.plan(**{**base, "key_files": []})
    assert no_keys is not None
    assert "IdentitiesOnly=yes" not in no_keys.command("sftp")  # the agent and ~/.ssh keys
    for refused in (
        {"password": "secret"},
        {"passphrase": "secret"},
        {"known_hosts": None},  # host_key_check: false
        {"host": "::1"},
        {"known_hosts": "/my keys/known_hosts"},
        {"key_files": ["/keys/id ed25519"]},
    ):
        assert openssh.plan(**{**base, **refused}) is None, refused


def test_a_changed_file_does_not_reuse_the_temporary_file_an_old_sftp_may_write_to(
    sink: Sink, tmp_path: Path, journal: UploadJournal
) -> None:
    # A run killed during a handover leaves its sftp writing into the temporary file. If the
    # file changed before the next run, that one starts anew in a new file, not over it.
    big = make_file(tmp_path / "src", "flight.mp4", os.urandom(SIZE))
    request = _request(sink, big, journal)
    temporary = Path(sink.temporary_path(request.remote_path))
    temporary.write_bytes(b"old" * 1000)
    old = temporary.stat().st_ino
    record = {"protocol": "sftp", "temporary": str(temporary), "size": 1, "mtime_ns": 1}
    journal.start(request.journal_key, {**record, "offset": 3000})
    with temporary.open("r+b") as left_behind:
        result = transfer.upload(request)
        left_behind.write(b"late writes of the old sftp")
        left_behind.flush()
    _arrived(sink, big, result)
    assert (Path(sink.root) / big.name).stat().st_ino != old


def test_a_temporary_file_longer_than_the_writes_keeps_asyncssh_to_the_end(
    sink: Sink, tmp_path: Path, journal: UploadJournal, caplog: pytest.LogCaptureFixture
) -> None:
    # An earlier try left bytes (and a hole) beyond where this one's writes stop: sftp's
    # put -a would go on from the file's end and leave them. asyncssh writes over them.
    caplog.set_level(logging.INFO, logger="skyframe")
    data = os.urandom(SIZE)
    big = make_file(tmp_path / "src", "flight.mp4", data)
    request = _request(sink, big, journal)
    temporary = Path(sink.temporary_path(request.remote_path))
    with temporary.open("wb") as held:
        held.write(data[: 4 * 1024 * 1024])
        held.write(bytes(3 * 1024 * 1024))  # a hole of zeros
        held.write(data[7 * 1024 * 1024 : 12 * 1024 * 1024])
    st = big.stat()
    record = {"protocol": "sftp", "temporary": str(temporary), "size": st.st_size}
    journal.start(request.journal_key, {**record, "mtime_ns": st.st_mtime_ns, "offset": 1 << 20})
    result = transfer.upload(request)
    assert not _handed_over(caplog)
    _arrived(sink, big, result)


def test_an_upload_an_earlier_run_handed_over_goes_on_once_its_sftp_has_ended(
    sink: Sink,
    tmp_path: Path,
    journal: UploadJournal,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A run killed during a handover leaves its sftp sending: the next run waits until the
    # temporary file no longer grows, then goes on from its end (an OpenSSH server's writes
    # land in order), not from the journal's older offset.
    monkeypatch.setattr(openssh, "STILL", 1.0)
    caplog.set_level(logging.INFO, logger="skyframe")
    data = os.urandom(SIZE)
    big = make_file(tmp_path / "src", "flight.mp4", data)
    request = _request(sink, big, journal)
    temporary = Path(sink.temporary_path(request.remote_path))
    mib = 1024 * 1024
    temporary.write_bytes(data[: 8 * mib])
    st = big.stat()
    record = {"protocol": "sftp", "temporary": str(temporary), "size": st.st_size}
    journal.start(
        request.journal_key,
        {**record, "mtime_ns": st.st_mtime_ns, "offset": 2 * mib, "handover": "killed-run"}
        | {"ordered": True},
    )

    def left_behind() -> None:  # that run's sftp, still sending
        with temporary.open("r+b") as remote:
            for offset in range(8 * mib, 14 * mib, mib):
                remote.seek(offset)
                remote.write(data[offset : offset + mib])
                remote.flush()
                time.sleep(0.3)

    sending = threading.Thread(target=left_behind)
    sending.start()
    try:
        result = transfer.upload(request)
    finally:
        sending.join()
    said = [r.getMessage() for r in caplog.records]
    assert any("waiting for an sftp of an earlier run to end" in m for m in said), said
    assert any(f"at byte {14 * mib}" in m for m in said), said
    _arrived(sink, big, result)


#: A run that hands a large file over to sftp, says so once sftp's writes are seen, and
#: goes on until it is killed.
_KILLED_RUN = """
import json, logging, os, sys, time
from pathlib import Path
from skyframe.config import SinkConfig
from skyframe.journal import UploadJournal
from skyframe.protocols.sftp import openssh, transfer
from skyframe.storage import TransferRequest, open_sink

openssh.MIN_SIZE = openssh.PROBE_BYTES = openssh.EARLY_BYTES = 1024 * 1024
openssh.FAST = 1
transfer.WINDOW = 1024 * 1024  # the handover comes a MiB after the probe, not 8
entry, folder, path = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
sink = open_sink(SinkConfig.model_validate(entry), folder)
sink.ensure_folder(sink.root)
journal = UploadJournal(folder / "journal")
st = path.stat()
handed = []

class Handover(logging.Handler):
    def emit(self, record):
        if "the link is fast" in record.getMessage():
            handed.append(int(record.getMessage().rsplit(" ", 1)[1]))

logging.getLogger("skyframe").addHandler(Handover())
logging.getLogger("skyframe").setLevel(logging.INFO)

def progress(done):
    if handed and done > handed[0] + 1024 * 1024:  # sftp has written a MiB
        print("sending", flush=True)

request = TransferRequest(
    sink, path, sink.remote_path(path.name), st.st_size, st.st_mtime_ns,
    journal=journal, progress=progress,
)
transfer.upload(request)
"""


def test_a_killed_run_takes_its_sftp_with_it(
    tmp_path: Path, sftp_server: servers.SFTPServer
) -> None:
    # SIGKILL leaves no time to end sftp: it is started so that the kernel ends it then.
    if not openssh._ended_with_us():
        pytest.fail("util-linux's setpriv is missing: install Debian's util-linux (.ci/setup does)")
    big = make_file(tmp_path / "src", "flight.mp4", os.urandom(SIZE))
    # 8 Mbit/s: the rest takes sftp over 15 s, which it would go on sending after the kill
    with LinkEmulator(servers.LOOPBACK, sftp_server.port, up_bps=mbit(8)) as link:
        entry = sftp_through(link, sftp_server, tmp_path)
        run = subprocess.Popen(
            [sys.executable, "-c", _KILLED_RUN, json.dumps(entry), str(tmp_path), str(big)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert run.stdout is not None
            assert run.stdout.readline() == "sending\n"
            senders = _sftp_processes(run.pid)
            assert len(senders) == 1, senders
            run.kill()
            run.wait()
            deadline = time.monotonic() + 3
            while _alive(senders) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _alive(senders), "the killed run's sftp goes on"
        finally:
            run.kill()
            run.wait()
            if run.stdout is not None:
                run.stdout.close()
