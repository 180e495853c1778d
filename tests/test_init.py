"""``skyframe init``: on a real terminal (a pseudo-terminal driven by pexpect), by flags without
one, and the project it writes validated and run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pytest
import servers
import yaml
from helpers import REPO, assert_s3_holds, skyframe, unique_name

from skyframe.config import interpolate
from skyframe.scaffold import literal, yaml_scalar

pytestmark = pytest.mark.slow

#: Variables init's defaults name: unset, so that the tests decide what the environment holds.
DEFAULT_VARIABLES = ("SKYFRAME_S3_KEY", "SKYFRAME_S3_SECRET", "SKYFRAME_SFTP_PASSWORD")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in DEFAULT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CI", "true")


def init(
    folder: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``skyframe init ARGS`` without a terminal (standard input is /dev/null)."""
    return skyframe(folder, "init", *args, env=env)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("skyframe: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def add_flight(folder: Path) -> None:
    """The example project's first flight (two photos and a video's subtitles)."""
    shutil.copytree(REPO / "incoming" / "flight-01", folder / "incoming" / "flight-01")


def closed_port() -> int:
    """A loopback port nothing listens on: a sink there cannot be reached."""
    return servers.free_port()


# --- without a terminal ------------------------------------------------------------------------


def test_flags_write_a_project_that_validates_and_runs(tmp_path: Path) -> None:
    result = init(tmp_path, "--kind", "photos", "--stubs")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "ok    outbox: a folder skyframe can write into" in result.stdout
    assert "wrote skyframe.yaml, rules.py, processes.py" in result.stdout
    assert "created incoming" in result.stdout
    assert "skyframe run --once" in result.stdout
    text = (tmp_path / "skyframe.yaml").read_text(encoding="utf-8")
    assert text.startswith("# skyframe config written by `skyframe init`")
    assert sum(line.lstrip().startswith("#") or " # " in line for line in text.splitlines()) > 15
    data = yaml.safe_load(text)
    pipeline = data["pipelines"][0]
    assert pipeline["name"] == "photos"
    assert pipeline["source"]["path"] == "incoming"
    assert pipeline["sinks"] == [{"url": "outbox", "name": "outbox"}]
    assert "geotag" in pipeline["processes"]
    assert {"thumbnail": {"max_px": 512}} in pipeline["processes"]
    assert "not_hidden" in pipeline["rules"]  # the stubs are used, so a user sees how
    assert pipeline["groups"] == [{"flight": {"by": "folder", "quiet": "10m"}}]
    assert (tmp_path / "incoming").is_dir()
    assert not (tmp_path / "outbox").exists()  # checked, not created

    validated = skyframe(tmp_path, "validate")
    assert validated.returncode == 0, validated.stderr
    assert validated.stdout.startswith("skyframe.yaml: OK")

    add_flight(tmp_path)
    hidden = tmp_path / "incoming" / ".thumbnails"
    hidden.mkdir()
    shutil.copy(REPO / "incoming/flight-01/DJI_20240517101510_0002.JPG", hidden / "0002.JPG")
    ran = skyframe(tmp_path, "run", "--once")
    assert ran.returncode == 0, ran.stderr
    assert "delivered 2 file(s)" in ran.stdout  # the photos; the .SRT is no photo
    assert "rejected by not_hidden: 1" in ran.stdout
    flight = tmp_path / "outbox" / "flight-01"
    photo = "DJI_20240517101502_0001.JPG"
    assert (flight / photo).read_bytes() == (tmp_path / "incoming/flight-01" / photo).read_bytes()
    assert (flight / f"{photo}.thumb.jpg").is_file()
    assert '"flight": "flight-01"' in (flight / f"{photo}.json").read_text()  # tag_flight
    assert (flight / "flight.geojson").is_file()  # the flight report: the group completed
    assert (flight / "manifest.sha256").is_file()


@pytest.mark.parametrize("kind", ["video", "logs", "any"])
def test_every_kind_validates(tmp_path: Path, kind: str) -> None:
    result = init(tmp_path, "--kind", kind, "--sink", "archive/raw", "--name", f"{kind}-1")
    assert result.returncode == 0, result.stderr
    validated = skyframe(tmp_path, "validate")
    assert validated.returncode == 0, validated.stderr
    assert f"{kind}-1: " in validated.stdout
    add_flight(tmp_path)
    ran = skyframe(tmp_path, "run", "--once")
    assert ran.returncode == 0, ran.stderr
    delivered = {p.name for p in (tmp_path / "archive/raw").rglob("*") if p.is_file()}
    srt = "DJI_20240517101502_0003.SRT"
    expected = {"video": f"{srt}.geojson", "logs": f"{srt}.geojson", "any": srt}[kind]
    assert expected in delivered


def test_never_waits_for_input_without_a_terminal(tmp_path: Path) -> None:
    # An open standard input that never says anything (a CI runner's): nothing reads it.
    with subprocess.Popen(
        [sys.executable, "-m", "skyframe", "init"],
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            out, err = process.communicate(timeout=60)
        finally:
            process.kill()
    assert process.returncode == 0, err
    assert "wrote skyframe.yaml" in out
    assert not (tmp_path / "rules.py").exists()  # stubs only when asked for


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    config = tmp_path / "skyframe.yaml"
    config.write_text("mine\n", encoding="utf-8")
    refused = init(tmp_path)
    assert refused.returncode == 1
    assert one_error_line(refused) == (
        "skyframe: error: skyframe.yaml exists already: --force replaces it"
    )
    assert config.read_text(encoding="utf-8") == "mine\n"
    assert not (tmp_path / "incoming").exists()

    config.unlink()
    (tmp_path / "processes.py").write_text("# mine\n", encoding="utf-8")
    refused = init(tmp_path, "--stubs")
    assert refused.returncode == 1
    assert "processes.py exists already: --force replaces it" in one_error_line(refused)
    assert not config.exists()
    assert (tmp_path / "processes.py").read_text(encoding="utf-8") == "# mine\n"

    forced = init(tmp_path, "--stubs", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "process_tag_flight" in (tmp_path / "processes.py").read_text(encoding="utf-8")
    again = init(tmp_path, "--force", "--kind", "logs")
    assert again.returncode == 0, again.stderr
    assert yaml.safe_load(config.read_text(encoding="utf-8"))["pipelines"][0]["name"] == "logs"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kind", "lidar"], "--kind: unknown kind 'lidar': choose photos, video, logs, any"),
        (["--sink", "zz://x/y"], "--sink: no protocol for zz://"),
        (["--sink", "s3://"], "--sink: expected s3://bucket/prefix"),
        (["--sink", "sftp://pilot:hunter2@host/srv"], "--sink: no password in the URL"),
        (["--sink", "."], "holds the config's folder"),
        (["--sink", "incoming/out"], "overlap: delivered files would be picked up again"),
        (["--source", "."], "--source: "),
        (["--name", "-x"], "--name: invalid pipeline name '-x'"),
        (["--source", "in\nstate_dir: /"], "--source: no control characters"),
        (["--sink", "s3://b/p", "--key-var", "wJalr/K7MDENG+bPxRfi"], "--key-var: not a variable"),
        (["--sink", "s3://b/p", "--key-var", "AKIAIOSFODNN7EXAMPLE"], "--key-var: that looks"),
        (["--sink", "s3://b/p", "--endpoint", "localhost:9000"], "--endpoint: expected http"),
        (["--sink", "sftp://host/srv", "--known-hosts", "nowhere"], "ssh-keyscan -p 22 host"),
    ],
)
def test_a_wrong_flag_is_one_line_and_writes_nothing(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = init(tmp_path, *args)
    assert result.returncode == 2, result.stdout
    line = one_error_line(result)
    assert message in line
    for secret in ("hunter2", "wJalr", "AKIAIOSFODNN7EXAMPLE"):
        assert secret not in line
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_sink_is_a_warning_or_with_strict_an_error(tmp_path: Path) -> None:
    port = closed_port()
    args = ["--sink", "s3://survey/raw", "--endpoint", f"http://127.0.0.1:{port}"]
    env = {"SKYFRAME_S3_KEY": "key-of-the-test", "SKYFRAME_S3_SECRET": "secret-of-the-test"}
    strict = init(tmp_path, *args, "--strict", env=env)
    assert strict.returncode == 1
    assert "check of s3://survey/raw failed: cannot reach the server" in one_error_line(strict)
    assert not (tmp_path / "skyframe.yaml").exists()

    result = init(tmp_path, *args, env=env)
    assert result.returncode == 0, result.stderr
    warning = result.stderr.strip()
    assert warning.startswith("skyframe: warning: check of s3://survey/raw failed: cannot reach")
    assert warning.endswith("writing the config anyway (--strict refuses)")
    assert "\n" not in warning
    assert (tmp_path / "skyframe.yaml").is_file()

    unset = init(tmp_path, *args, "--force")  # the variables are not set here
    assert unset.returncode == 0, unset.stderr
    assert "SKYFRAME_S3_KEY and SKYFRAME_S3_SECRET are not set here (run skyframe" in unset.stderr
    assert "set SKYFRAME_S3_KEY and SKYFRAME_S3_SECRET wherever skyframe runs" in unset.stdout


def test_s3_writes_variable_references_checks_and_delivers(
    tmp_path: Path, s3_server: servers.S3Server
) -> None:
    bucket = unique_name("b")
    s3_server.make_bucket(bucket)
    env = {"SITE_KEY": s3_server.key, "SITE_SECRET": s3_server.secret}
    result = init(
        tmp_path,
        "--kind",
        "any",
        "--sink",
        f"s3://{bucket}/site-7",
        "--endpoint",
        s3_server.endpoint_url,
        "--key-var",
        "SITE_KEY",
        "--secret-var",
        "SITE_SECRET",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert f"ok    s3://{bucket}/site-7: connect" in result.stdout
    assert "set SITE_KEY and SITE_SECRET wherever skyframe runs" in result.stdout
    text = (tmp_path / "skyframe.yaml").read_text(encoding="utf-8")
    assert s3_server.secret not in text
    assert s3_server.key not in text
    sink = yaml.safe_load(text)["pipelines"][0]["sinks"][0]
    assert sink == {
        "url": f"s3://{bucket}/site-7",
        "name": bucket,
        "options": {
            "endpoint_url": s3_server.endpoint_url,
            "key": "${SITE_KEY}",
            "secret": "${SITE_SECRET}",
        },
    }

    unset = skyframe(tmp_path, "validate")
    assert unset.returncode == 2
    assert "environment variable SITE_KEY is not set" in unset.stderr
    assert skyframe(tmp_path, "validate", env=env).returncode == 0

    (tmp_path / "incoming" / "log.txt").write_bytes(b"flight log\n")
    ran = skyframe(tmp_path, "run", "--once", env=env)
    assert ran.returncode == 0, ran.stderr
    assert "delivered 1 file(s)" in ran.stdout
    assert_s3_holds(s3_server, {"url": f"s3://{bucket}/site-7"}, {"log.txt": b"flight log\n"})


def test_sftp_with_a_key_and_known_hosts_is_checked_and_delivers(
    tmp_path: Path, sftp_server: servers.SFTPServer
) -> None:
    remote = sftp_server.root / unique_name("f")
    url = f"sftp://{servers.LOOPBACK}:{sftp_server.port}{remote}"
    result = init(
        tmp_path,
        "--kind",
        "logs",
        "--sink",
        url,
        "--key-file",
        str(sftp_server.client_key),
        "--known-hosts",
        str(sftp_server.known_hosts),
    )
    assert result.returncode == 0, result.stderr
    with_user = f"sftp://{sftp_server.username}@{servers.LOOPBACK}:{sftp_server.port}{remote}"
    assert f"ok    {with_user}: connect" in result.stdout
    text = (tmp_path / "skyframe.yaml").read_text(encoding="utf-8")
    assert "host keys are verified" in text
    options = yaml.safe_load(text)["pipelines"][0]["sinks"][0]["options"]
    assert options == {
        "key_file": str(sftp_server.client_key),
        "known_hosts": str(sftp_server.known_hosts),
    }
    (tmp_path / "incoming" / "0042.ulg").write_bytes(b"px4 log")
    ran = skyframe(tmp_path, "run", "--once")
    assert ran.returncode == 0, ran.stderr
    [delivered] = [p for p in remote.rglob("*.ulg")]
    assert delivered.read_bytes() == b"px4 log"  # under the day it was written (rename)


def test_a_project_file_that_does_not_load_leaves_nothing_behind(tmp_path: Path) -> None:
    (tmp_path / "rules.py").write_text("import no_such_module\n", encoding="utf-8")
    result = init(tmp_path)
    assert result.returncode == 2
    assert "rules.py:1: cannot load: ModuleNotFoundError" in one_error_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rules.py"]


def test_a_folder_that_cannot_be_made_is_one_line_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    (tmp_path / "card").write_text("a file where the source folder would go", encoding="utf-8")
    result = init(tmp_path, "project/skyframe.yaml", "--source", "../card/incoming")
    assert result.returncode == 1
    line = one_error_line(result)
    assert line.startswith("skyframe: error: nothing written: "), line
    assert line.endswith("card/incoming: Not a directory"), line
    assert [p.name for p in tmp_path.iterdir()] == ["card"]  # the project folder is gone too


def test_yaml_scalars_read_back_as_written(tmp_path: Path) -> None:
    for value in ["incoming", "yes", "123", "a: b", "x #y", "$HOME/in", "${X}", "dür 1", "~/d"]:
        held = yaml.safe_load(f"v: {yaml_scalar(literal(value))}")["v"]
        assert interpolate(held, {"X": "nope", "HOME": "nope"}) == value


# --- on a terminal -----------------------------------------------------------------------------


Terminal = Callable[..., pexpect.spawn]


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Terminal]:
    """Start ``skyframe init`` on a pseudo-terminal in tmp_path, with these variables set."""
    children: list[pexpect.spawn] = []

    def start(**variables: str) -> pexpect.spawn:
        env = {k: v for k, v in os.environ.items() if k not in DEFAULT_VARIABLES}
        child = pexpect.spawn(
            sys.executable,
            ["-m", "skyframe", "init"],
            cwd=str(tmp_path),
            env={**env, **variables},
            encoding="utf-8",
            timeout=60,
            dimensions=(50, 300),
        )
        children.append(child)
        return child

    yield start
    for child in children:
        child.close(force=True)


def answer(child: pexpect.spawn, prompt: str, text: str) -> None:
    child.expect_exact(prompt)
    child.sendline(text)


def test_terminal_asks_checks_and_asks_again(tmp_path: Path, terminal: Terminal) -> None:
    port = closed_port()
    child = terminal()
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    answer(child, "Kind of data (photos, video, logs, any) [photos]: ", "lidar")
    child.expect_exact("Error: unknown kind 'lidar': choose photos, video, logs, any")
    answer(child, "Kind of data (photos, video, logs, any) [photos]: ", "")
    answer(child, "Folder where the files land (created if missing) [incoming]: ", "")
    answer(child, "sftp://user@host:port/path [outbox]: ", "s3://survey/raw")
    answer(child, "Server endpoint (empty for AWS): ", f"http://127.0.0.1:{port}")
    answer(child, "name of the environment variable (- for none) [SKYFRAME_S3_KEY]: ", secret)
    child.expect_exact("Error: not a variable name")
    child.expect_exact("not the secret")
    answer(child, "[SKYFRAME_S3_KEY]: ", "TEST_S3_KEY")
    answer(child, "[SKYFRAME_S3_SECRET]: ", "")
    # The variables are not set: the check cannot run, and says so.
    child.expect_exact("skyframe: warning: s3://survey/raw not checked: TEST_S3_KEY and")
    answer(child, "Keep s3://survey/raw anyway? [y/N]: ", "n")
    answer(child, "sftp://user@host:port/path [s3://survey/raw]: ", "incoming")
    child.expect_exact("Error: ")
    child.expect_exact("overlap: delivered files would be picked up again")
    answer(child, "sftp://user@host:port/path [s3://survey/raw]: ", "outbox")
    child.expect_exact("ok    outbox: a folder skyframe can write into")
    answer(child, "Pipeline name [photos]: ", "site 7")
    child.expect_exact("Error: invalid pipeline name 'site 7'")
    answer(child, "Pipeline name [photos]: ", "site-7")
    answer(child, "stubs for rules and processes of your own? [y/N]: ", "y")
    child.expect_exact("wrote skyframe.yaml, rules.py, processes.py")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    text = (tmp_path / "skyframe.yaml").read_text(encoding="utf-8")
    assert secret not in text
    pipeline = yaml.safe_load(text)["pipelines"][0]
    assert pipeline["name"] == "site-7"
    assert pipeline["sinks"] == [{"url": "outbox", "name": "outbox"}]
    assert skyframe(tmp_path, "validate").returncode == 0
    add_flight(tmp_path)
    ran = skyframe(tmp_path, "run", "--once")
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "outbox/flight-01/DJI_20240517101510_0002.JPG").is_file()


def test_terminal_keeps_an_unreachable_sink_when_told(tmp_path: Path, terminal: Terminal) -> None:
    port = closed_port()
    child = terminal(SKYFRAME_S3_KEY="key-of-the-test", SKYFRAME_S3_SECRET="secret-of-the-test")
    answer(child, "[photos]: ", "video")
    answer(child, "[incoming]: ", "card")
    answer(child, "[outbox]: ", "s3://survey/raw")
    answer(child, "(empty for AWS): ", f"http://127.0.0.1:{port}")
    answer(child, "[SKYFRAME_S3_KEY]: ", "")
    answer(child, "[SKYFRAME_S3_SECRET]: ", "")
    child.expect_exact(
        "skyframe: warning: check of s3://survey/raw failed: cannot reach the server"
    )
    answer(child, "Keep s3://survey/raw anyway? [y/N]: ", "y")
    answer(child, "Pipeline name [video]: ", "")
    answer(child, "[y/N]: ", "")
    child.expect_exact("wrote skyframe.yaml")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    pipeline = yaml.safe_load((tmp_path / "skyframe.yaml").read_text())["pipelines"][0]
    assert pipeline["source"]["path"] == "card"
    assert pipeline["sinks"][0]["options"]["key"] == "${SKYFRAME_S3_KEY}"
    assert (tmp_path / "card").is_dir()
    assert not (tmp_path / "rules.py").exists()
