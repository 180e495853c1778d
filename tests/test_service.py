"""``skyframe service``: the files for systemd, launchd and the Task Scheduler, and installing,
removing and looking at a service through each manager's command.

The systemd unit is checked by ``systemd-analyze verify`` (Debian's ``systemd`` package; the
test environment runs no systemd to start it in); ``systemctl``, ``launchctl`` and
``schtasks`` are stand-ins that record what they were asked.
"""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from defusedxml import ElementTree
from helpers import skyframe

from skyframe.service import (
    Launchd,
    ServiceError,
    ServiceSpec,
    Systemd,
    TaskScheduler,
    service_name,
    systemd_unit,
    windows_task,
)

CONFIG = """\
state_dir: state
pipelines:
  - name: survey
    source: {path: incoming}
    sinks:
      - url: outbox
"""
TASK = "{http://schemas.microsoft.com/windows/2004/02/mit/task}"


def project(tmp_path: Path, folder: str = "site 7%b") -> Path:
    """A config in a folder whose name has a space and a systemd specifier in it."""
    config = tmp_path / folder / "skyframe.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(CONFIG, encoding="utf-8")
    return config


def spec(config: Path, **changes: Any) -> ServiceSpec:
    return ServiceSpec(
        name=service_name(config), config=config, python=Path(sys.executable), **changes
    )


class Recorder:
    """A service manager's command: what it was asked, and what it answers."""

    def __init__(self, answers: dict[str, str] | None = None, fail: str = "") -> None:
        self.calls: list[list[str]] = []
        self.answers = answers or {}
        self.fail = fail

    def __call__(self, command: list[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(command)
        verb = command[1] if command[1] != "--user" else command[2]
        if self.fail and self.fail in command:
            return subprocess.CompletedProcess(command, 1, "", "Failed to connect to bus\n")
        return subprocess.CompletedProcess(command, 0, self.answers.get(verb, ""), "")


def test_service_names() -> None:
    assert service_name(Path("/srv/Site 7 (north)/skyframe.yaml")) == "skyframe-site-7-north"
    assert service_name(Path("/srv/x/skyframe.yaml"), "Skyframe-Office") == "skyframe-office"
    with pytest.raises(ServiceError, match="use --name"):
        service_name(Path("/srv/x/skyframe.yaml"), "---")


@pytest.mark.parametrize("system", [False, True], ids=["user", "system"])
def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path, system: bool) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: install Debian's systemd package (.ci/setup)")
    config = project(tmp_path)
    made = spec(config, system=system, user="nobody" if system else None)
    unit = tmp_path / f"{made.name}.service"
    unit.write_text(systemd_unit(made), encoding="utf-8")
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    text = unit.read_text()
    assert f"WorkingDirectory={tmp_path}/site 7%%b\n" in text
    assert f'run "{tmp_path}/site 7%%b/skyframe.yaml"\n' in text
    assert ("User=nobody" in text) is system
    assert ("WantedBy=multi-user.target" in text) is system


def test_install_status_uninstall_through_systemctl(tmp_path: Path) -> None:
    config = project(tmp_path, "site7")
    recorder = Recorder(
        {"show": "ActiveState=active\nSubState=running\nMainPID=4242\nUnitFileState=enabled\n"}
    )
    manager = Systemd(recorder, environ={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    made = spec(config)
    unit = tmp_path / "xdg" / "systemd" / "user" / "skyframe-site7.service"
    said = manager.install(made, start=True)
    assert unit.read_text() == systemd_unit(made)
    assert recorder.calls == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", "skyframe-site7"],
    ]
    assert said[1] == "logs: journalctl --user -u skyframe-site7 -f"
    assert manager.status(made)[0] == "skyframe-site7: active (running), enabled, pid 4242"
    recorder.calls.clear()
    assert manager.uninstall(made) == [f"removed {unit}"]
    assert recorder.calls == [
        ["systemctl", "--user", "disable", "--now", "skyframe-site7"],
        ["systemctl", "--user", "daemon-reload"],
    ]
    assert not unit.exists()
    assert manager.status(made) == [f"skyframe-site7: not installed ({unit} does not exist)"]
    with pytest.raises(ServiceError, match="no service skyframe-site7"):
        manager.uninstall(made)


def test_a_failing_systemctl_is_one_line_and_names_the_file(tmp_path: Path) -> None:
    config = project(tmp_path, "site7")
    xdg = tmp_path / "xdg"
    manager = Systemd(Recorder(fail="enable"), environ={"XDG_CONFIG_HOME": str(xdg)})
    with pytest.raises(ServiceError) as caught:
        manager.install(spec(config), start=True)
    unit = xdg / "systemd" / "user" / "skyframe-site7.service"
    assert str(caught.value) == (
        "systemctl --user enable --now skyframe-site7 failed: Failed to connect to bus "
        f"(the file is at {unit})"
    )


def test_the_cli_installs_through_the_systemctl_on_path(tmp_path: Path) -> None:
    config = project(tmp_path, "site7")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "systemctl.log"
    fake = bin_dir / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n', encoding="utf-8")
    fake.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
    }
    done = skyframe(config.parent, "service", "install", "skyframe.yaml", env=env)
    assert done.returncode == 0, done.stderr
    unit = tmp_path / "xdg" / "systemd" / "user" / "skyframe-site7.service"
    assert done.stdout.splitlines()[0] == f"installed {unit}"
    assert f"ExecStart={sys.executable} -m skyframe run {config}\n" in unit.read_text()
    assert log.read_text().splitlines() == [
        "--user daemon-reload",
        "--user enable --now skyframe-site7",
    ]
    gone = skyframe(config.parent, "service", "uninstall", "skyframe.yaml", env=env)
    assert gone.returncode == 0, gone.stderr
    assert not unit.exists()


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    config = project(tmp_path, "site7")
    config.write_text("pipelines: [\n", encoding="utf-8")
    broken = skyframe(config.parent, "service", "install", "--print", "skyframe.yaml")
    assert broken.returncode == 2
    assert broken.stderr.startswith("skyframe: error: skyframe.yaml")
    assert len(broken.stderr.strip().splitlines()) == 1
    config.write_text(CONFIG, encoding="utf-8")
    misuse = skyframe(config.parent, "service", "install", "--for", "macos", "skyframe.yaml")
    assert misuse.returncode == 2
    assert "--for goes with --print" in misuse.stderr
    # A variable the config needs may come from skyframe.env beside it, as the unit's will.
    config.write_text(CONFIG.replace("url: outbox", "url: ${SITE_OUTBOX}"), encoding="utf-8")
    missing = skyframe(config.parent, "service", "install", "--print", "skyframe.yaml")
    assert missing.returncode == 2
    assert "SITE_OUTBOX" in missing.stderr
    (config.parent / "skyframe.env").write_text("SITE_OUTBOX=outbox\n", encoding="utf-8")
    shown = skyframe(config.parent, "service", "install", "--print", "skyframe.yaml")
    assert shown.returncode == 0, shown.stderr
    assert "EnvironmentFile=-" in shown.stdout


def test_the_launchd_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = project(tmp_path, "site7")
    recorder = Recorder({"print": "\tstate = running\n\tpid = 77\n"})
    manager = Launchd(recorder, state_dir=tmp_path / "state")
    made = spec(config)
    said = manager.install(made, start=True)
    plist = tmp_path / "home" / "Library" / "LaunchAgents" / "org.skyframe.skyframe-site7.plist"
    job = plistlib.loads(plist.read_bytes())
    assert job["Label"] == "org.skyframe.skyframe-site7"
    assert job["ProgramArguments"] == [sys.executable, "-m", "skyframe", "run", str(config)]
    assert job["WorkingDirectory"] == str(config.parent)
    assert job["KeepAlive"] == {"SuccessfulExit": False}
    assert job["StandardErrorPath"] == str(tmp_path / "state" / "service.log")
    assert recorder.calls == [["launchctl", "bootstrap", f"gui/{os.getuid()}", str(plist)]]
    assert said == [f"installed {plist}", f"logs: {tmp_path / 'state' / 'service.log'}"]
    assert manager.status(made)[0] == "skyframe-site7: running, pid 77"
    manager.uninstall(made)
    assert recorder.calls[-1] == ["launchctl", "bootout", f"gui/{os.getuid()}/{made.label}"]
    assert not plist.exists()


def test_the_windows_scheduled_task(tmp_path: Path) -> None:
    config = project(tmp_path)
    made = ServiceSpec(
        name="skyframe-site-7",
        config=config,
        python=Path("C:/Program Files/Python311/python.exe"),
    )
    task = ElementTree.fromstring(windows_task(made, "FIELD\\crew").encode("utf-16"))
    action = task.find(f"{TASK}Actions/{TASK}Exec")
    assert action is not None
    assert action.findtext(f"{TASK}Command", "").endswith("pythonw.exe")
    assert action.findtext(f"{TASK}Arguments") == f'-m skyframe run "{config}"'
    assert action.findtext(f"{TASK}WorkingDirectory") == str(config.parent)
    assert task.findtext(f"{TASK}Triggers/{TASK}LogonTrigger/{TASK}UserId") == "FIELD\\crew"
    assert task.findtext(f"{TASK}Settings/{TASK}RestartOnFailure/{TASK}Count") == "999"
    assert task.findtext(f"{TASK}Settings/{TASK}ExecutionTimeLimit") == "PT0S"
    boot = ElementTree.fromstring(
        windows_task(ServiceSpec(**{**made.__dict__, "system": True}), "").encode("utf-16")
    )
    assert boot.find(f"{TASK}Triggers/{TASK}BootTrigger") is not None
    assert boot.findtext(f"{TASK}Principals/{TASK}Principal/{TASK}UserId") == "S-1-5-18"

    recorder = Recorder({"/Query": "Status:   Running\n"})
    manager = TaskScheduler(recorder, state_dir=tmp_path / "state", account="FIELD\\crew")
    manager.install(made, start=True)
    xml = tmp_path / "state" / "skyframe-site-7.task.xml"
    assert xml.read_bytes().startswith(b"\xff\xfe")  # UTF-16, as schtasks reads it
    assert recorder.calls == [
        ["schtasks", "/Create", "/TN", "\\skyframe\\skyframe-site-7", "/XML", str(xml), "/F"],
        ["schtasks", "/Run", "/TN", "\\skyframe\\skyframe-site-7"],
    ]
    assert manager.status(made)[0] == "skyframe-site-7: Running"
    manager.uninstall(made)
    assert recorder.calls[-1] == ["schtasks", "/Delete", "/TN", "\\skyframe\\skyframe-site-7", "/F"]
    assert not xml.exists()
