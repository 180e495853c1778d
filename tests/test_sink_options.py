"""The backend libraries' own option names, passed through: what s3fs and sshfs users write."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import servers
from helpers import (
    WriteConfig,
    assert_s3_holds,
    aws_profile,
    make_file,
    one_sink_config,
    s3_sink,
    sftp_sink,
    skyframe,
)

from skyframe.config import SinkConfig
from skyframe.storage import open_sink

MIB = 1024 * 1024


def deliver(
    tmp_path: Path, write_config: WriteConfig, sink: dict[str, Any], files: dict[str, bytes]
) -> None:
    config = write_config(one_sink_config(sink, pipeline="p", retry="{max_attempts: 1}"))
    for name, data in files.items():
        make_file(config.parent / "incoming", name, data)
    for args in (["check"], ["run", "--once"]):
        done = skyframe(tmp_path, *args, str(config))
        assert done.returncode == 0, done.stdout + done.stderr


def test_s3_encryption_and_storage_class_reach_every_object(
    tmp_path: Path, write_config: WriteConfig, s3_server: servers.S3Server
) -> None:
    extra = {"ServerSideEncryption": "AES256", "StorageClass": "STANDARD_IA"}
    sink = s3_sink(s3_server, part_size="5MiB", s3_additional_kwargs=extra)
    files = {"photo.jpg": os.urandom(3000), "video.mov": os.urandom(11 * MIB)}
    deliver(tmp_path, write_config, sink, files)
    bucket, prefix = sink["url"].removeprefix("s3://").split("/", 1)
    check = s3_server.filesystem()
    try:
        for name, data in files.items():
            head = check.call_s3("head_object", Bucket=bucket, Key=f"{prefix}/{name}")
            assert head["ServerSideEncryption"] == "AES256", (name, head)
            assert head["StorageClass"] == "STANDARD_IA", (name, head)
            assert head["ContentLength"] == len(data)
            assert check.cat_file(f"{bucket}/{prefix}/{name}") == data
    finally:
        servers.close_filesystem(check)
    # The light client cannot ask for those: it steps aside for such a sink.
    opened = open_sink(SinkConfig.model_validate(sink), tmp_path)
    assert opened.endpoint.direct is None


def test_s3_profile_gives_the_credentials(
    tmp_path: Path,
    write_config: WriteConfig,
    s3_server: servers.S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    aws_profile(monkeypatch, tmp_path, s3_server, "survey")
    sink = s3_sink(s3_server)
    sink["options"] = {"endpoint_url": s3_server.endpoint_url, "profile": "survey"}
    files = {f"p{i}.jpg": os.urandom(500) for i in range(3)}
    deliver(tmp_path, write_config, sink, files)
    assert_s3_holds(s3_server, sink, files)
    # Without the profile the same sink has no credentials at all.
    sink["options"] = {"endpoint_url": s3_server.endpoint_url}
    config = write_config(one_sink_config(sink, pipeline="p", retry="{max_attempts: 1}"))
    done = skyframe(tmp_path, "check", str(config))
    assert done.returncode == 1
    assert "no credentials" in done.stdout


def test_s3_client_kwargs_as_s3fs_users_write_them(
    tmp_path: Path, write_config: WriteConfig, s3_server: servers.S3Server
) -> None:
    sink = s3_sink(s3_server)
    options = sink["options"]
    sink["options"] = {
        "key": options["key"],
        "secret": options["secret"],
        "client_kwargs": {"region_name": "us-east-1", "endpoint_url": s3_server.endpoint_url},
        "config_kwargs": {"max_pool_connections": 4},
    }
    files = {"a.jpg": os.urandom(700), "b/c.jpg": os.urandom(900)}
    deliver(tmp_path, write_config, sink, files)
    assert_s3_holds(s3_server, sink, files)
    opened = open_sink(SinkConfig.model_validate(sink), tmp_path)
    assert opened.settings.endpoint_url == s3_server.endpoint_url
    assert opened.endpoint.direct is None  # a botocore Config option: s3fs does it all


def test_s3_options_left_empty_by_their_variable_are_unset(tmp_path: Path) -> None:
    # The README's `endpoint_url: ${S3_ENDPOINT:-}`, the variable unset: AWS, not a server "".
    sink = {
        "url": "s3://bucket/prefix",
        "options": {"endpoint_url": "", "region": " ", "profile": "", "token": ""},
    }
    opened = open_sink(SinkConfig.model_validate(sink), tmp_path)
    settings = opened.settings
    assert (settings.endpoint_url, settings.region, settings.profile, settings.token) == (
        None,
        None,
        None,
        None,
    )
    opened.close()


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            {"s3_additional_kwargs": {"ServerSideEncription": "AES256"}},
            "unknown upload parameter 'ServerSideEncription' (did you mean 'ServerSideEncryption'?",
        ),
        ({"endpoint": "http://x"}, "unknown option 'endpoint' (did you mean 'endpoint_url'?"),
        ({"region": "eu-west-1", "client_kwargs": {"region_name": "us-east-1"}}, "differ"),
        ({"profile": "p", "key": "k", "secret": "s"}, "or a profile, not both"),
        # botocore's TypeError came at every connection, retried as if the link were down.
        (
            {"config_kwargs": {"conect_timeout": 5}},
            "config_kwargs: botocore takes no 'conect_timeout' (did you mean 'connect_timeout'?)",
        ),
        (
            {"client_kwargs": {"region_name": "x", "bogus": 1}},
            "client_kwargs: botocore takes no 'bogus' (it takes: api_version, aws_access_key_id",
        ),
    ],
)
def test_s3_options_that_cannot_work_are_refused_with_a_fix(
    tmp_path: Path, write_config: WriteConfig, options: dict[str, Any], expected: str
) -> None:
    sink = {"url": "s3://bucket/prefix", "options": options}
    config = write_config(one_sink_config(sink, pipeline="p", retry="{max_attempts: 1}"))
    done = skyframe(tmp_path, "validate", str(config))
    assert done.returncode == 2
    assert expected in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_sftp_client_keys_as_sshfs_users_write_them(
    tmp_path: Path, write_config: WriteConfig, sftp_server: servers.SFTPServer
) -> None:
    sink = sftp_sink(sftp_server)
    sink["options"] = {
        "client_keys": [str(sftp_server.client_key)],
        "known_hosts": str(sftp_server.known_hosts),
    }
    files = {"a.jpg": os.urandom(1000), "big.bin": os.urandom(5 * MIB)}
    deliver(tmp_path, write_config, sink, files)
    root = Path(sink["url"].split(str(sftp_server.port), 1)[1])
    for name, data in files.items():
        assert (root / name).read_bytes() == data
