"""SFTP servers through sshfs (asyncssh), with host keys verified by default: the sink's
options, the connection, and what SSH and SFTP errors mean.

SFTP has no atomic object put: uploads go to a hidden temporary name beside the target and
are renamed into place with ``posix-rename@openssh.com`` (atomic on OpenSSH).
"""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import Field

from skyframe.deps import import_asyncssh, import_sshfs
from skyframe.errors import SinkRefusedError, SinkUnavailableError
from skyframe.protocols.classify import exception_chain, one_line, unreachable
from skyframe.protocols.endpoint import BackendOptions, Endpoint, close_quietly
from skyframe.protocols.sftp import openssh, session
from skyframe.protocols.sftp.ssh_wire import GatheringConnector, gathering_supported, routed
from skyframe.units import Duration, expand_home

DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
#: AES-GCM first: with the CPU's AES instructions it is the fastest of the safe ciphers (asyncssh
#: prefers ChaCha20-Poly1305, which runs at about 60 % of that speed here).
DEFAULT_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
)


class SFTPOptions(BackendOptions):
    """Options of an ``sftp://user@host:port/path`` sink."""

    key_file: str | list[str] | None = Field(
        None, description="private key file(s); default: ~/.ssh keys and the ssh agent"
    )
    client_keys: list[str] | None = Field(
        None, description="private key file(s), as sshfs and asyncssh name them (or key_file)"
    )
    known_hosts: str = Field(DEFAULT_KNOWN_HOSTS, description="trusted host keys")
    host_key_check: bool = Field(True, description="verify the server's host key")
    password: str | None = Field(None, description="password login (from ${VAR} only)")
    passphrase: str | None = Field(None, description="passphrase of an encrypted key file")
    timeout: Duration = Field(30.0, gt=0, description="seconds to connect and log in")
    keepalive: Duration = Field(15.0, gt=0, description="seconds between keepalives")
    max_sessions: int = Field(10, ge=3, le=64, description="SFTP channels on the connection")
    ciphers: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CIPHERS),
        min_length=1,
        description="SSH ciphers in order of preference",
    )


def endpoint(url: str, options: dict[str, Any], base_dir: Path) -> Endpoint:
    """Check an SFTP sink's URL and options (key and known_hosts files exist)."""
    settings = SFTPOptions.model_validate(options)
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"{url}: no host in the URL (expected sftp://user@host:port/path)")
    if parts.password:
        raise ValueError("no password in the URL: use the password option with ${VAR}")
    host = parts.hostname
    try:
        port = parts.port or 22
    except ValueError:
        raise ValueError(f"{url}: the port is not a number") from None
    username = unquote(parts.username) if parts.username else getpass.getuser()
    root = unquote(parts.path).rstrip("/") or "/"
    if not root.startswith("/"):
        root = "/" + root

    def resolve(value: str, what: str) -> str:
        path = (base_dir / expand_home(value)).resolve()
        if not path.is_file():
            raise ValueError(f"{what}: {path} does not exist")
        return str(path)

    keys = settings.key_file
    client_keys = [
        resolve(k, "key_file") for k in ([keys] if isinstance(keys, str) else keys or [])
    ] + [resolve(k, "client_keys") for k in settings.client_keys or []]
    warnings = []
    known_hosts: str | None = None
    if settings.host_key_check:
        path = (base_dir / expand_home(settings.known_hosts)).resolve()
        if not path.is_file():
            raise ValueError(
                f"known_hosts: {path} does not exist; add the server's key "
                f"(ssh-keyscan -p {port} {host} >> {settings.known_hosts}) "
                "or set host_key_check: false"
            )
        known_hosts = str(path)
    else:
        warnings.append(
            f"host key checking is off for sftp://{host}:{port}: "
            "anyone on the path can pose as the server"
        )

    def connect() -> Any:
        sshfs = import_sshfs()
        kwargs: dict[str, Any] = {
            "port": port,
            "username": username,
            "known_hosts": known_hosts,
            "connect_timeout": settings.timeout,
            "login_timeout": settings.timeout,
            "keepalive_interval": settings.keepalive,
            "keepalive_count_max": 3,
            "max_sessions": settings.max_sessions,
            "encryption_algs": settings.ciphers,
            "skip_instance_cache": True,
        }
        if gathering_supported() and not routed(host, port, username):  # see ssh_wire
            kwargs["tunnel"] = GatheringConnector()
        if client_keys:
            kwargs["client_keys"] = client_keys
        if settings.password is not None:
            kwargs["password"] = settings.password
        if settings.passphrase is not None:
            kwargs["passphrase"] = settings.passphrase
        return sshfs.SSHFileSystem(host, **kwargs)

    def classify(exc: BaseException) -> SinkUnavailableError | SinkRefusedError | None:
        return classify_error(exc, f"{username}@{host}:{port}", known_hosts)

    handover = openssh.plan(
        host=host,
        port=port,
        username=username,
        key_files=client_keys,
        known_hosts=known_hosts,
        password=settings.password,
        passphrase=settings.passphrase,
        ciphers=settings.ciphers,
        timeout=settings.timeout,
        keepalive=settings.keepalive,
    )
    return Endpoint(
        "sftp",
        root,
        connect,
        classify,
        close=close,
        default_concurrency=8,
        settings=settings,
        warnings=warnings,
        make_folder=session.make_folder_now,
        write_check=session.write_check_now,
        extras=handover,
    )


def close(fs: Any) -> None:
    """Close the SSH connection now (its SFTP channels close with it)."""
    try:
        client = fs.client  # sshfs's public handle on asyncssh's connection
    except Exception:  # never connected
        return

    async def close_connection() -> None:
        client.close()
        await client.wait_closed()

    close_quietly(fs, close_connection)


def classify_error(
    exc: BaseException, where: str, known_hosts: str | None
) -> SinkUnavailableError | SinkRefusedError | None:
    """Map asyncssh and sshfs errors to sink errors."""
    asyncssh = import_asyncssh()
    from asyncssh.sftp import SFTPNoConnection

    for item in exception_chain(exc):
        if isinstance(item, asyncssh.HostKeyNotVerifiable):
            return SinkRefusedError(
                f"host key of {where} is not trusted ({one_line(item)}); "
                f"check {known_hosts or 'known_hosts'}"
            )
        if isinstance(item, asyncssh.PermissionDenied):
            return SinkRefusedError(f"authentication failed for {where}: {one_line(item)}")
        if isinstance(item, asyncssh.SFTPPermissionDenied):
            return SinkRefusedError(f"permission denied on {where}: {one_line(item)}")
        if isinstance(item, asyncssh.KeyImportError | asyncssh.KeyEncryptionError):
            return SinkRefusedError(f"cannot use the key file: {one_line(item)}")
    if unreachable(
        exc,
        (
            asyncssh.ConnectionLost,
            asyncssh.SFTPConnectionLost,
            SFTPNoConnection,
            asyncssh.DisconnectError,
            asyncssh.ChannelOpenError,
            asyncssh.SFTPEOFError,
        ),
    ):
        return SinkUnavailableError(f"cannot reach {where}: {one_line(exc)}")
    if isinstance(exc, ValueError) and "SFTP connections" in str(exc):
        return SinkUnavailableError(f"cannot reach {where}: {one_line(exc)}")
    return None
