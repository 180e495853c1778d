"""Plain helpers the tests share, one implementation each.

Fixtures are in ``conftest.py`` (which uses these), fakes (clocks, a counting proxy, a GCS
server of our own, an event recorder) in ``fakes/``, and the real servers in ``servers.py``.
Tests import from here as they import ``servers``: ``from helpers import make_file``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import servers
from fakes.link import LinkEmulator
from fakes.proxy import CountingProxy
from fakes.recorder import Recorder

from skyframe.engine import Engine, RunSummary
from skyframe.journal import UploadJournal
from skyframe.pipeline import load_project
from skyframe.storage import TransferRequest

REPO = Path(__file__).resolve().parent.parent

WriteConfig = Callable[[str], Path]
"""The ``write_config`` fixture: writes a skyframe.yaml (dedented) and returns its path."""


# --- files -----------------------------------------------------------------------------------


def make_file(
    root: Path, relpath: str, data: bytes | str = b"data", mtime: float | None = None
) -> Path:
    """Create a file (and its folders) under root."""
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def tree_files(root: Path) -> dict[str, bytes]:
    """Every file under root (relative POSIX path -> bytes); {} when root does not exist."""
    files = {}
    for path in sorted(root.rglob("*")):
        try:
            if path.is_file():
                files[path.relative_to(root).as_posix()] = path.read_bytes()
        except FileNotFoundError:  # a temporary file renamed into place meanwhile
            continue
    return files


def outbox_files(root: Path) -> dict[str, bytes]:
    """What the local sink ``outbox`` of the project in ``root`` holds."""
    return tree_files(root / "outbox")


def write_random(path: Path, size: int, seed: int) -> str:
    """Write ``size`` pseudo-random bytes (deterministic per seed); return their sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    block = hashlib.sha256(str(seed).encode()).digest() * (1 << 15)  # 1 MiB pattern
    counter = 0
    with path.open("wb") as out:
        left = size
        while left:
            # Vary every block so no two parts are equal (an ETag must not match by chance).
            piece = counter.to_bytes(8, "big") + block[8 : min(len(block), left)]
            piece = piece[:left]
            out.write(piece)
            digest.update(piece)
            left -= len(piece)
            counter += 1
    return digest.hexdigest()


# --- plugins, rules and processes of a test project --------------------------------------------


def write_plugin(folder: Path, name: str, body: str) -> Path:
    """Write ``folder/name`` (a plugin, rules.py, processes.py...) from dedented ``body``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(body).lstrip(), encoding="utf-8")
    return path


def plugin_module(project: Path, name: str) -> Any:
    """The module most recently loaded from plugins/NAME of the project in ``project``."""
    from skyframe.plugin_manager import private_module_name

    return sys.modules[private_module_name(project / "plugins" / name)]


# --- waiting ---------------------------------------------------------------------------------


def wait_for(
    condition: Callable[[], object],
    *,
    what: str = "the condition",
    timeout: float = 10.0,
    interval: float = 0.02,
) -> None:
    """Poll ``condition`` every ``interval`` seconds until it holds; fail naming ``what`` once
    ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# --- the engine in this process --------------------------------------------------------------


def run_once(config: Path, *plugins: object) -> RunSummary:
    """``skyframe run --once`` in this process, with ``plugins`` registered as well."""
    project = load_project(config)
    for plugin in plugins:
        project.pm.register(plugin)
    engine = Engine(project.config, project.pm, project.pipelines)
    try:
        return engine.run_once()
    finally:
        engine.close()


class Daemon:
    """``Engine.run_daemon`` in a thread, for ``with`` (or ``__enter__`` and ``stop()``): started,
    caught up, then stopped. ``recorder`` collects its lifecycle events, ``summary`` is the
    run's once it ended."""

    def __init__(self, config: Path, *plugins: object) -> None:
        project = load_project(config)
        self.recorder = Recorder()
        project.pm.register(self.recorder, name="test-recorder")
        for plugin in plugins:
            project.pm.register(plugin)
        self.engine = Engine(project.config, project.pm, project.pipelines)
        self.summary: RunSummary | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self._stopped = False

    def _run(self) -> None:
        self.summary = self.engine.run_daemon()

    def __enter__(self) -> Daemon:
        self.thread.start()
        assert self.engine.ready.wait(30), "the daemon did not finish its catch-up scan"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the daemon and close its engine (once; not if it was never started)."""
        if self.thread.ident is None or self._stopped:
            return
        self._stopped = True
        self.engine.stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the daemon did not stop"
        self.engine.close()


# --- the CLI in a subprocess -----------------------------------------------------------------


def skyframe(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``skyframe ARGS`` run to its end in ``cwd`` (output captured, never raises)."""
    return subprocess.run(
        [sys.executable, "-m", "skyframe", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        check=False,
    )


def start_skyframe(config: Path, *args: str) -> subprocess.Popen[bytes]:
    """``skyframe ARGS CONFIG`` started beside the config, its output (both streams) piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "skyframe", *args, str(config)],
        cwd=config.parent,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def finish(process: subprocess.Popen[bytes], timeout: float = 180) -> str:
    """The output of a ``start_skyframe`` process, which must end with exit code 0 within
    ``timeout`` seconds (else it is killed, and the test fails with what it wrote)."""
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        raise AssertionError(
            f"skyframe did not end within {timeout:g} s:\n{out.decode(errors='replace')[-3000:]}"
        ) from None
    text = out.decode(errors="replace")
    assert process.returncode == 0, text
    return text


def spawn_daemon(cwd: Path, log: Path, config: str = "skyframe.yaml") -> subprocess.Popen[bytes]:
    """``skyframe run CONFIG`` started in ``cwd``, its output appended to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "skyframe", "run", config],
            cwd=cwd,
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
        )


# --- the HTTP API ----------------------------------------------------------------------------

API_TOKEN = "s3cr3t-token-for-tests"

API_CONFIG = """\
state_dir: .state
retry: {max_attempts: 1, initial: 50ms, max: 100ms}
shutdown_grace: 1s
api: {listen: "127.0.0.1:0"TOKEN}
pipelines:
  - name: survey
    source: {path: incoming, settle: 0, rescan: 1h}
    sinks:
      - url: outbox
        BWLIMIT
  - name: logs
    source: {path: logs, settle: 0, rescan: 1h}
    sinks:
      - url: logbox
"""
"""The config of the ``daemon`` fixture: replace TOKEN and BWLIMIT (with text or "")."""


def _exchange(req: urllib.request.Request) -> tuple[int, Any, dict[str, str]]:
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            raw, status, head = response.read(), response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        with exc:
            raw, status, head = exc.read(), exc.code, dict(exc.headers)
    try:
        return status, json.loads(raw), head
    except ValueError:
        return status, raw.decode(errors="replace"), head


def request(
    url: str,
    method: str = "GET",
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, dict[str, str]]:
    """(status, decoded JSON or text, headers) of one request; never raises on HTTP errors."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    for key, value in (headers or {}).items():
        req.add_header(key, value)
    return _exchange(req)


def send(
    url: str, body: bytes, headers: dict[str, str] | None = None, method: str = "POST"
) -> tuple[int, Any, dict[str, str]]:
    """(status, decoded JSON or text, headers) of a request with a raw body."""
    req = urllib.request.Request(url, data=body, method=method)
    req.add_header("Content-Type", "application/json")
    for key, value in (headers or {}).items():
        req.add_header(key, value)
    return _exchange(req)


def url_of(d: Daemon) -> str:
    """The base URL of an in-process daemon's API."""
    assert d.engine.api is not None, "the API did not start"
    return d.engine.api.url


# --- sinks on the test servers ---------------------------------------------------------------


def one_sink_config(sink: dict[str, Any], *, pipeline: str, retry: str, settle: str = "0.2") -> str:
    """A config with one pipeline from incoming/ to ``sink`` (a url/options mapping)."""
    return f"""
        state_dir: state
        retry: {retry}
        pipelines:
          - name: {pipeline}
            source: {{path: incoming, settle: {settle}}}
            sinks:
              - {json.dumps(sink)}
        """


def write_sink_config(folder: Path, sink: dict[str, Any], **top: Any) -> Path:
    """folder/skyframe.yaml: one pipeline from incoming/ (settle 0) to ``sink``, state in
    state/, five attempts; ``top`` adds or replaces top-level keys."""
    config = {
        "state_dir": "state",
        "retry": {"max_attempts": 5, "initial": 0.2, "max": 1},
        "pipelines": [
            {"name": "survey", "source": {"path": "incoming", "settle": 0}, "sinks": [sink]}
        ],
        **top,
    }
    path = folder / "skyframe.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return path


def unique_name(prefix: str) -> str:
    """A bucket or folder name no other test uses (lowercase, as buckets need)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def s3_sink(server: servers.S3Server, **extra: Any) -> dict[str, Any]:
    """A sink entry for a fresh bucket on the test S3 server."""
    bucket = unique_name("b")
    server.make_bucket(bucket)
    options = {"endpoint_url": server.endpoint_url, "key": server.key, "secret": server.secret}
    return {"url": f"s3://{bucket}/drop", "options": {**options, **extra}}


def sftp_sink(server: servers.SFTPServer, **extra: Any) -> dict[str, Any]:
    """A sink entry for a fresh folder on the test SFTP server."""
    folder = server.root / unique_name("f")
    options = {"key_file": str(server.client_key), "known_hosts": str(server.known_hosts)}
    url = f"sftp://{server.username}@127.0.0.1:{server.port}{folder}"
    return {"url": url, "options": {**options, **extra}}


def sftp_through(
    proxy: CountingProxy | LinkEmulator, server: servers.SFTPServer, folder: Path
) -> dict[str, Any]:
    """A sink entry for a fresh folder on the test SFTP server, reached through ``proxy`` (or
    a link emulator): the server's host key, vouched for at its address, in
    folder/known_hosts."""
    known_hosts = folder / "known_hosts"
    known_hosts.write_text(
        f"[{servers.LOOPBACK}]:{proxy.port} {server.host_public_key}\n", encoding="utf-8"
    )
    remote = server.root / unique_name("f")
    return {
        "url": f"sftp://{server.username}@{servers.LOOPBACK}:{proxy.port}{remote}",
        "options": {"key_file": str(server.client_key), "known_hosts": str(known_hosts)},
    }


def gcs_sink(server: servers.GCSServer, **extra: Any) -> dict[str, Any]:
    """A sink entry for a fresh bucket on the test GCS server."""
    bucket = unique_name("b")
    server.make_bucket(bucket)
    options = {"endpoint_url": server.endpoint_url, "token": "anon"}
    return {"url": f"gcs://{bucket}/drop", "options": {**options, **extra}}


def azure_sink(server: servers.AzuriteServer, **extra: Any) -> dict[str, Any]:
    """A sink entry for a fresh container on the test Azurite server (the skyframe-azure
    protocol plugin, found through its entry point)."""
    container = unique_name("c")
    server.make_container(container)
    options = {"connection_string": server.connection_string}
    return {"url": f"az://{container}/drop", "options": {**options, **extra}}


def aws_profile(
    monkeypatch: pytest.MonkeyPatch, folder: Path, server: servers.S3Server, name: str
) -> None:
    """The server's credentials as profile ``name`` of a shared credentials file, and none in
    the environment (the profile is not selected: set AWS_PROFILE or the sink's option)."""
    credentials = folder / "aws-credentials"
    credentials.write_text(
        f"[{name}]\naws_access_key_id = {server.key}\naws_secret_access_key = {server.secret}\n",
        encoding="utf-8",
    )
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(folder / "no-config"))


def assert_s3_holds(
    server: servers.S3Server, sink: dict[str, Any], files: dict[str, bytes]
) -> None:
    """Every file is on the server under the sink's root, byte for byte."""
    check = server.filesystem()
    try:
        root = sink["url"].removeprefix("s3://")
        for name, data in files.items():
            assert check.cat_file(f"{root}/{name}") == data
    finally:
        servers.close_filesystem(check)


def file_request(sink: Any, local: Path, journal: UploadJournal | None = None) -> TransferRequest:
    """A request to send ``local`` to its own name at the sink's root."""
    st = local.stat()
    return TransferRequest(
        sink=sink,
        local_path=local,
        remote_path=sink.remote_path(local.name),
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        journal=journal,
    )


def batch_requests(sink: Any, root: Path, files: dict[str, bytes]) -> list[TransferRequest]:
    """Files written under root, as requests to send them to the same names on the sink."""
    requests = []
    for name, data in files.items():
        path = make_file(root, name, data)
        st = path.stat()
        requests.append(
            TransferRequest(sink, path, sink.remote_path(name), st.st_size, st.st_mtime_ns)
        )
    return requests


# --- uploads killed and resumed (a server behind a counting proxy) -----------------------------


@dataclass
class Remote:
    """One protocol's server behind a proxy, and how to look at what landed."""

    kind: str
    proxy: CountingProxy
    sink: dict[str, Any]
    server: Any

    def sha256(self, name: str) -> str | None:
        """The sha256 of the object at ``name`` under the sink root (None if absent)."""
        fs = self.server.filesystem()
        try:
            path = f"{self.root}/{name}"
            fs.invalidate_cache()
            if not fs.exists(path):
                return None
            digest = hashlib.sha256()
            with fs.open(path, "rb", block_size=8 * 1024 * 1024) as handle:
                while chunk := handle.read(8 * 1024 * 1024):
                    digest.update(chunk)
            return digest.hexdigest()
        finally:
            servers.close_filesystem(fs)

    def metadata_sha256(self, name: str) -> str | None:
        """The sha256 the object carries as metadata (SFTP has none)."""
        if self.kind == "sftp":
            return None
        fs = self.server.filesystem()
        try:
            if self.kind == "s3":
                bucket, key = f"{self.root}/{name}".split("/", 1)
                head = fs.call_s3("head_object", Bucket=bucket, Key=key)
                found: str | None = head.get("Metadata", {}).get("sha256")
                return found
            info = fs.info(f"{self.root}/{name}")
            found = (info.get("metadata") or {}).get("sha256")
            return found
        finally:
            servers.close_filesystem(fs)

    def _uncommitted_blocks(self) -> list[str]:
        from azure.core.exceptions import ResourceNotFoundError

        container, prefix = self.root.split("/", 1)
        with self.server.service() as service:
            found = []
            blobs = service.get_container_client(container).list_blobs(
                name_starts_with=prefix, include=["uncommittedblobs"]
            )
            for blob in blobs:
                client = service.get_blob_client(container, blob.name)
                try:
                    committed, uncommitted = client.get_block_list("all")
                except ResourceNotFoundError:
                    continue
                # Azure discards the uncommitted blocks of a blob when a block list is
                # committed or the blob is put whole; Azurite keeps listing them, so only a
                # blob that was never published counts here.
                if not committed and blob.size == 0:
                    found += [f"{blob.name}:{block.id}" for block in uncommitted]
            return found

    @property
    def root(self) -> str:
        url: str = self.sink["url"]
        if self.kind == "sftp":
            return url.split(str(self.proxy.port), 1)[1]
        return url.split("://", 1)[1]

    def leftovers(self) -> list[str]:
        """Uploads still open on the server: S3 multipart uploads, SFTP temporary files."""
        fs = self.server.filesystem()
        try:
            if self.kind == "s3":
                bucket = self.root.split("/", 1)[0]
                page = fs.call_s3("list_multipart_uploads", Bucket=bucket)
                return [u["Key"] for u in page.get("Uploads", [])]
            if self.kind == "sftp":
                fs.invalidate_cache()
                try:
                    return [p for p in fs.find(self.root, withdirs=False) if ".skyframe-" in p]
                except FileNotFoundError:
                    return []
            if self.kind == "azure":  # blocks staged and never committed
                return self._uncommitted_blocks()
            return []
        finally:
            servers.close_filesystem(fs)


def kill_midway(process: subprocess.Popen[bytes], proxy: CountingProxy, at: int) -> None:
    """SIGKILL the run once ``at`` bytes went up through the proxy."""
    deadline = time.monotonic() + 120
    while proxy.bytes_up < at:
        if process.poll() is not None:
            out = process.stdout.read().decode(errors="replace") if process.stdout else ""
            pytest.fail(f"the run ended before it could be killed midway:\n{out}")
        assert time.monotonic() < deadline, f"only {proxy.bytes_up} bytes went up in 120 s"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    if process.stdout:
        process.stdout.close()


def journal_entries(folder: Path) -> list[Any]:
    """The upload journal's entries of the project in ``folder`` (its state in state/)."""
    journal = UploadJournal(folder / "state" / "uploads")
    try:
        return journal.entries()
    finally:
        journal.close()


# --- drone photos ----------------------------------------------------------------------------

DRONE_DATA = REPO / "tests" / "data" / "drone"  #: real photos and their truth (see its README)
EBEE = DRONE_DATA / "ebee-snowpeak"
NIKON = DRONE_DATA / "gps-camera"


def ebee_positions() -> dict[str, dict[str, float]]:
    """The eBee's own table: file name -> latitude, longitude, altitude_wgs84, heading..."""
    lines = (EBEE / "geoinfo.txt").read_text().splitlines()
    header = lines[1].split("\t")
    return {
        values[0]: {k: float(v) for k, v in zip(header[1:], values[1:], strict=True)}
        for values in (line.rstrip("\t").split("\t") for line in lines[2:])
    }
