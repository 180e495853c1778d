"""The real CLI in a subprocess, on a copy of the repository's example project."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import WriteConfig, skyframe, write_plugin

pytestmark = pytest.mark.slow


def test_example_project_end_to_end(example_project: Path) -> None:
    result = skyframe(example_project, "run", "skyframe.yaml", "--once")
    assert result.returncode == 0, result.stderr
    assert "delivered 4 file(s)" in result.stdout
    assert "rejected by drone_media: 1" in result.stdout  # notes.txt
    assert "rejected by ignore: 2" in result.stdout  # *.part (default) and *.bak (configured)
    outbox = example_project / "outbox"
    delivered = sorted(p.relative_to(outbox).as_posix() for p in outbox.rglob("*") if p.is_file())
    mtime_day = (example_project / "incoming/flight-02/flight.csv").stat().st_mtime
    from datetime import UTC, datetime

    day = datetime.fromtimestamp(mtime_day, tz=UTC).strftime("%Y-%m-%d")
    assert delivered == sorted(
        [
            "2024-05-17/flight-01/DJI_20240517101502_0001.JPG",
            "2024-05-17/flight-01/DJI_20240517101502_0001.JPG.json",
            "2024-05-17/flight-01/DJI_20240517101502_0003.SRT",
            "2024-05-17/flight-01/DJI_20240517101502_0003.SRT.geojson",  # geotag's track
            "2024-05-17/flight-01/DJI_20240517101502_0003.SRT.json",
            "2024-05-17/flight-01/DJI_20240517101510_0002.JPG",
            "2024-05-17/flight-01/DJI_20240517101510_0002.JPG.json",
            f"{day}/flight-02/flight.csv",
            f"{day}/flight-02/flight.csv.json",
        ]
    )
    source = example_project / "incoming/flight-01/DJI_20240517101502_0001.JPG"
    assert (
        outbox / "2024-05-17/flight-01/DJI_20240517101502_0001.JPG"
    ).read_bytes() == source.read_bytes()
    sidecar = json.loads(
        (outbox / "2024-05-17/flight-01/DJI_20240517101502_0001.JPG.json").read_text()
    )
    assert sidecar["meta"]["flight"] == "flight-01"
    assert len(sidecar["meta"]["sha256"]) == 64
    # geotag read the photo's own EXIF and DJI XMP; organise_by_flight took its capture time
    photo = sidecar["meta"]["photo"]
    assert (round(photo["lat"], 6), round(photo["lon"], 6)) == (47.643687, 16.475927)
    assert (photo["dialect"], photo["relative_altitude"]) == ("dji", 75.1)
    assert sidecar["meta"]["capture_time"] == "2024-05-17T10:15:02+00:00"
    # the example plugin logged every delivery
    log_lines = (example_project / ".skyframe/deliveries.jsonl").read_text().splitlines()
    assert len(log_lines) == 4
    assert {json.loads(line)["kind"] for line in log_lines} == {"delivered"}

    again = skyframe(
        example_project, "run", "--once"
    )  # the config path defaults to ./skyframe.yaml
    assert again.returncode == 0, again.stderr
    assert "delivered 0 file(s) (0 B), 4 unchanged" in again.stdout


def test_validate_and_plugins(example_project: Path) -> None:
    result = skyframe(example_project, "validate", "skyframe.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("skyframe.yaml: OK")
    assert not (example_project / "outbox").exists()

    listing = skyframe(example_project, "plugins")
    assert listing.returncode == 0, listing.stderr
    for name in ("drone_media", "organise_by_flight", "ignore", "checksum", "sidecar", "rules.py"):
        assert name in listing.stdout


def test_config_error_is_one_line_with_exit_2(example_project: Path) -> None:
    config = example_project / "skyframe.yaml"
    config.write_text(config.read_text().replace("- drone_media", "- drone_mediaa"))
    result = skyframe(example_project, "run", "skyframe.yaml", "--once")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "skyframe: error: skyframe.yaml:10:9: pipelines[0].rules[1]: "
        "unknown rule 'drone_mediaa' (did you mean 'drone_media'?)"
    ]
    assert "Traceback" not in result.stderr

    traced = skyframe(example_project, "--traceback", "validate", "skyframe.yaml")
    assert traced.returncode != 0
    assert "Traceback" in traced.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["check", "--timeout", "1e400"],
            "skyframe check: Invalid value for '--timeout': inf is not in the range "
            "0.1<=x<=86400.0 (see skyframe check --help)",
        ),
        (
            ["check", "--timeout", "nan"],
            "skyframe check: Invalid value for '--timeout': expected a number of seconds, "
            "not nan (see skyframe check --help)",
        ),
        (
            ["history", "-n", "0"],
            "skyframe history: Invalid value for '-n' / '--limit': 0 is not in the range "
            "1<=x<=1000000 (see skyframe history --help)",
        ),
        (["queue", "nope"], "skyframe queue: No such command 'nope' (see skyframe queue --help)"),
        (  # bytes that are not UTF-8 (Python reads them as surrogate escapes)
            ["history", "-p", "\udcff"],
            "skyframe history: Invalid value for '-p' / '--pipeline': '\ufffd' is not valid "
            "UTF-8 text (see skyframe history --help)",
        ),
        (
            ["history", "caf\udce9.jpg"],
            "skyframe history: Invalid value for '[PATH]': 'caf\ufffd.jpg' is not valid UTF-8 "
            "text (see skyframe history --help)",
        ),
        (
            ["queue", "retry", "--pipeline", "\udcff"],
            "skyframe queue retry: Invalid value for '--pipeline': '\ufffd' is not valid UTF-8 "
            "text (see skyframe queue retry --help)",
        ),
        (
            ["init", "--yes", "--source", "in\udcff"],
            "--source: not valid UTF-8 text: the config is written in UTF-8",
        ),
        (
            ["tray", "--interval", "0"],  # it would ask the daemon over and over, at once
            "skyframe tray: Invalid value for '--interval': must be longer than 0, not '0' "
            "(see skyframe tray --help)",
        ),
        (
            ["--bogus"],
            "skyframe: No such option '--bogus'. Did you mean '--verbose'? (see skyframe --help)",
        ),
    ],
)
def test_a_wrong_option_is_one_line_with_exit_2(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    result = skyframe(tmp_path, *args)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"skyframe: error: {expected}"]


def test_a_command_alone_still_shows_its_help(tmp_path: Path) -> None:
    result = skyframe(tmp_path, "queue")  # click 8.2 and later print it on stderr, status 2
    shown = result.stdout or result.stderr
    assert shown.startswith("Usage: skyframe queue [OPTIONS] COMMAND [ARGS]...")
    assert "retry" in shown


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("state_dir: '~nosuchuser-sky/x'\n", "1:1: state_dir: ~nosuchuser-sky/x"),
        ("log_file: {path: '~nosuchuser-sky/l'}\n", "1:12: log_file.path: ~nosuchuser-sky/l"),
        ("", "4:14: pipelines[0].sinks[0].url: ~nosuchuser-sky/o"),
    ],
)
def test_a_home_of_no_user_is_a_config_error(tmp_path: Path, config: str, expected: str) -> None:
    # pathlib raises RuntimeError for it ("Could not determine home directory").
    (tmp_path / "incoming").mkdir()
    sink = "outbox" if config else "'~nosuchuser-sky/o'"
    (tmp_path / "skyframe.yaml").write_text(
        config + "pipelines:\n  - name: a\n    source: {path: incoming}\n"
        f"    sinks: [{{url: {sink}}}]\n",
        encoding="utf-8",
    )
    result = skyframe(tmp_path, "validate")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"skyframe: error: skyframe.yaml:{expected}: no user 'nosuchuser-sky' on this machine"
    ]


def test_missing_config_file(tmp_path: Path) -> None:
    result = skyframe(tmp_path, "run", "--once")
    assert result.returncode == 2
    assert result.stderr.strip() == "skyframe: error: config file not found: skyframe.yaml"


def test_secret_values_are_never_printed(example_project: Path) -> None:
    config = example_project / "skyframe.yaml"
    text = config.read_text().replace("url: outbox ", "url: memory://${BUCKET}/${SECRET_TOKEN}x ")
    config.write_text(text.replace("options: {}", "options: {bogus: '${SECRET_TOKEN}'}"))
    result = skyframe(
        example_project, "run", "--once", env={"SECRET_TOKEN": "hunter2-very-secret", "BUCKET": "b"}
    )
    assert "hunter2-very-secret" not in result.stdout + result.stderr


def test_failed_delivery_exits_1(example_project: Path) -> None:
    write_plugin(
        example_project / "plugins",
        "down.py",
        "from skyframe import hookimpl\n\n"
        "@hookimpl\ndef skyframe_transfer(request):\n    raise ConnectionError('uplink down')\n",
    )
    config = example_project / "skyframe.yaml"
    config.write_text(config.read_text() + "retry: {max_attempts: 2, initial: 10ms, max: 10ms}\n")
    result = skyframe(example_project, "run", "--once")
    assert result.returncode == 1
    assert (
        "failed survey:flight-01/DJI_20240517101502_0001.JPG: ConnectionError: uplink down"
        in result.stdout
    )


def test_check_probes_every_sink(example_project: Path) -> None:
    config = example_project / "skyframe.yaml"
    text = config.read_text().replace(
        "        options: {}             # fsspec storage options; values may use ${VAR}\n",
        "        options: {}\n      - url: /proc/no-such-folder\n        name: readonly\n",
    )
    config.write_text(text)
    result = skyframe(example_project, "check")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ok    survey -> outbox: connect ")
    assert "write+check+delete" in lines[0]
    assert lines[1].startswith("FAIL  survey -> /proc/no-such-folder: FileNotFoundError")
    assert list((example_project / "outbox").iterdir()) == []  # the probe was deleted


def test_malloc_tuning_applies_on_glibc_and_leaves_a_user_setting_alone() -> None:
    import platform
    import subprocess
    import sys

    # In a child process: the setting stays for the life of a process.
    code = "from skyframe.cli import tune_malloc; print(tune_malloc())"
    variables = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    env = {k: v for k, v in os.environ.items() if k not in variables}
    tuned = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert tuned.stdout.strip() == str(platform.libc_ver()[0] == "glibc")
    for name in variables:
        left = subprocess.run(
            [sys.executable, "-c", code],
            env={**env, name: "65536"},
            capture_output=True,
            text=True,
            check=True,
        )
        assert left.stdout.strip() == "False", name


def test_malloc_tuning_keeps_heaps_from_shrinking_around_every_packet() -> None:
    # The pattern of an SFTP upload in asyncssh's thread: blocks of a few hundred KB made and
    # freed over and over, and now and then a 4 MiB chunk. With only the mmap threshold fixed,
    # the heap is given back and faulted in again each time (about 100 faults a block).
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's malloc only")
    code = """if True:
        import resource, threading
        from skyframe.cli import tune_malloc
        assert tune_malloc()
        def work():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for i in range(2000):
                packet = bytes(240 * 1024)
                chunk = bytes(4 << 20) if i % 16 == 0 else b""
                del packet, chunk
            print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert int(done.stdout) < 20_000  # measured: about 1,000; 197,000 with the mmap one only


def test_garbage_collector_is_paused_while_the_command_starts(example_project: Path) -> None:
    # A plugin notes the collector's state when the project loads it (start-up), at the first
    # delivery (resumed, with start-up's objects frozen) and when the run ends.
    write_plugin(
        example_project / "plugins",
        "gcstate.py",
        "import gc, json, pathlib\n"
        "from skyframe import hookimpl\n"
        "LOG = pathlib.Path(__file__).with_name('gc.jsonl')\n"
        "def note(when):\n"
        "    entry = {'when': when, 'enabled': gc.isenabled(), 'frozen': gc.get_freeze_count()}\n"
        "    with LOG.open('a') as out:\n"
        "        out.write(json.dumps(entry) + '\\n')\n"
        "note('loaded')\n"
        "@hookimpl\ndef skyframe_event(event):\n"
        "    if event.kind == 'delivered':\n        note('delivered')\n"
        "@hookimpl\ndef skyframe_shutdown(config):\n    note('shutdown')\n",
    )
    result = skyframe(example_project, "run", "--once")
    assert result.returncode == 0, result.stderr
    lines = (example_project / "plugins" / "gc.jsonl").read_text().splitlines()
    notes = [json.loads(line) for line in lines]
    assert notes[0] == {"when": "loaded", "enabled": False, "frozen": 0}
    assert [n["when"] for n in notes[1:]] == ["delivered"] * 4 + ["shutdown"]
    assert all(n["enabled"] for n in notes[1:])
    assert notes[1]["frozen"] > 10_000  # the modules, the clients, the project


def test_main_leaves_the_garbage_collector_running(monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    from skyframe.cli import main

    monkeypatch.setattr(sys, "argv", ["skyframe", "--version"])
    try:
        with pytest.raises(SystemExit) as exited:
            main()
        assert exited.value.code == 0
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0  # frozen on the way out: the process ends next
    finally:
        gc.unfreeze()


def test_every_config_problem_gets_a_line_of_its_own(tmp_path: Path) -> None:
    (tmp_path / "skyframe.yaml").write_text(
        "pipelines:\n  - name: survey\n    sorce: {path: incoming}\n    sinks: [{url: out}]\n"
    )
    done = skyframe(tmp_path, "validate", "skyframe.yaml")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "skyframe: error: skyframe.yaml:3:5: pipelines[0].sorce: unknown key 'sorce': did you "
        "mean 'source'? (expected one of: name, source, rules, processes, sinks, retry, groups, "
        "priority)",
        "skyframe: error: skyframe.yaml:2:5: pipelines[0]: missing required key 'source'",
    ]


def test_dry_run_says_what_a_run_would_do_and_changes_nothing(example_project: Path) -> None:
    done = skyframe(example_project, "run", "--dry-run", "skyframe.yaml")
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    by_path = {row[2]: row for row in rows}
    photo = by_path["flight-01/DJI_20240517101502_0001.JPG"]
    assert photo[:2] == ["send", "survey"]
    assert photo[3] == (
        "-> 2024-05-17/flight-01/DJI_20240517101502_0001.JPG "
        "(with 2024-05-17/flight-01/DJI_20240517101502_0001.JPG.json)"
    )
    assert photo[4] == "outbox: new"
    assert by_path["flight-02/notes.txt"][:4] == [
        "reject",
        "survey",
        "flight-02/notes.txt",
        "drone_media: .txt is not drone media",
    ]
    assert done.stderr.strip() == (
        "dry run: 4 to send, 0 delivered already, 3 rejected, 0 failing; nothing was changed"
    )
    assert not (example_project / ".skyframe").exists()
    assert not (example_project / "outbox").exists()
    assert skyframe(example_project, "run", "--once").returncode == 0
    again = skyframe(example_project, "run", "--dry-run")
    assert "dry run: 0 to send, 4 delivered already" in again.stderr
    (example_project / "processes.py").write_text(
        (example_project / "processes.py").read_text()
        + "\n\n@process\ndef process_broken(job: Job) -> None:\n    raise ValueError('no')\n"
    )
    config = (example_project / "skyframe.yaml").read_text()
    (example_project / "skyframe.yaml").write_text(
        config.replace("      - sidecar: {suffix: .json}", "      - broken")
    )
    failing = skyframe(example_project, "run", "--dry-run")
    assert failing.returncode == 1
    assert "error\tsurvey\tflight-02/flight.csv\tValueError: no" in failing.stdout


PIPELINE_NAMED = """
    state_dir: state
    pipelines:
      - name: NAME
        source: {path: incoming, settle: 0}
        sinks: [{url: outbox}]
    """


def test_a_pipeline_option_that_names_no_pipeline_is_a_usage_error(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    config = write_config(PIPELINE_NAMED.replace("NAME", "survey"))
    (tmp_path / "incoming" / "a.jpg").write_bytes(b"a")
    assert skyframe(tmp_path, "run", "--once").returncode == 0
    wrong = "no pipeline named 'nope' in skyframe.yaml (there are: survey)"
    history = skyframe(tmp_path, "history", "-p", "nope")
    assert history.returncode == 2, history.stderr
    assert wrong in history.stderr
    retry = skyframe(tmp_path, "queue", "retry", "--all", "--pipeline", "nope")
    assert retry.returncode == 2, retry.stderr
    assert wrong in retry.stderr
    # A pipeline the config no longer has still shows what it did.
    config.write_text(config.read_text().replace("survey", "field"))
    history = skyframe(tmp_path, "history", "-p", "survey")
    assert history.returncode == 0, history.stderr
    assert "a.jpg" in history.stdout


SKYFRAME = (sys.executable, "-m", "skyframe")


def _without_file_permission_override() -> list[str]:
    """A command prefix under which permissions hold, even for root (CI runs as root)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("util-linux's setpriv is missing: install Debian's util-linux (.ci/setup does)")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}", "--"]


def test_a_run_that_could_not_read_a_folder_exits_1(tmp_path: Path) -> None:
    # A cron job must not see success when part of the source was never looked at.
    (tmp_path / "incoming" / "locked").mkdir(parents=True)
    (tmp_path / "incoming" / "locked" / "hidden.jpg").write_bytes(b"x")
    (tmp_path / "incoming" / "seen.jpg").write_bytes(b"y")
    (tmp_path / "skyframe.yaml").write_text(
        "pipelines:\n"
        "  - name: survey\n"
        "    source: {path: incoming, settle: 0}\n"
        "    sinks: [{url: outbox}]\n",
        encoding="utf-8",
    )
    (tmp_path / "incoming" / "locked").chmod(0)
    try:
        done = subprocess.run(
            [*_without_file_permission_override(), *SKYFRAME, "run", "--once", "skyframe.yaml"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    finally:
        (tmp_path / "incoming" / "locked").chmod(0o755)
    assert done.returncode == 1, done.stderr
    assert "cannot read" in done.stderr
    assert "locked: Permission denied" in done.stderr
    assert "unreadable while scanning: 1" in done.stdout + done.stderr
    assert (tmp_path / "outbox" / "seen.jpg").read_bytes() == b"y"
