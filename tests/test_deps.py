"""Where skyframe leans on its dependencies: the known warning, each internal, each fallback.

For every undocumented attribute skyframe uses (docs/dependencies.md lists them) there are
two tests: one that fails, naming the package and its version, when a release drops it; one
that runs the public fallback for real (``SKYFRAME_NO_INTERNALS``) against a real server.
"""

from __future__ import annotations

import inspect
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import servers
from helpers import (
    WriteConfig,
    assert_s3_holds,
    aws_profile,
    gcs_sink,
    make_file,
    one_sink_config,
    run_once,
    s3_sink,
    sftp_sink,
)

from skyframe import deps
from skyframe.config import SinkConfig
from skyframe.storage import open_sink

MIB = 1024 * 1024


def gone(package: str, what: str) -> str:
    return f"{package} {deps.version_of(package)}: {what} is gone; see docs/dependencies.md"


# --- the known warning ------------------------------------------------------------------------


def test_importing_asyncssh_warns_nothing_even_with_warnings_as_errors() -> None:
    # A fresh interpreter where every warning is an error: skyframe's import of asyncssh
    # (and sshfs) must pass, with the filter it adds as narrow as the issue it answers.
    code = (
        "import warnings\n"
        "from skyframe.deps import import_sshfs\n"
        "import_sshfs()\n"
        "mine = [f for f in warnings.filters if f[0] == 'ignore' and f[3]\n"
        "        and f[3].pattern.startswith('asyncssh')]\n"
        "print(len(mine), mine[0][1].pattern, mine[0][2].__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "DSA", "is", "deprecated", "CryptographyDeprecationWarning"]


def test_the_filter_leaves_other_warnings_of_that_category_alone() -> None:
    from cryptography.utils import CryptographyDeprecationWarning

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        deps.quiet_known_warnings()
        warnings.warn_explicit(
            "DSA is deprecated", CryptographyDeprecationWarning, "x.py", 1, module="asyncssh.x"
        )
        warnings.warn_explicit(
            "DSA is deprecated", CryptographyDeprecationWarning, "x.py", 1, module="mytool"
        )
        warnings.warn_explicit(
            "TripleDES is deprecated", CryptographyDeprecationWarning, "x.py", 1, module="asyncssh"
        )
    assert [(str(w.message), w.filename) for w in seen] == [
        ("DSA is deprecated", "x.py"),
        ("TripleDES is deprecated", "x.py"),
    ]


def test_an_sftp_check_prints_no_third_party_warning(
    tmp_path: Path, sftp_server: servers.SFTPServer, write_config: WriteConfig
) -> None:
    from test_cli import skyframe

    config = write_config(
        one_sink_config(sftp_sink(sftp_server), pipeline="p", retry="{max_attempts: 1}")
    )
    make_file(config.parent / "incoming", "a.jpg", os.urandom(100))
    for args in (["check"], ["run", "--once"]):
        done = skyframe(tmp_path, *args, str(config), env={"PYTHONWARNINGS": "default"})
        assert done.returncode == 0, done.stderr
        assert "Warning" not in done.stderr, done.stderr


# --- each internal is still there ------------------------------------------------------------


def test_s3fs_has_its_call_coroutine() -> None:
    import s3fs

    call = getattr(s3fs.S3FileSystem, "_call_s3", None)
    assert inspect.iscoroutinefunction(call), gone("s3fs", "S3FileSystem._call_s3")


def test_asyncssh_takes_a_tunnel_that_opens_the_connection() -> None:
    from skyframe.protocols.sftp.ssh_wire import gathering_supported

    assert gathering_supported(), gone("asyncssh", "connection._TunnelConnectorProtocol")
    options = deps.import_asyncssh().SSHClientConnectionOptions(
        config=(), host="h", port=22, username="u", known_hosts=None, client_keys=None
    )
    assert hasattr(options, "tunnel"), gone("asyncssh", "SSHClientConnectionOptions.tunnel")
    assert hasattr(options, "proxy_command"), gone(
        "asyncssh", "SSHClientConnectionOptions.proxy_command"
    )


def test_pystray_still_has_its_x_backend_module() -> None:
    import importlib.util

    from skyframe.tray import X_BACKEND

    # Looked for, not imported: importing pystray connects to the X display.
    package, module = X_BACKEND.split(".")
    spec = importlib.util.find_spec(package)
    assert spec is not None
    assert spec.origin is not None
    source = Path(spec.origin).parent / f"{module}.py"
    assert source.is_file(), gone("pystray", X_BACKEND)
    assert "class Icon(" in source.read_text(encoding="utf-8"), gone("pystray", f"{X_BACKEND}.Icon")


@pytest.mark.parametrize(
    ("name", "parameters"),
    [
        ("simple_upload", ["fs", "bucket", "key", "datain", "metadatain", "content_type"]),
        ("initiate_upload", ["fs", "bucket", "key", "content_type", "metadata"]),
        ("upload_chunk", ["fs", "location", "data", "offset", "size", "content_type"]),
    ],
)
def test_gcsfs_upload_functions_take_what_skyframe_passes(name: str, parameters: list[str]) -> None:
    import gcsfs.core

    function = getattr(gcsfs.core, name, None)
    assert inspect.iscoroutinefunction(function), gone("gcsfs", f"gcsfs.core.{name}")
    names = list(inspect.signature(function).parameters)
    assert all(p in names for p in parameters), gone("gcsfs", f"{name}{tuple(parameters)}")


# --- each fallback works ---------------------------------------------------------------------


@pytest.fixture
def public_only(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Every internal refused, as if the dependencies' next releases had dropped them."""
    monkeypatch.setenv(deps.NO_INTERNALS_ENV, "1")
    monkeypatch.setattr(deps, "_reported", set())
    caplog.set_level(logging.DEBUG, logger="skyframe.deps")


def deliver(write_config: WriteConfig, sink: dict[str, Any], files: dict[str, bytes]) -> None:
    config = write_config(one_sink_config(sink, pipeline="p", retry="{max_attempts: 1}"))
    for name, data in files.items():
        make_file(config.parent / "incoming", name, data)
    summary = run_once(config)
    assert summary.delivered == len(files), summary


def fallbacks_logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "skyframe.deps")


def test_the_tray_without_internals_keeps_pystrays_icon(
    public_only: None, caplog: pytest.LogCaptureFixture
) -> None:
    from skyframe.tray import X_BACKEND, pystray_chose_x

    class XorgIcon:
        __module__ = X_BACKEND

    assert not pystray_chose_x(type("pystray", (), {"Icon": XorgIcon}))
    assert "the X backend's module name not used" in fallbacks_logged(caplog)


def test_s3_without_internals(
    public_only: None,
    caplog: pytest.LogCaptureFixture,
    s3_server: servers.S3Server,
    write_config: WriteConfig,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Credentials from the environment: the small files go through s3fs, not the light client
    # (whose credentials come from the connected session, a public attribute).
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    sink = s3_sink(s3_server, part_size="5MiB")
    sink["options"] = {k: v for k, v in sink["options"].items() if k not in ("key", "secret")}
    files = {"small.jpg": os.urandom(2000), "big.mov": os.urandom(11 * MIB)}
    deliver(write_config, sink, files)
    assert_s3_holds(s3_server, sink, files)
    assert "S3FileSystem._call_s3 not used" in fallbacks_logged(caplog)


def test_sftp_without_internals(
    public_only: None,
    caplog: pytest.LogCaptureFixture,
    sftp_server: servers.SFTPServer,
    write_config: WriteConfig,
) -> None:
    sink = sftp_sink(sftp_server)
    files = {"small.jpg": os.urandom(2000), "big.mov": os.urandom(9 * MIB + 7)}
    deliver(write_config, sink, files)
    root = sink["url"].split(str(sftp_server.port), 1)[1]
    for name, data in files.items():
        assert (Path(root) / name).read_bytes() == data
    logged = fallbacks_logged(caplog)
    assert "_TunnelConnectorProtocol not used" in logged


def test_closing_an_sftp_sink_closes_its_ssh_connection(
    sftp_server: servers.SFTPServer, tmp_path: Path
) -> None:
    sink = open_sink(SinkConfig.model_validate(sftp_sink(sftp_server)), tmp_path)
    try:
        sink.fs.ls("/")
        client = sink.fs.client
        assert not client.is_closed()
    finally:
        sink.close()
    assert client.is_closed()


def test_gcs_without_internals(
    public_only: None,
    caplog: pytest.LogCaptureFixture,
    gcs_server: servers.GCSServer,
    write_config: WriteConfig,
) -> None:
    sink = gcs_sink(gcs_server, chunk_size="256KiB")
    files = {"small.jpg": os.urandom(2000), "big.mov": os.urandom(1_500_000)}
    deliver(write_config, sink, files)
    import gcsfs

    check = gcsfs.GCSFileSystem(
        token="anon", endpoint_url=gcs_server.endpoint_url, skip_instance_cache=True
    )
    try:
        root = sink["url"].removeprefix("gcs://")
        for name, data in files.items():
            assert check.cat_file(f"{root}/{name}") == data
            assert check.info(f"{root}/{name}")["metadata"]["sha256"]
    finally:
        servers.close_filesystem(check)
    logged = fallbacks_logged(caplog)
    assert "gcsfs.core.simple_upload not used" in logged
    assert "gcsfs.core.initiate_upload not used" in logged


# --- the light S3 client honours what botocore honours ---------------------------------------


@pytest.fixture(scope="module")
def forward_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.ForwardProxy]:
    with servers.ForwardProxy(tmp_path_factory.mktemp("proxy")) as proxy:
        yield proxy


def test_s3_requests_go_through_the_environments_proxy(
    tmp_path: Path,
    s3_server: servers.S3Server,
    forward_proxy: servers.ForwardProxy,
    write_config: WriteConfig,
) -> None:
    from test_cli import skyframe

    sink = s3_sink(s3_server)
    bucket = sink["url"].removeprefix("s3://").split("/")[0]
    config = write_config(one_sink_config(sink, pipeline="p", retry="{max_attempts: 1}"))
    names = [f"f{i}.jpg" for i in range(4)]
    for name in names:
        make_file(config.parent / "incoming", name, os.urandom(1500))
    env = {"HTTP_PROXY": forward_proxy.url, "http_proxy": forward_proxy.url, "NO_PROXY": ""}
    env["no_proxy"] = ""
    before = len(forward_proxy.requests())
    for args in (["check"], ["run", "--once"]):
        done = skyframe(tmp_path, *args, str(config), env=env)
        assert done.returncode == 0, done.stderr
    carried = forward_proxy.requests()[before:]
    puts = sorted(url.rsplit("/", 1)[1] for method, url in carried if method == "PUT")
    # The check's probe object, then each file: every request went through the proxy.
    assert [name for name in puts if name in names] == names, carried
    assert any(bucket in url for _, url in carried)
    assert all(url.startswith(s3_server.endpoint_url) for _, url in carried), carried
    check = s3_server.filesystem()
    try:
        assert sorted(check.ls(f"{bucket}/drop", detail=False)) == [
            f"{bucket}/drop/{n}" for n in names
        ]
    finally:
        servers.close_filesystem(check)


def test_s3_requests_skip_the_proxy_for_hosts_in_no_proxy(
    tmp_path: Path,
    s3_server: servers.S3Server,
    forward_proxy: servers.ForwardProxy,
    write_config: WriteConfig,
) -> None:
    from test_cli import skyframe

    config = write_config(
        one_sink_config(s3_sink(s3_server), pipeline="p", retry="{max_attempts: 1}")
    )
    make_file(config.parent / "incoming", "a.jpg", os.urandom(1500))
    env = {"HTTP_PROXY": forward_proxy.url, "http_proxy": forward_proxy.url}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1"
    before = len(forward_proxy.requests())
    for args in (["check"], ["run", "--once"]):
        done = skyframe(tmp_path, *args, str(config), env=env)
        assert done.returncode == 0, done.stderr
    assert forward_proxy.requests()[before:] == []


def test_s3_light_client_takes_credentials_from_a_profile(
    tmp_path: Path, s3_server: servers.S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from skyframe.protocols.s3.direct import DirectS3
    from skyframe.protocols.s3.plugin import skyframe_transfer_batch
    from skyframe.storage import TransferRequest, TransferResult

    aws_profile(monkeypatch, tmp_path, s3_server, "field")
    monkeypatch.setenv("AWS_PROFILE", "field")
    entry = s3_sink(s3_server)
    entry["options"] = {"endpoint_url": s3_server.endpoint_url}
    sink = open_sink(SinkConfig.model_validate(entry), tmp_path)
    direct = sink.endpoint.direct
    assert isinstance(direct, DirectS3)
    check = s3_server.filesystem()
    try:
        send = skyframe_transfer_batch(sink)
        assert send is not None
        requests = []
        for i in range(3):
            path = make_file(tmp_path / "src", f"p{i}.jpg", os.urandom(400))
            st = path.stat()
            requests.append(
                TransferRequest(sink, path, sink.remote_path(path.name), st.st_size, st.st_mtime_ns)
            )
        outcomes = send(requests)
        assert all(isinstance(o, TransferResult) for o in outcomes), outcomes
        assert (direct.sent, direct.declined) == (3, 0)
        for request in requests:
            assert check.cat_file(request.remote_path) == request.local_path.read_bytes()
    finally:
        servers.close_filesystem(check)
        sink.close()
