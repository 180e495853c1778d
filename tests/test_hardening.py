"""Hostile names, links, hung servers, shared sinks, a vanished state folder, and secrets.

Each test asserts what a crew needs: the other files delivered, the exit code, the one line
that names the file (escaped), a bounded time, nothing secret left anywhere.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import servers
from helpers import (
    Daemon,
    WriteConfig,
    make_file,
    one_sink_config,
    s3_sink,
    sftp_sink,
    skyframe,
    spawn_daemon,
    tree_files,
    wait_for,
    write_plugin,
)

from skyframe.display import RepeatedLog, SafeLogFilter, escape, redact, redact_secrets, shown
from skyframe.engine import Engine
from skyframe.errors import SourceUnreadableError
from skyframe.pipeline import load_project
from skyframe.storage import NAME_MAX, SourceReader, temporary_path

LOCAL = """
    state_dir: state
    api: {enabled: false}
    retry: {max_attempts: 2, initial: 0.05, max: 0.1}
    pipelines:
      - name: field
        source: {path: incoming, settle: 0FOLLOW}
        sinks:
          - url: outbox
    """


def local_config(write_config: WriteConfig, follow: str = "") -> Path:
    extra = f", follow_symlinks: {follow}" if follow else ""
    return write_config(LOCAL.replace("FOLLOW", extra))


def run_once(config: Path) -> tuple[int, str, str]:
    done = skyframe(config.parent, "run", str(config), "--once")
    return done.returncode, done.stdout, done.stderr


# --- 1. names that are not UTF-8 -------------------------------------------------------------


@pytest.mark.parametrize("bad", [b"bad\xff.jpg", b"latin1-caf\xe9.jpg", b"\xc3(half.jpg"])
def test_a_name_that_is_not_utf8_is_reported_and_the_rest_flows(
    tmp_path: Path, write_config: WriteConfig, bad: bytes
) -> None:
    config = local_config(write_config)
    incoming = os.fsencode(config.parent / "incoming")
    with open(os.path.join(incoming, bad), "wb") as f:
        f.write(b"x" * 10)
    os.makedirs(os.path.join(incoming, b"folder-\xfe"))
    with open(os.path.join(incoming, b"folder-\xfe", b"inside.jpg"), "wb") as f:
        f.write(b"y")
    make_file(config.parent / "incoming", "good.jpg", b"good")
    make_file(config.parent / "incoming", "sub/also-good.jpg", b"good too")
    code, out, err = run_once(config)
    assert code == 0, err
    assert "Traceback" not in err
    assert tree_files(config.parent / "outbox") == {
        "good.jpg": b"good",
        "sub/also-good.jpg": b"good too",
    }
    escaped = escape(os.fsdecode(bad))
    assert f"not sent: {config.parent / 'incoming'}/{escaped}: its name is not valid UTF-8" in err
    assert "folder-\\xfe: a folder whose name is not valid UTF-8" in err
    assert "not taken from the source: 2" in out
    # A second run says it again (once), and still delivers nothing twice.
    code, out, err = run_once(config)
    assert code == 0
    assert "0 file(s)" in out.splitlines()[0]
    assert err.count("not valid UTF-8") == 2


def test_a_bad_name_created_while_watching_is_said_once(
    tmp_path: Path, write_config: WriteConfig, caplog: pytest.LogCaptureFixture
) -> None:
    config = local_config(write_config)
    incoming = config.parent / "incoming"
    caplog.set_level(logging.WARNING)
    with Daemon(config) as daemon:
        with open(os.path.join(os.fsencode(incoming), b"new\xff.jpg"), "wb") as f:
            f.write(b"z")
        make_file(incoming, "fine.jpg", b"fine")
        wait_for((config.parent / "outbox/fine.jpg").exists, what="fine.jpg delivered", timeout=20)
        daemon.engine.intake.sources["field"].rescan_requested.set()
        time.sleep(1.0)  # a rescan and many housekeeping ticks
    said = [r for r in caplog.records if "not valid UTF-8" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- 3. a FIFO where a file was ----------------------------------------------------------------


def test_a_fifo_is_refused_at_once_instead_of_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "was-a-file.jpg"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            with SourceReader(fifo):
                pass
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():  # unblock it before failing
        with open(fifo, "wb"):
            pass
        pytest.fail("opening a FIFO blocked")
    assert isinstance(outcome[0], SourceUnreadableError)
    assert "not a regular file" in str(outcome[0])


def test_a_file_replaced_by_a_fifo_after_the_scan_does_not_hang_the_run(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    config = write_config(
        """
        state_dir: state
        plugins: [plugins]
        retry: {max_attempts: 2, initial: 0.05, max: 0.1}
        pipelines:
          - name: field
            source: {path: incoming, settle: 0}
            processes: [swap]
            sinks:
              - url: outbox
        """
    )
    (config.parent / "plugins").mkdir()
    (config.parent / "plugins" / "swap.py").write_text(
        "import os\n"
        "from skyframe import process\n"
        "@process\n"
        "def process_swap(job):\n"
        "    if job.path.name == 'swapped.jpg' and not job.path.is_fifo():\n"
        "        os.unlink(job.path)\n"
        "        os.mkfifo(job.path)\n",
        encoding="utf-8",
    )
    make_file(config.parent / "incoming", "swapped.jpg", b"soon a fifo")
    make_file(config.parent / "incoming", "normal.jpg", b"normal")
    began = time.monotonic()
    code, out, _err = run_once(config)
    assert time.monotonic() - began < 60
    assert code == 1
    assert "failed field:swapped.jpg" in out
    assert "not a regular file" in out
    assert tree_files(config.parent / "outbox") == {"normal.jpg": b"normal"}


def test_a_file_another_program_holds_is_tried_again_not_dead_lettered(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    # Windows refuses to open a file another program holds without sharing it (a copy still
    # under way): ERROR_SHARING_VIOLATION. Made here by a plugin, for the first two opens.
    config = write_config(
        """
        state_dir: state
        plugins: [plugins]
        retry: {max_attempts: 4, initial: 0.05, max: 0.1}
        pipelines:
          - name: field
            source: {path: incoming, settle: 0}
            sinks:
              - url: outbox
        """
    )
    (config.parent / "plugins").mkdir()
    (config.parent / "plugins" / "held.py").write_text(
        "import skyframe.storage\n"
        "real = skyframe.storage.open_regular\n"
        "refused = []\n"
        "def open_regular(path):\n"
        "    if path.name == 'held.jpg' and len(refused) < 2:\n"
        "        refused.append(path)\n"
        "        exc = PermissionError(13, 'The process cannot access the file', str(path))\n"
        "        exc.winerror = 32\n"
        "        raise exc\n"
        "    return real(path)\n"
        "skyframe.storage.open_regular = open_regular\n",
        encoding="utf-8",
    )
    make_file(config.parent / "incoming", "held.jpg", b"being copied")
    code, out, err = run_once(config)
    assert code == 0, out + err
    assert tree_files(config.parent / "outbox") == {"held.jpg": b"being copied"}
    assert "in use by another program" in err  # each refused try says why, on one line
    assert "Traceback" not in err


# --- 4. long names ---------------------------------------------------------------------------


@pytest.mark.parametrize("length", [232, 240, 254, 255])
def test_temporary_names_stay_within_the_name_limit(length: int) -> None:
    name = ("é" * length)[: length // 2] + "x" * (length % 2)  # two bytes a character
    assert len(name.encode()) == length
    tmp = temporary_path(f"root/flight/{name}", "pipeline")
    assert len(tmp.rsplit("/", 1)[1].encode()) <= NAME_MAX
    assert tmp.startswith("root/flight/.")
    assert tmp.rsplit("/", 1)[1].encode().decode()  # whole characters


def test_temporary_names_differ_between_pipelines() -> None:
    assert temporary_path("r/a.jpg", "one") != temporary_path("r/a.jpg", "two")


def test_names_up_to_255_bytes_are_delivered_locally(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    config = local_config(write_config)
    names = ["L" * 232 + ".jpg", "M" * 251 + ".jpg", "ü" * 125 + "1.jpg"]
    for name in names:
        assert len(name.encode()) >= 236
        make_file(config.parent / "incoming", name, name[:5])
    code, _out, err = run_once(config)
    assert code == 0, err
    assert tree_files(config.parent / "outbox") == {n: n[:5].encode() for n in names}


def test_names_up_to_255_bytes_are_delivered_over_sftp(
    tmp_path: Path, write_config: WriteConfig, sftp_server: servers.SFTPServer
) -> None:
    sink = sftp_sink(sftp_server)
    config = write_config(one_sink_config(sink, pipeline="p", retry="{max_attempts: 1}"))
    names = ["S" * 251 + ".jpg", "big-" + "B" * 247 + ".bin"]
    make_file(config.parent / "incoming", names[0], b"small")
    make_file(config.parent / "incoming", names[1], os.urandom(5 * 1024 * 1024))  # journaled
    code, _out, err = run_once(config)
    assert code == 0, err
    root = Path(sink["url"].split(str(sftp_server.port), 1)[1])
    assert sorted(p.name for p in root.iterdir()) == sorted(names)


# --- 2. hung servers --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["s3", "sftp"])
def test_a_hung_server_is_reported_and_the_run_ends(
    kind: str,
    tmp_path: Path,
    write_config: WriteConfig,
    s3_server: servers.S3Server,
    sftp_server: servers.SFTPServer,
) -> None:
    server: servers.Server
    if kind == "s3":
        server, sink = s3_server, s3_sink(s3_server, timeout="2s")
    else:
        server, sink = sftp_server, sftp_sink(sftp_server, timeout="2s")
    retry = "{max_attempts: 1, initial: 0.05, max: 0.1}"
    config = write_config(one_sink_config(sink, pipeline="p", retry=retry, settle="0"))
    make_file(config.parent / "incoming", "photo.jpg", os.urandom(2000))
    make_file(config.parent / "incoming", "video.mov", os.urandom(6 * 1024 * 1024))
    server.pause()
    try:
        began = time.monotonic()
        check = skyframe(tmp_path, "check", str(config))
        checked = time.monotonic() - began
        began = time.monotonic()
        run = skyframe(tmp_path, "run", str(config), "--once")
        ran = time.monotonic() - began
    finally:
        server.resume()
    assert check.returncode == 1
    assert checked < 20, checked
    assert "FAIL" in check.stdout
    assert "Traceback" not in check.stderr
    assert "no answer" in check.stdout or "cannot reach" in check.stdout, check.stdout
    assert run.returncode == 1, run.stdout
    assert ran < 90, ran
    assert "2 failed" in run.stdout


# --- 5. the state folder removed under a running daemon ---------------------------------------


def test_removing_the_state_folder_stops_the_daemon_with_one_line(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    code, _took, text = _remove_the_state_folder(tmp_path, local_config(write_config), 60)
    assert code == 1, text
    assert "state directory" in text
    assert "was removed or replaced" in text
    assert "Traceback" not in text
    assert text.count("was removed or replaced") <= 2  # the log line and the final error


def test_a_stop_that_hangs_after_the_state_folder_went_ends_the_process_naming_where(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    config = write_config(
        LOCAL.replace("FOLLOW", "").replace(
            "retry:", "shutdown_grace: 1s\n    plugins: [plugins]\n    retry:"
        )
    )
    write_plugin(
        config.parent / "plugins",
        "hang.py",
        """
        import time
        from skyframe import hookimpl

        @hookimpl
        def skyframe_shutdown(config):
            time.sleep(600)  # what the stop waits on, as a database that is gone could
        """,
    )
    code, took, text = _remove_the_state_folder(tmp_path, config, 90)
    assert code == 1, text
    # The stop's own limits: 1 s of grace, 10 s for the notifiers, 10 s more for the rest.
    assert "skyframe did not stop within 21 s of its state directory going" in text, text
    assert "MainThread at plugins/hang.py:6 in skyframe_shutdown" in text, text
    assert "exiting now" in text
    assert took >= 20, took
    assert "Traceback" not in text


def _remove_the_state_folder(
    tmp_path: Path, config: Path, timeout: float
) -> tuple[int, float, str]:
    """Start the daemon of ``config``, let it deliver a file, remove its state folder; return
    its exit status, the seconds it took to exit, and its log. Fails with the log when it has
    not ended in ``timeout`` seconds."""
    import shutil

    log_path = tmp_path / "daemon.log"
    daemon = spawn_daemon(tmp_path, log_path, str(config))
    try:
        make_file(config.parent / "incoming", "first.jpg", b"1")
        wait_for((config.parent / "outbox/first.jpg").exists, what="first delivery", timeout=30)
        shutil.rmtree(config.parent / "state")
        began = time.monotonic()
        try:
            code = daemon.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the daemon still ran after {timeout:.0f} s:\n{log_path.read_text()}")
        return code, time.monotonic() - began, log_path.read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


# --- 6. two pipelines, one sink folder ----------------------------------------------------------


def test_a_pipeline_never_replaces_a_file_another_delivered_to_the_same_folder(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    config = write_config(
        """
        state_dir: state
        retry: {max_attempts: 3, initial: 0.05, max: 0.1}
        pipelines:
          - name: north
            source: {path: north, settle: 0}
            sinks: [{url: out}]
          - name: south
            source: {path: south, settle: 0}
            sinks: [{url: ./out/}]
        """
    )
    make_file(config.parent / "north", "IMG_0001.JPG", b"north")
    make_file(config.parent / "north", "only-north.jpg", b"n")
    (config.parent / "south").mkdir()
    code, _out, err = run_once(config)
    assert code == 0, err
    make_file(config.parent / "south", "IMG_0001.JPG", b"south")
    make_file(config.parent / "south", "only-south.jpg", b"s")
    code, out, err = run_once(config)
    assert code == 1
    assert tree_files(config.parent / "out") == {
        "IMG_0001.JPG": b"north",
        "only-north.jpg": b"n",
        "only-south.jpg": b"s",
    }
    line = next(x for x in out.splitlines() if "failed south:IMG_0001.JPG" in x)
    assert "pipeline 'north'" in line
    assert "pipeline 'south'" in line
    assert "Traceback" not in err
    listing = skyframe(tmp_path, "queue", "list", "-c", str(config))
    assert "IMG_0001.JPG" in listing.stdout


# --- 8. symbolic links --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("follow", "expected"),
    [
        ("", {"real.jpg", "inside-link.jpg"}),
        ("inside", {"real.jpg", "inside-link.jpg"}),
        ("all", {"real.jpg", "inside-link.jpg", "outside-link.jpg"}),
        ("none", {"real.jpg"}),
    ],
)
def test_symbolic_links_follow_the_policy(
    tmp_path: Path, write_config: WriteConfig, follow: str, expected: set[str]
) -> None:
    config = local_config(write_config, follow)
    incoming = config.parent / "incoming"
    secret = make_file(tmp_path / "elsewhere", "shadow", b"root:secret")
    make_file(tmp_path / "elsewhere", "folder/deep.jpg", b"deep")
    make_file(incoming, "real.jpg", b"real")
    (incoming / "inside-link.jpg").symlink_to(incoming / "real.jpg")
    (incoming / "outside-link.jpg").symlink_to(secret)
    (incoming / "folder-link").symlink_to(tmp_path / "elsewhere" / "folder")
    (incoming / "dangling.jpg").symlink_to(tmp_path / "nowhere")
    code, _out, err = run_once(config)
    assert code == 0, err
    delivered = tree_files(config.parent / "outbox")
    assert set(delivered) == expected
    if "outside-link.jpg" not in expected:
        assert b"root:secret" not in b"".join(delivered.values())
        assert "outside-link.jpg" in err
    # What is not sent whatever the policy is said too: it was skipped without a word.
    assert f"{incoming / 'dangling.jpg'}: a link to nothing (its target is gone)" in err
    linked = "a link to a folder (linked folders are not followed)"
    assert f"{incoming / 'folder-link'}: {linked}" in err


def test_a_fifo_in_the_source_is_said_not_sent(tmp_path: Path, write_config: WriteConfig) -> None:
    config = local_config(write_config)
    incoming = config.parent / "incoming"
    make_file(incoming, "good.jpg", b"good")
    os.mkfifo(incoming / "pipe.jpg")
    code, out, err = run_once(config)
    assert code == 0, err
    assert tree_files(config.parent / "outbox") == {"good.jpg": b"good"}
    assert f"{incoming / 'pipe.jpg'}: not a regular file (a FIFO, a socket or a device)" in err
    assert "not taken from the source: 1" in out


# --- 10. secrets ------------------------------------------------------------------------------


SECRET = "s3cr3t-Pa55word"


def test_a_password_in_the_endpoint_is_never_shown_or_stored(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    port = servers.free_port()  # nothing listens there
    sink = {
        "url": "s3://bucket/prefix",
        "options": {
            "endpoint_url": f"http://admin:{SECRET}@127.0.0.1:{port}",
            "key": "AKIAEXAMPLE",
            "secret": "${THE_SECRET}",
            "timeout": "2s",
        },
    }
    retry = "{max_attempts: 1, initial: 0.05, max: 0.1}"
    config = write_config(one_sink_config(sink, pipeline="p", retry=retry, settle="0"))
    make_file(config.parent / "incoming", "a.jpg", b"a")
    env = {"THE_SECRET": "another-" + SECRET}
    outputs = []
    for args in (["validate"], ["check"], ["run", "--once"], ["queue", "list", "-c"]):
        done = skyframe(tmp_path, *args, str(config), env=env)
        outputs.append(done.stdout + done.stderr)
    history = skyframe(tmp_path, "history", "-c", str(config), env=env)
    outputs.append(history.stdout + history.stderr)
    for text in outputs:
        assert SECRET not in text, text
    assert "admin:***@" in outputs[1] or "cannot reach" in outputs[1]
    for path in (config.parent / "state").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_redact_and_escape() -> None:
    assert redact("see http://u:p4ss@h:9/x and s3://k:v@b/y") == (
        "see http://u:***@h:9/x and s3://k:***@b/y"
    )
    assert redact("http://user@host/x") == "http://user@host/x"
    assert escape("a\nb\x1b[31mc\udcff") == "a\\nb\\x1b[31mc\\xff"
    assert shown("x\ny http://a:b@c") == "x\\ny http://a:***@c"


def test_credentials_in_debug_lines_are_redacted() -> None:
    token = "IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEUCIQ=="
    lines = {
        f"headers={{'X-Amz-Security-Token': b'{token}', 'Host': b'h'}}": (
            "headers={'X-Amz-Security-Token': b'***', 'Host': b'h'}"
        ),
        f"CanonicalRequest:\nGET\n/b\nx-amz-security-token:{token}\n\nhost": (
            "CanonicalRequest:\nGET\n/b\nx-amz-security-token:***\n\nhost"
        ),
        f"GET /b/k?X-Amz-Security-Token={token}&X-Amz-Date=1": (
            "GET /b/k?X-Amz-Security-Token=***&X-Amz-Date=1"
        ),
        "Authorization: Bearer ya29.a0AfH6SMB-x_y": "Authorization: Bearer ***",
        "client_secret=abc123, password: hunter2": "client_secret=***, password: ***",
        "aws_session_token='abc', db_password=x y": "aws_session_token='***', db_password=*** y",
        'password: "hunter two" given': 'password: "***" given',
        f"<Credentials><SessionToken>{token}</SessionToken><SecretAccessKey>wJal/K7MDENG"
        "</SecretAccessKey><AccessKeyId>ASIA1</AccessKeyId>": (
            "<Credentials><SessionToken>***</SessionToken><SecretAccessKey>***"
            "</SecretAccessKey><AccessKeyId>ASIA1</AccessKeyId>"
        ),
    }
    for line, expected in lines.items():
        assert redact_secrets(line) == expected
    for plain in (
        "the session token expired",
        "Signature=ab12; 3 passwords tried",
        "uploaded photos/Bearer Lake 2024.jpg",
    ):
        assert redact_secrets(plain) == plain


def test_botocores_debug_lines_keep_no_session_token() -> None:
    # botocore logs every request it signs (headers, canonical form) at debug level: with
    # temporary credentials, that is the session token. What reaches a handler is without.
    import s3fs
    from botocore.exceptions import EndpointConnectionError

    token = "FQoGZXIvYXdzEXAMPLESESSIONTOKEN0123456789"
    raw: list[str] = []
    safe: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            safe.append(record.getMessage())

    class Raw(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            raw.append(record.getMessage())
            return True

    refusing = socket.socket()  # bound, never listening: a connection there is refused
    refusing.bind((servers.LOOPBACK, 0))
    handler = Keep(logging.DEBUG)
    handler.addFilter(Raw())
    handler.addFilter(SafeLogFilter())
    botocore = logging.getLogger("botocore")
    botocore.addHandler(handler)
    level = botocore.level
    botocore.setLevel(logging.DEBUG)
    try:
        fs = s3fs.S3FileSystem(
            key="AKIAEXAMPLE",
            secret="not-this-one",
            token=token,
            skip_instance_cache=True,
            client_kwargs={"endpoint_url": f"http://127.0.0.1:{refusing.getsockname()[1]}"},
            config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 1},
        )
        # Nothing listens there: the request is signed and logged all the same.
        with pytest.raises(EndpointConnectionError):
            fs.ls("bucket/prefix", refresh=True)
    finally:
        botocore.removeHandler(handler)
        botocore.setLevel(level)
        refusing.close()
    assert any(token in line for line in raw)  # botocore did log it
    assert safe
    assert not any(token in line for line in safe), [x for x in safe if token in x]


# --- 11. control characters in names -------------------------------------------------------------


def test_control_characters_in_names_reach_no_terminal_raw(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    config = local_config(write_config)
    make_file(config.parent / "incoming", "forged\nskyframe: error: fake\x1b[31m.jpg", b"x")
    make_file(config.parent / "incoming", "plain.jpg", b"p")
    code, out, err = run_once(config)
    assert code == 1  # the name cannot be written remotely: a dead letter, named
    assert "\x1b" not in out + err
    assert not any(line.startswith("skyframe: error: fake") for line in err.splitlines())
    assert "forged\\nskyframe: error: fake\\x1b[31m.jpg" in out
    assert tree_files(config.parent / "outbox") == {"plain.jpg": b"p"}


# --- 12. a repeated error is said once -----------------------------------------------------------


def test_a_repeated_error_is_logged_once_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("skyframe.test-repeated")
    repeated = RepeatedLog(logger, every=0.3)
    caplog.set_level(logging.DEBUG, logger=logger.name)
    for _ in range(200):
        repeated.error("error while settling files", OSError(28, "No space left on device"))
    time.sleep(0.35)
    repeated.error("error while settling files", OSError(28, "No space left on device"))
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2, errors
    assert "No space left on device" in errors[0]
    assert "199 time(s) more" in errors[1]
    assert sum(1 for r in caplog.records if r.exc_info) == 1  # the traceback once, at debug


def test_a_failing_step_of_the_daemon_does_not_flood_the_log(
    tmp_path: Path, write_config: WriteConfig, caplog: pytest.LogCaptureFixture
) -> None:
    config = local_config(write_config)
    project = load_project(config)
    engine = Engine(project.config, project.pm, project.pipelines)
    caplog.set_level(logging.INFO, logger="skyframe")

    def full_disk() -> None:
        raise OSError(28, "No space left on device")

    for source in engine.intake.sources.values():
        source.settler.tick = full_disk  # type: ignore[method-assign]
    thread = threading.Thread(target=engine.run_daemon, daemon=True)
    thread.start()
    try:
        assert engine.ready.wait(30)
        time.sleep(1.5)  # some 30 housekeeping ticks
    finally:
        engine.stop()
        thread.join(30)
        engine.close()
    said = [r for r in caplog.records if "No space left" in r.getMessage()]
    assert len(said) == 1, len(said)
    assert not [r for r in said if r.exc_info]


# --- a local sink's folder that is not one --------------------------------------------------


def test_a_file_where_the_sink_folder_should_be_is_said_in_one_line_at_once(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    # Every file would meet it: the sink is refused (no attempts spent, one line naming the
    # folder), rather than each file retried and dead-lettered with FileExistsError.
    config = local_config(write_config)
    (tmp_path / "outbox").write_text("not a folder\n", encoding="utf-8")
    make_file(tmp_path / "incoming", "a.jpg", b"photo")
    code, out, err = run_once(config)
    assert code == 1
    said = f"outbox: {tmp_path / 'outbox'} is a file, where a folder should be"
    assert f"failed field:a.jpg: {said}" in out
    assert "FileExistsError" not in out + err
    assert "attempt 1 failed" not in err  # not retried: refused at once
    assert "Traceback" not in out + err


def test_only_the_sink_folder_or_a_folder_above_it_refuses_the_sink(tmp_path: Path) -> None:
    from skyframe.errors import SinkRefusedError
    from skyframe.protocols.generic.local import classify

    root = tmp_path / "above" / "outbox"
    (tmp_path / "above").write_text("a file\n", encoding="utf-8")
    error = NotADirectoryError(20, "Not a directory", str(root))
    refused = classify(error, root)
    assert isinstance(refused, SinkRefusedError)
    assert str(refused) == f"{tmp_path / 'above'} is a file, where a folder should be"
    # Inside a good folder, a file in the way of one file's subfolder is that file's problem.
    good = tmp_path / "good"
    (good / "2024").mkdir(parents=True)
    (good / "flights").write_text("a file\n", encoding="utf-8")
    error = FileExistsError(17, "File exists", str(good / "flights"))
    assert classify(error, good) is None
    assert classify(OSError("no file name"), good) is None


def test_a_sink_folder_skyframe_may_not_write_in_refuses_the_sink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from skyframe.errors import SinkRefusedError
    from skyframe.protocols.generic import local

    root = tmp_path / "outbox"
    root.mkdir()
    denied = PermissionError(13, "Permission denied", str(root / ".a.jpg.skyframe-tmp"))
    assert local.classify(denied, root) is None  # the folder is writable: this file's problem
    # Tests may run as root, who may write anywhere: the folder's mode is stood in for.
    monkeypatch.setattr(local.os, "access", lambda path, mode: Path(path) != root)
    refused = local.classify(denied, root)
    assert isinstance(refused, SinkRefusedError)
    assert str(refused) == f"no permission to write in {root}"
