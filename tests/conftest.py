"""Shared fixtures: a temporary project, the real servers, a daemon with its API, a server
behind a counting proxy. Plain helpers are in ``helpers.py``, fakes in ``fakes/``."""

from __future__ import annotations

import os
import re
import shutil
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
import servers
from fakes.proxy import CountingProxy
from helpers import (
    API_CONFIG,
    API_TOKEN,
    REPO,
    Daemon,
    Remote,
    WriteConfig,
    sftp_through,
    unique_name,
)
from playwright.sync_api import Browser, Page, sync_playwright

# gcsfs reads this when it is imported: its zonal-bucket probe stalls against the emulator.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


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


# --- uploads killed and resumed: a server behind a counting proxy ---------------------------


@pytest.fixture(scope="module")
def gcs_behind_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    """fake-gcs-server whose session URIs point at a proxy (so chunks are counted)."""
    server = servers.GCSServer(tmp_path_factory.mktemp("gcs-proxied"))
    proxy = CountingProxy(servers.LOOPBACK, server.port)
    proxy.start()
    server.external_url = f"http://{proxy.address}"
    try:
        with server:
            yield server, proxy
    finally:
        proxy.close()


@pytest.fixture(params=["s3", "sftp", "gcs", "azure"])
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Remote]:
    """One protocol's server behind a CountingProxy, with a fresh bucket or folder on it."""
    kind = request.param
    if kind == "gcs":
        server, proxy = request.getfixturevalue("gcs_behind_proxy")
        bucket = unique_name("b")
        server.make_bucket(bucket)
        sink = {
            "url": f"gcs://{bucket}/drop",
            # fake-gcs-server publishes the object on a status query: trust the journal.
            "options": {"endpoint_url": f"http://{proxy.address}", "status_query": False},
        }
        proxy.reset_counts()
        yield Remote(kind, proxy, sink, server)
        return
    if kind == "azure":
        server = request.getfixturevalue("azurite_server")
        proxy = CountingProxy(servers.LOOPBACK, server.port)
        container = unique_name("c")
        server.make_container(container)
        through_proxy = server.connection_string.replace(f":{server.port}/", f":{proxy.port}/")
        sink = {"url": f"az://{container}/drop", "options": {"connection_string": through_proxy}}
    elif kind == "s3":
        server = request.getfixturevalue("s3_server")
        proxy = CountingProxy(servers.LOOPBACK, server.port)
        bucket = unique_name("b")
        server.make_bucket(bucket)
        options = {"endpoint_url": f"http://{proxy.address}", "key": server.key}
        sink = {"url": f"s3://{bucket}/drop", "options": {**options, "secret": server.secret}}
    else:
        server = request.getfixturevalue("sftp_server")
        proxy = CountingProxy(servers.LOOPBACK, server.port)
        sink = sftp_through(proxy, server, tmp_path)
    proxy.start()
    try:
        yield Remote(kind, proxy, sink, server)
    finally:
        proxy.close()


# --- an in-process daemon with its API ---------------------------------------------------------


@pytest.fixture
def daemon(tmp_path: Path, write_config: WriteConfig) -> Iterator[Callable[..., Daemon]]:
    """start(token=False, bwlimit=None): an in-process daemon on API_CONFIG, its API on a free
    port (with API_TOKEN if ``token``); each is stopped at the end of the test."""
    (tmp_path / "logs").mkdir(exist_ok=True)
    started: list[Daemon] = []

    def start(*, token: bool = False, bwlimit: str | None = None) -> Daemon:
        text = API_CONFIG.replace("TOKEN", f", token: {API_TOKEN}" if token else "")
        text = text.replace("BWLIMIT", f"bwlimit: {bwlimit}" if bwlimit else "")
        d = Daemon(write_config(text))
        started.append(d)
        d.__enter__()
        return d

    yield start
    for d in started:
        d.stop()


# --- the hub's database: SQLite and PostgreSQL ------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.PostgresServer]:
    with servers.PostgresServer(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture(params=["sqlite", "postgres"])
def hub_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a new, empty hub database: a SQLite file, or a database of its own on the
    session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hub.db'}"
    server: servers.PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database()


# --- a real browser (the dashboard's and the hub's pages) --------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
ARTIFACTS = Path(os.environ.get("SKYFRAME_TEST_ARTIFACTS") or REPO / "test-artifacts")
UI_TIMEOUT = 10_000  #: milliseconds for a page to show something


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, headless, through Playwright; the test fails if it is missing.

    One per test module, not per session: Playwright's synchronous API keeps an event loop
    running in the main thread while it is open, which ``asyncio.run`` elsewhere refuses."""
    if not CHROMIUM.is_file() or not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: the page tests need Debian's chromium package "
            "(apt-get install chromium; .ci/setup installs it)",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh page; its last state is saved as a screenshot, and it must raise no error."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield page
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    finally:
        context.close()
    assert not errors, f"the page raised: {errors}"
