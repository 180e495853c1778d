"""Backend options are checked when the config is loaded, without connecting anywhere."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from helpers import WriteConfig

from skyframe.errors import ConfigError
from skyframe.pipeline import load_project


def sink_config(url: str, options: str = "{}") -> str:
    return f"""
        pipelines:
          - name: p
            source: {{path: incoming}}
            sinks:
              - url: {url}
                options: {options}
        """


BAD = [
    (
        "s3://bucket/x",
        "{endpoint_url: http://127.0.0.1:9, bogus: 1}",
        r":6:53: pipelines\[0\]\.sinks\[0\]\.options\.bogus: unknown option 'bogus' "
        r"\(expected one of: endpoint_url, key, secret, token, region, anon, timeout",
    ),
    ("s3://bucket/x", "{key: abc}", r"give both key and secret, or neither"),
    ("s3://bucket/x", "{part_size: 1MB}", r"options\.part_size: .*greater than or equal"),
    ("s3://bucket/x", "{timeout: soon}", r"options\.timeout: "),
    ("s3:///x", "{}", r"sinks\[0\]\.url: .*no bucket in the URL"),
    ("s3://bucket/../other", "{}", r"url: s3://bucket/\.\./other: no '\.' or '\.\.' in an obj"),
    ("gcs://bucket/a/./b", "{}", r"url: gcs://bucket/a/\./b: no '\.' or '\.\.' in an object"),
    ("gcs://bucket/x", "{chunk_size: 300KiB}", r"chunk_size must be a multiple of 256 KiB"),
    ("gs://bucket/x", "{token: missing.json}", r"credentials file .*missing\.json does not exist"),
    (
        "sftp://u@127.0.0.1:2222/data",
        "{known_hosts: nowhere/known_hosts}",
        r"known_hosts: .*does not exist; add the server's key \(ssh-keyscan -p 2222 127\.0\.0\.1",
    ),
    (
        "sftp://u@127.0.0.1/data",
        "{key_file: nokey, host_key_check: false}",
        r"key_file: .*nokey does not exist",
    ),
    ("sftp://u:hunter2@127.0.0.1/data", "{host_key_check: false}", r"no password in the URL"),
    ("sftp://127.0.0.1:port/data", "{host_key_check: false}", r"the port is not a number"),
    ("nosuchproto://x/y", "{}", r"no protocol for nosuchproto://: install a skyframe protocol"),
]


@pytest.mark.parametrize(("url", "options", "pattern"), BAD)
def test_bad_sink_is_a_located_config_error(
    write_config: WriteConfig, url: str, options: str, pattern: str
) -> None:
    config = write_config(sink_config(url, options))
    with pytest.raises(ConfigError) as info:
        load_project(config)
    message = str(info.value)
    assert "\n" not in message
    assert re.search(pattern, message), message
    assert "hunter2" not in message


def test_valid_remote_sinks_load_without_connecting(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    (tmp_path / "known_hosts").write_text("")
    (tmp_path / "id").write_text("not a key: nothing reads it before connecting")
    config = write_config(
        """
        pipelines:
          - name: p
            source: {path: incoming}
            sinks:
              - url: s3://bucket/prefix
                options: {endpoint_url: "http://127.0.0.1:9", key: k, secret: s}
              - url: gcs://bucket/prefix
                options: {endpoint_url: "http://127.0.0.1:9", token: anon}
              - url: sftp://u@127.0.0.1:9/srv/in
                options: {key_file: id, known_hosts: known_hosts}
        """
    )
    project = load_project(config)  # port 9 answers nothing: loading must not connect
    sinks = project.pipelines[0].sinks
    assert [s.protocol for s in sinks] == ["s3", "gcs", "sftp"]
    assert [s.root for s in sinks] == ["bucket/prefix", "bucket/prefix", "/srv/in"]
    assert [s.concurrency for s in sinks] == [16, 16, 8]


def test_host_key_check_off_is_a_warning(
    write_config: WriteConfig, caplog: pytest.LogCaptureFixture
) -> None:
    config = write_config(sink_config("sftp://u@127.0.0.1/data", "{host_key_check: false}"))
    with caplog.at_level(logging.WARNING):
        load_project(config)
    assert any("host key checking is off" in r.getMessage() for r in caplog.records)
