"""Shared fixtures: a temporary project folder and helpers to write configs and files."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
import servers

# gcsfs reads this when it is imported: its zonal-bucket probe stalls against the emulator.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def example_project(tmp_path: Path) -> Path:
    """A copy of the repository's example project (config, rules, processes, plugins, data)."""
    target = tmp_path / "project"
    target.mkdir()
    for name in ("skyframe.yaml", "rules.py", "processes.py"):
        shutil.copy2(REPO / name, target / name)
    shutil.copytree(
        REPO / "plugins", target / "plugins", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(REPO / "incoming", target / "incoming")
    return target


WriteConfig = Callable[[str], Path]


@pytest.fixture
def write_config(tmp_path: Path) -> WriteConfig:
    """Write a skyframe.yaml (dedented) in tmp_path, with an incoming/ folder beside it."""
    (tmp_path / "incoming").mkdir(exist_ok=True)

    def write(text: str) -> Path:
        path = tmp_path / "skyframe.yaml"
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
        return path

    return write


@pytest.fixture
def memory_fs() -> Iterator[fsspec.AbstractFileSystem]:
    """fsspec's memory filesystem, emptied before and after the test."""
    fs = fsspec.filesystem("memory")
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")
    yield fs
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")


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


def make_file(
    root: Path, relpath: str, data: bytes | str = b"data", mtime: float | None = None
) -> Path:
    """Create a file (and its folders) under root."""
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mtime is not None:
        import os

        os.utime(path, (mtime, mtime))
    return path


# --- real servers ----------------------------------------------------------------------------
# Started once per test session, on free loopback ports; a server that cannot start fails the
# tests that need it, with the reason (never a skip).


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.S3Server]:
    with servers.S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(scope="session")
def sftp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.SFTPServer]:
    with servers.SFTPServer(tmp_path_factory.mktemp("sftp")) as server:
        yield server


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.GCSServer]:
    with servers.GCSServer(tmp_path_factory.mktemp("gcs")) as server:
        yield server


@pytest.fixture(scope="session")
def azurite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.AzuriteServer]:
    with servers.AzuriteServer(tmp_path_factory.mktemp("azurite")) as server:
        yield server


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


def gcs_sink(server: servers.GCSServer, **extra: Any) -> dict[str, Any]:
    """A sink entry for a fresh bucket on the test GCS server."""
    bucket = unique_name("b")
    server.make_bucket(bucket)
    options = {"endpoint_url": server.endpoint_url, "token": "anon"}
    return {"url": f"gcs://{bucket}/drop", "options": {**options, **extra}}


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


def azure_sink(server: servers.AzuriteServer, **extra: Any) -> dict[str, Any]:
    """A sink entry for a fresh container on the test Azurite server (the skyframe-azure
    protocol plugin, found through its entry point)."""
    container = unique_name("c")
    server.make_container(container)
    options = {"connection_string": server.connection_string}
    return {"url": f"az://{container}/drop", "options": {**options, **extra}}


# --- an in-process daemon --------------------------------------------------------------------


class Running:
    """``Engine.run_daemon`` in a thread, for ``with``: started, caught up, then stopped."""

    def __init__(self, config: Path, *plugins: object) -> None:
        from skyframe.engine import Engine
        from skyframe.pipeline import load_project

        project = load_project(config)
        for plugin in plugins:
            project.pm.register(plugin)
        self.engine = Engine(project.config, project.pm, project.pipelines)
        self.thread = threading.Thread(target=self.engine.run_daemon, daemon=True)

    def __enter__(self) -> Running:
        self.thread.start()
        assert self.engine.ready.wait(30), "the daemon did not finish its catch-up scan"
        return self

    def __exit__(self, *exc: object) -> None:
        self.engine.stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the daemon did not stop"
        self.engine.close()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
