"""The rest of a large SFTP upload on a fast link, handed to OpenSSH's own ``sftp`` client.

asyncssh frames and encrypts every SSH packet in Python, on the one thread of the sink's
event loop: on a link faster than that thread (a LAN, an office's fibre) it is the limit, and
OpenSSH's client, in C, goes further on the same cipher. A large upload starts on asyncssh like
any other (:mod:`skyframe.protocols.sftp.transfer`); once the server has acknowledged
:data:`PROBE_BYTES` at :data:`FAST` or more, the writes stop at a clean offset, and the rest
goes through ``sftp -b -`` with ``put -a``, which goes on from the temporary file's end, in a
process of its own. ``sftp`` starts once :data:`EARLY_BYTES` came back that fast, and logs in
while the probe goes on: its batch comes when the probe ends. Meanwhile skyframe hashes the
rest of the file and reads the temporary file's size, for the journal (a cut resumes from
there) and for progress. On a field link the probe never reaches that rate, and nothing
changes.

Only where OpenSSH logs in without asking anything, as asyncssh did: key files without a
passphrase, or the agent and ``~/.ssh``'s keys, and the host key checked against the sink's
``known_hosts`` file (``StrictHostKeyChecking=yes``, ``BatchMode=yes``). Not for a password
login, a sink whose host key is not checked, a bandwidth limit (``sftp -l`` could not follow
a shared budget or a schedule), a pause (the process is stopped and asyncssh goes on), or a
name that ``sftp``'s batch syntax would not carry as it is. An ``sftp`` that exits without
sending anything (a login or an option OpenSSH refuses) turns the handover off for the sink,
said once in the log: its uploads go on through asyncssh alone.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

from skyframe.storage import Sink, SourceReader, TransferRequest

log = logging.getLogger(__name__)

MIN_SIZE = 64 * 1024 * 1024  #: files below this size stay on asyncssh
PROBE_BYTES = 4 * 1024 * 1024  #: acknowledged by the server before the rate is judged
FAST = 40_000_000  #: bytes a second from which the rest goes through OpenSSH (320 Mbit/s)
#: acknowledged at :data:`FAST` or more before ``sftp`` starts, to log in during the probe
EARLY_BYTES = 1024 * 1024
POLL = 0.25  #: seconds between two looks at the temporary file's size
PAUSED_AFTER = 1.0  #: seconds the pipeline's pace may wait before it counts as a pause
REFUSALS = 2  #: handovers in a row that sent nothing before they are turned off for a sink
STILL = 5.0  #: seconds an earlier run's temporary file must not grow before an upload goes on
STILL_MAX = 300.0  #: the longest wait for it (its sftp ends when its link is gone for 45 s)
HASH_STEP = 8 * 1024 * 1024  #: bytes hashed between two looks at whether the upload stopped
STOP_WAIT = 5.0  #: seconds ``sftp`` gets to exit after it is told to
HANDOVERS = 3  #: handovers of one upload that did not finish, before asyncssh sends the rest
#: What a path may hold to be written in ``sftp``'s batch syntax as it is, between double
#: quotes: no quote, backslash or glob character (``put`` expands its local argument).
_PLAIN = re.compile(r"[\w./ +,=@%:~-]+")
#: What a file name given to OpenSSH as an option may hold (no space: options split there).
_OPTION_PLAIN = re.compile(r"[\w./+,=@%:~-]+")
_off: set[str] = set()  #: sinks (their keys) whose handover OpenSSH refused
_refused: dict[str, int] = {}  #: sinks' handovers in a row that sent nothing
#: Marks the journal records of handovers this process runs: one marked by another (a run
#: that was killed) may still have its sftp writing into the temporary file.
RUN_ID = uuid.uuid4().hex
_off_lock = threading.Lock()


class HandoverFailed(Exception):
    """``sftp`` did not finish the upload; the next try resumes from the journal."""


@dataclass(frozen=True)
class OpenSSH:
    """How OpenSSH's ``sftp`` reaches a sink: as asyncssh does, with nothing asked."""

    host: str
    port: int
    username: str
    key_files: tuple[str, ...]  #: () : the agent and ~/.ssh's keys, as ssh finds them
    known_hosts: str
    ciphers: tuple[str, ...]
    timeout: float
    keepalive: float

    def command(self, program: str) -> list[str]:
        """The ``sftp`` command line, reading its batch from standard input."""
        options = {
            "BatchMode": "yes",
            "StrictHostKeyChecking": "yes",
            "UserKnownHostsFile": _literal(self.known_hosts),
            "GlobalKnownHostsFile": "none",
            "UpdateHostKeys": "no",  # the sink's known_hosts is read, never written
            "VerifyHostKeyDNS": "no",  # and is the only source of trusted keys, as for asyncssh
            "User": self.username,
            "ConnectTimeout": str(max(1, round(self.timeout))),
            "ServerAliveInterval": str(max(1, round(self.keepalive))),
            "ServerAliveCountMax": "3",
            "Ciphers": ",".join(self.ciphers),
            # The key exchanges asyncssh agrees on, which carries the rest of the transfer
            # (ML-KEM hybrids, curve25519...): without the NTRU Prime hybrid, which asyncssh
            # does not offer, and whose key generation is slow in OpenSSH's client.
            "KexAlgorithms": "-sntrup*",
        }
        if self.key_files:
            options["IdentitiesOnly"] = "yes"
        argv = [program, "-b", "-", "-P", str(self.port)]
        for name, value in options.items():
            argv += ["-o", f"{name}={value}"]
        for key in self.key_files:
            argv += ["-i", _literal(key)]
        return [*argv, "--", self.host]


def _literal(path: str) -> str:
    """A file name as OpenSSH reads it in an option: ``%`` would start a token."""
    return path.replace("%", "%%")


def plan(
    *,
    host: str,
    port: int,
    username: str,
    key_files: list[str],
    known_hosts: str | None,
    password: str | None,
    passphrase: str | None,
    ciphers: list[str],
    timeout: float,
    keepalive: float,
) -> OpenSSH | None:
    """How OpenSSH would reach the sink, or None where it would not log in as asyncssh does
    without asking (see the module's docstring)."""
    if os.name != "posix" or password is not None or passphrase is not None:
        return None
    if known_hosts is None:  # host_key_check: false
        return None
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).version == 6:  # sftp's destination syntax has no room
            return None
    files = [known_hosts, *key_files]
    if not all(_OPTION_PLAIN.fullmatch(f) for f in files) or not _OPTION_PLAIN.fullmatch(host):
        return None
    if not _OPTION_PLAIN.fullmatch(username) or not all(map(_OPTION_PLAIN.fullmatch, ciphers)):
        return None
    return OpenSSH(
        host, port, username, tuple(key_files), known_hosts, tuple(ciphers), timeout, keepalive
    )


def in_order(fs: object) -> bool:
    """Whether the server is OpenSSH's, whose sftp-server carries out a session's writes in
    the order they come: the temporary file's size is then how far it holds the file, which
    the journal takes while ``sftp`` sends (another server may write them at once, and leave
    holes below its size)."""
    try:
        version = fs.client.get_extra_info("server_version")  # type: ignore[attr-defined]
    except Exception:  # not connected: no handover now
        return False
    return isinstance(version, str) and version.startswith("SSH-2.0-OpenSSH_")


def wait_until_still(size_of: Callable[[], int | None]) -> None:
    """Wait until a temporary file an earlier run's ``sftp`` may still write has not grown for
    :data:`STILL` seconds (that sftp ended, or its link did), at most :data:`STILL_MAX`."""
    deadline = time.monotonic() + STILL_MAX
    size, since = size_of(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < STILL:
        time.sleep(POLL)
        now = size_of()
        if now != size:
            size, since = now, time.monotonic()


def program() -> str | None:
    """OpenSSH's ``sftp`` on the PATH, if any."""
    return shutil.which("sftp")


def usable(request: TransferRequest, temporary: str) -> bool:
    """Whether the rest of this upload may be handed over when the link proves fast."""
    sink = request.sink
    return (
        request.size >= MIN_SIZE
        and not request.urgent
        and not sink.limiter
        and sink.key not in _off
        and _PLAIN.fullmatch(str(request.local_path)) is not None
        and _PLAIN.fullmatch(temporary) is not None
        and program() is not None
    )


class Probe:
    """Judges, as the server acknowledges an upload's first bytes, whether the link is fast
    enough for the handover: call it with each acknowledged end.

    The rate is timed from the first acknowledgement: the opening's round trips and the
    writes that fill the window before it say nothing of the link's pace, and from then on
    the answers come back as fast as the link carries the writes."""

    def __init__(self, start: int, openssh: OpenSSH | None = None) -> None:
        self.start = start
        self.first: tuple[int, float] | None = None  #: the first acknowledged end, and when
        self.rate = 0.0
        self._openssh = openssh
        #: ``sftp``, started once :data:`EARLY_BYTES` came back fast: it logs in while the
        #: probe goes on, and waits for its batch (:meth:`take`, or :meth:`close`)
        self._process: subprocess.Popen[bytes] | None = None

    def __call__(self, acknowledged: int) -> bool:
        now = time.monotonic()
        if self.first is None:
            if acknowledged > self.start:
                self.first = (acknowledged, now)
            return False
        done = acknowledged - self.first[0]
        rate = done / max(now - self.first[1], 1e-6)
        if done >= EARLY_BYTES and rate >= FAST and self._process is None and self._openssh:
            self._process = _start(self._openssh)
        if done < PROBE_BYTES:
            return False
        self.rate = rate
        if rate < FAST:
            self.close()  # a link fast for a moment only: its sftp goes
        return rate >= FAST

    def take(self) -> subprocess.Popen[bytes] | None:
        """The ``sftp`` started early, now the caller's to end."""
        process, self._process = self._process, None
        return process

    def close(self) -> None:
        """End an ``sftp`` started early and not taken."""
        process, self._process = self._process, None
        if process is not None:
            _stop(process)
            for pipe in (process.stdin, process.stderr):
                if pipe is not None:
                    pipe.close()


def _refusal(sink: Sink, why: str) -> None:
    """A handover that sent nothing: the second in a row turns them off for the sink (a
    first may be the server's limit of logins starting at once)."""
    with _off_lock:
        _refused[sink.key] = _refused.get(sink.key, 0) + 1
        if _refused[sink.key] < REFUSALS:
            return
    turn_off(sink, why)


def turn_off(sink: Sink, why: str) -> None:
    """No more handovers for this sink (until skyframe starts again)."""
    with _off_lock:
        if sink.key in _off:
            return
        _off.add(sink.key)
    log.warning(
        "%s: OpenSSH's sftp could not take over large uploads (%s); they go on through "
        "asyncssh alone",
        sink.display,
        why,
    )


def send_rest(
    request: TransferRequest,
    openssh: OpenSSH,
    reader: SourceReader,
    *,
    temporary: str,
    offset: int,
    size_of: Callable[[], int | None],
    confirmed: Callable[[int], None],
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Send the file from ``offset`` (the temporary file's size, every byte before it
    acknowledged) with ``sftp`` (``process``: one started already, waiting for its batch),
    hashing the rest meanwhile; ``size_of()`` reads the temporary file's size, and
    ``confirmed(end)`` is told it as it grows.

    What the request's ``pace`` and ``progress`` raise (the daemon stops) ends ``sftp`` and
    is raised; HandoverFailed when ``sftp`` ends without the whole file there (turned off for
    the sink when it sent nothing), or a pause came."""
    sink = request.sink
    if process is None:
        process = _start(openssh)
    if process is None:
        raise HandoverFailed("sftp is no longer on the PATH")
    log.info(
        "%s: %s: the link is fast: OpenSSH's sftp sends the rest from byte %d",
        sink.display,
        request.remote_path,
        offset,
    )
    stop = threading.Event()
    pool = ThreadPoolExecutor(2, thread_name_prefix="skyframe-openssh")
    hashing = pool.submit(_hash_rest, reader, request.size, stop)
    pacing = _Pacer(request)
    errors = pool.submit(process.communicate, _batch(request, temporary))
    reached = offset
    try:
        while not errors.done():
            wait([errors], timeout=POLL)
            if pacing.paused():
                raise HandoverFailed("paused")
            size = size_of()
            if size is not None and size > reached:
                reached = size
                confirmed(reached)
    except BaseException:
        stop.set()
        raise
    finally:
        _stop(process)  # never left running, whatever ended the watch
        pacing.close()
        pool.shutdown()  # sftp has ended: its output is read; the hashing stops or ends
    hashing.result()
    size = size_of()
    if process.returncode == 0 and size == request.size:
        _refused.pop(sink.key, None)
        confirmed(request.size)
        return
    said = _last_line(errors.result()[1])
    if size is not None and size > reached:
        confirmed(size)
        reached = size
    if reached == offset:  # nothing went: its login or its options, not the link
        _refusal(sink, said or f"exit status {process.returncode}")
    else:
        _refused.pop(sink.key, None)
    raise HandoverFailed(said or f"sftp exited with status {process.returncode}")


def _start(openssh: OpenSSH) -> subprocess.Popen[bytes] | None:
    """``sftp``, logging in and then waiting for its batch on its input (None: not on the
    PATH any more)."""
    sftp = program()
    if sftp is None:
        return None
    return subprocess.Popen(
        [*_ended_with_us(), *openssh.command(sftp)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@functools.cache
def _ended_with_us() -> tuple[str, ...]:
    """What to start ``sftp`` through so that it ends when skyframe does, killed included: on
    Linux, util-linux's ``setpriv --pdeathsig TERM`` (the kernel sends it SIGTERM when the
    thread that started it ends; sftp then ends its ssh). Elsewhere nothing: a killed run's
    sftp goes on, and the next run waits for it (:func:`wait_until_still`)."""
    setpriv = shutil.which("setpriv") if sys.platform == "linux" else None
    if setpriv is None:
        return ()
    try:
        said = subprocess.run(
            [setpriv, "--help"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ()
    return (setpriv, "--pdeathsig", "TERM", "--") if "--pdeathsig" in said.stdout else ()


def _hash_rest(reader: SourceReader, size: int, stop: threading.Event) -> None:
    """Read (and hash) the rest of the file, a few MiB at a time, until ``stop``."""
    while reader.bytes_read < size and not stop.is_set():
        before = reader.bytes_read
        reader.start_at(min(before + HASH_STEP, size))
        if reader.bytes_read == before:  # shorter than it was: check_unchanged says so
            return


def _batch(request: TransferRequest, temporary: str) -> bytes:
    """The batch: append the rest of the local file to the temporary file."""
    return f'put -a "{request.local_path}" "{temporary}"\n'.encode()


def _last_line(stderr: object) -> str:
    """What ``sftp`` said last, in one line."""
    if not isinstance(stderr, bytes):
        return ""
    lines = [line.strip().rstrip(".") for line in stderr.decode(errors="replace").splitlines()]
    return "; ".join([line for line in lines if line][-3:])  # the reason, then "Connection closed"


def _stop(process: subprocess.Popen[bytes]) -> None:
    """End ``sftp`` (what it wrote stays, and the journal knows how far it got)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_WAIT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class _Pacer:
    """The request's ``pace(0)`` (it waits while the pipeline is paused, and raises when the
    daemon stops) asked over and over in a thread of its own, so that a pause is seen
    without holding the watch of the upload."""

    def __init__(self, request: TransferRequest) -> None:
        self._request = request
        self._closed = threading.Event()
        self._since = 0.0  #: when the pending call began; 0: none pending
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="skyframe-openssh-pace", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.wait(POLL / 2):
            self._since = time.monotonic()
            try:
                self._request.pace(0)
            except BaseException as exc:
                self._error = exc
                return
            self._since = 0.0

    def paused(self) -> bool:
        """Whether the pipeline is paused (its pace has waited a while); raises what pace
        raised (the daemon stops)."""
        if self._error is not None:
            raise self._error
        since = self._since
        return bool(since) and time.monotonic() - since > PAUSED_AFTER

    def close(self) -> None:
        self._closed.set()
