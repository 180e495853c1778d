"""``skyframe service``: run a config's daemon as a service that starts with the machine.

One service per config, named ``skyframe-NAME`` (NAME from the config's folder unless given):

- Linux: a systemd unit, a user one (``~/.config/systemd/user``, started at login, or at boot
  with ``loginctl enable-linger``) or with ``--system`` a system one; its output goes to the
  journal. Secrets come from the environment: ``EnvironmentFile=`` names ``skyframe.env``
  beside the config, read when it exists (``KEY=value`` lines, yours to write and protect).
- macOS: a launchd agent (``~/Library/LaunchAgents``), or with ``--system`` a daemon.
- Windows: a scheduled task (``skyframe\\NAME``) started at logon (``--system``: at boot, as
  SYSTEM) and restarted when it fails, through ``pythonw.exe`` where there is one.

Every kind restarts the daemon when it fails, not when it stops cleanly. ``--print`` shows
the file for any platform without installing anything.
"""

from __future__ import annotations

import os
import plistlib
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Protocol
from xml.sax.saxutils import escape

from skyframe.errors import SkyframeError

PLATFORMS = ("linux", "macos", "windows")
ENV_FILE = "skyframe.env"  #: beside the config: the service's environment (systemd)
RESTART_AFTER = 10  #: seconds before a failed daemon is started again
COMMAND_TIMEOUT = 60.0  #: seconds a service manager's command may take


class ServiceError(SkyframeError):
    """A service cannot be installed, removed or looked at; the message says why."""


@dataclass(frozen=True)
class ServiceSpec:
    """What a service runs: ``PYTHON -m skyframe run CONFIG`` in the config's folder."""

    name: str
    config: Path
    python: Path
    system: bool = False
    stop_timeout: float = 60.0
    user: str | None = None  #: the account of a system service (Linux), None for root

    @property
    def folder(self) -> Path:
        return self.config.parent

    @property
    def arguments(self) -> list[str]:
        return ["-m", "skyframe", "run", str(self.config)]

    @property
    def label(self) -> str:
        """launchd's label: reverse-DNS, as launchd wants it."""
        return f"org.skyframe.{self.name}"


def service_name(config: Path, name: str | None = None) -> str:
    """``skyframe-NAME``: ``name`` or the config's folder, in letters, digits and dashes."""
    base = name if name is not None else config.resolve().parent.name or "default"
    slug = re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")
    if not slug:
        raise ServiceError(f"cannot make a service name of {base!r}: use --name")
    if slug.startswith("skyframe-") or slug == "skyframe":
        return slug
    return f"skyframe-{slug}"


def current_platform() -> str:
    """``linux``, ``macos`` or ``windows``; ServiceError elsewhere."""
    platform: str = sys.platform
    for prefix, name in (("linux", "linux"), ("darwin", "macos"), ("win32", "windows")):
        if platform.startswith(prefix):
            return name
    raise ServiceError(f"skyframe service does not know how to start services on {platform}")


# --- the files ---------------------------------------------------------------------------------


def _systemd_word(word: str) -> str:
    """One word of an ``ExecStart=`` line: quoted, with systemd's specifiers escaped."""
    word = word.replace("%", "%%")
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _systemd_path(path: Path) -> str:
    """A path as a whole setting's value: unquoted (systemd takes the rest of the line), with
    its specifiers escaped; a line break cannot be written there."""
    text = str(path)
    if "\n" in text or "\r" in text:
        raise ServiceError(f"a service cannot name a path with a line break: {text!r}")
    return text.replace("%", "%%")


def systemd_unit(spec: ServiceSpec) -> str:
    """The ``.service`` file."""
    command = " ".join(_systemd_word(w) for w in [str(spec.python), *spec.arguments])
    lines = [
        "[Unit]",
        f"Description=skyframe: {str(spec.config).replace('%', '%%')}",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"WorkingDirectory={_systemd_path(spec.folder)}",
        f"EnvironmentFile=-{_systemd_path(spec.folder / ENV_FILE)}",
        f"ExecStart={command}",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        f"RestartSec={RESTART_AFTER}",
        f"TimeoutStopSec={round(spec.stop_timeout)}",
        # Logs go to the journal as they come, not when a buffer fills.
        "Environment=PYTHONUNBUFFERED=1",
    ]
    if spec.system and spec.user:
        lines.append(f"User={spec.user}")
    lines += [
        "",
        "[Install]",
        f"WantedBy={'multi-user.target' if spec.system else 'default.target'}",
        "",
    ]
    return "\n".join(lines)


def launchd_plist(spec: ServiceSpec, log: Path) -> bytes:
    """The launchd job's property list."""
    job = {
        "Label": spec.label,
        "ProgramArguments": [str(spec.python), *spec.arguments],
        "WorkingDirectory": str(spec.folder),
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},  # started again after a failure only
        "ThrottleInterval": RESTART_AFTER,
        "ExitTimeOut": round(spec.stop_timeout),
        "ProcessType": "Background",
        "EnvironmentVariables": {"PYTHONUNBUFFERED": "1"},
        "StandardOutPath": str(log),
        "StandardErrorPath": str(log),
    }
    return plistlib.dumps(job)


def windows_python(python: Path) -> PureWindowsPath:
    """``pythonw.exe`` beside ``python.exe`` when there is one (no console window)."""
    path = PureWindowsPath(python)
    quiet = path.with_name("pythonw.exe")
    if path.name.lower() == "python.exe" and (os.name != "nt" or Path(quiet).exists()):
        return quiet
    return path


def windows_task(spec: ServiceSpec, account: str) -> str:
    """The scheduled task's XML (Task Scheduler schema 1.2)."""
    arguments = subprocess.list2cmdline(spec.arguments)
    if spec.system:
        trigger = "<BootTrigger><Enabled>true</Enabled></BootTrigger>"
        principal = "<UserId>S-1-5-18</UserId><RunLevel>HighestAvailable</RunLevel>"
    else:
        # Without an account (the file made elsewhere): the user who registers the task.
        user = f"<UserId>{escape(account)}</UserId>" if account else ""
        trigger = f"<LogonTrigger><Enabled>true</Enabled>{user}</LogonTrigger>"
        principal = (
            f"{user}<LogonType>InteractiveToken</LogonType><RunLevel>LeastPrivilege</RunLevel>"
        )
    return f"""<?xml version="1.0" encoding="UTF-16"?>
<Task version="1.2" xmlns="http://schemas.microsoft.com/windows/2004/02/mit/task">
  <RegistrationInfo>
    <Description>skyframe: {escape(str(spec.config))}</Description>
    <URI>\\skyframe\\{escape(spec.name)}</URI>
  </RegistrationInfo>
  <Triggers>
    {trigger}
  </Triggers>
  <Principals>
    <Principal id="Author">{principal}</Principal>
  </Principals>
  <Settings>
    <MultipleInstancesPolicy>IgnoreNew</MultipleInstancesPolicy>
    <DisallowStartIfOnBatteries>false</DisallowStartIfOnBatteries>
    <StopIfGoingOnBatteries>false</StopIfGoingOnBatteries>
    <StartWhenAvailable>true</StartWhenAvailable>
    <RunOnlyIfNetworkAvailable>false</RunOnlyIfNetworkAvailable>
    <IdleSettings><StopOnIdleEnd>false</StopOnIdleEnd></IdleSettings>
    <ExecutionTimeLimit>PT0S</ExecutionTimeLimit>
    <RestartOnFailure><Interval>PT1M</Interval><Count>999</Count></RestartOnFailure>
    <Enabled>true</Enabled>
  </Settings>
  <Actions Context="Author">
    <Exec>
      <Command>{escape(str(windows_python(spec.python)))}</Command>
      <Arguments>{escape(arguments)}</Arguments>
      <WorkingDirectory>{escape(str(spec.folder))}</WorkingDirectory>
    </Exec>
  </Actions>
</Task>
"""


# --- installing -------------------------------------------------------------------------------

Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def run_command(command: list[str]) -> subprocess.CompletedProcess[str]:
    """A service manager's command, its output captured; ServiceError when it is missing."""
    try:
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except FileNotFoundError:
        raise ServiceError(f"{command[0]} is not installed on this machine") from None
    except subprocess.TimeoutExpired:
        raise ServiceError(
            f"{' '.join(command)} did not answer within {COMMAND_TIMEOUT:g} s"
        ) from None


def _checked(run: Runner, command: list[str], written: Path | None = None) -> str:
    done = run(command)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        why = said[-1] if said else f"exit code {done.returncode}"
        where = f" (the file is at {written})" if written else ""
        raise ServiceError(f"{' '.join(command)} failed: {why}{where}")
    return done.stdout


class Manager(Protocol):
    """One platform's service manager."""

    def file(self, spec: ServiceSpec) -> Path:
        """Where the service's file goes."""
        ...

    def render(self, spec: ServiceSpec) -> bytes:
        """The service's file."""
        ...

    def install(self, spec: ServiceSpec, start: bool) -> list[str]:
        """Write the file and register (and start) the service; lines to tell the user."""
        ...

    def uninstall(self, spec: ServiceSpec) -> list[str]:
        """Stop and remove the service; lines to tell the user."""
        ...

    def status(self, spec: ServiceSpec) -> list[str]:
        """What the service manager says of it."""
        ...


def _write(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as exc:
        raise ServiceError(f"cannot write {path}: {exc.strerror or exc}") from None


def _remove(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ServiceError(f"cannot remove {path}: {exc.strerror or exc}") from None
    return True


@dataclass
class Systemd:
    """systemd, through ``systemctl`` (``--user`` unless the service is a system one)."""

    run: Runner = run_command
    environ: dict[str, str] | None = None

    def _scope(self, spec: ServiceSpec) -> list[str]:
        return [] if spec.system else ["--user"]

    def file(self, spec: ServiceSpec) -> Path:
        if spec.system:
            return Path("/etc/systemd/system") / f"{spec.name}.service"
        environ = os.environ if self.environ is None else self.environ
        base = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(base) / "systemd" / "user" / f"{spec.name}.service"

    def render(self, spec: ServiceSpec) -> bytes:
        return systemd_unit(spec).encode()

    def install(self, spec: ServiceSpec, start: bool) -> list[str]:
        path = self.file(spec)
        _write(path, self.render(spec))
        systemctl = ["systemctl", *self._scope(spec)]
        _checked(self.run, [*systemctl, "daemon-reload"], path)
        _checked(self.run, [*systemctl, "enable", *(["--now"] if start else []), spec.name], path)
        journal = " ".join(["journalctl", *self._scope(spec), "-u", spec.name, "-f"])
        said = [f"installed {path}", f"logs: {journal}"]
        if not spec.system:
            said.append("to start it at boot rather than at login: loginctl enable-linger")
        return said

    def uninstall(self, spec: ServiceSpec) -> list[str]:
        path = self.file(spec)
        if not path.exists():
            raise ServiceError(f"no service {spec.name}: {path} does not exist")
        systemctl = ["systemctl", *self._scope(spec)]
        self.run([*systemctl, "disable", "--now", spec.name])  # gone already is fine
        _remove(path)
        _checked(self.run, [*systemctl, "daemon-reload"])
        return [f"removed {path}"]

    def status(self, spec: ServiceSpec) -> list[str]:
        path = self.file(spec)
        if not path.exists():
            return [f"{spec.name}: not installed ({path} does not exist)"]
        shown = _checked(
            self.run,
            [
                "systemctl",
                *self._scope(spec),
                "show",
                "--property=ActiveState,SubState,MainPID,UnitFileState",
                spec.name,
            ],
        )
        values = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
        state = f"{values.get('ActiveState', '?')} ({values.get('SubState', '?')})"
        pid = values.get("MainPID", "0")
        return [
            f"{spec.name}: {state}, {values.get('UnitFileState', '?')}"
            + (f", pid {pid}" if pid not in ("", "0") else ""),
            f"unit: {path}",
        ]


@dataclass
class Launchd:
    """launchd, through ``launchctl`` (a user agent, or a system daemon)."""

    run: Runner = run_command
    state_dir: Path | None = None  #: where the job's output log goes

    def _domain(self, spec: ServiceSpec) -> str:
        return "system" if spec.system else f"gui/{os.getuid()}"  # type: ignore[attr-defined,unused-ignore]

    def file(self, spec: ServiceSpec) -> Path:
        folder = (
            Path("/Library/LaunchDaemons")
            if spec.system
            else Path.home() / "Library" / "LaunchAgents"
        )
        return folder / f"{spec.label}.plist"

    def log(self, spec: ServiceSpec) -> Path:
        return (self.state_dir or spec.folder) / "service.log"

    def render(self, spec: ServiceSpec) -> bytes:
        return launchd_plist(spec, self.log(spec))

    def install(self, spec: ServiceSpec, start: bool) -> list[str]:
        path = self.file(spec)
        _write(path, self.render(spec))
        if start:
            _checked(self.run, ["launchctl", "bootstrap", self._domain(spec), str(path)], path)
        return [f"installed {path}", f"logs: {self.log(spec)}"]

    def uninstall(self, spec: ServiceSpec) -> list[str]:
        path = self.file(spec)
        if not path.exists():
            raise ServiceError(f"no service {spec.name}: {path} does not exist")
        self.run(["launchctl", "bootout", f"{self._domain(spec)}/{spec.label}"])
        _remove(path)
        return [f"removed {path}"]

    def status(self, spec: ServiceSpec) -> list[str]:
        path = self.file(spec)
        if not path.exists():
            return [f"{spec.name}: not installed ({path} does not exist)"]
        done = self.run(["launchctl", "print", f"{self._domain(spec)}/{spec.label}"])
        if done.returncode != 0:
            return [f"{spec.name}: installed, not loaded", f"job: {path}"]
        found = dict(
            (key.strip(), value.strip())
            for key, _, value in (line.partition("=") for line in done.stdout.splitlines())
            if value
        )
        state = found.get("state", "?")
        pid = found.get("pid")
        return [f"{spec.name}: {state}" + (f", pid {pid}" if pid else ""), f"job: {path}"]


@dataclass
class TaskScheduler:
    """Windows's Task Scheduler, through ``schtasks``."""

    run: Runner = run_command
    state_dir: Path | None = None  #: where the task's XML is kept
    account: str = ""

    def task(self, spec: ServiceSpec) -> str:
        return f"\\skyframe\\{spec.name}"

    def file(self, spec: ServiceSpec) -> Path:
        return (self.state_dir or spec.folder) / f"{spec.name}.task.xml"

    def render(self, spec: ServiceSpec) -> bytes:
        account = self.account or _windows_account()
        return windows_task(spec, account).encode("utf-16")

    def install(self, spec: ServiceSpec, start: bool) -> list[str]:
        path = self.file(spec)
        _write(path, self.render(spec))
        task = self.task(spec)
        _checked(self.run, ["schtasks", "/Create", "/TN", task, "/XML", str(path), "/F"], path)
        if start:
            _checked(self.run, ["schtasks", "/Run", "/TN", task], path)
        return [f"installed the scheduled task {task} (from {path})"]

    def uninstall(self, spec: ServiceSpec) -> list[str]:
        task = self.task(spec)
        self.run(["schtasks", "/End", "/TN", task])  # not running is fine
        _checked(self.run, ["schtasks", "/Delete", "/TN", task, "/F"])
        _remove(self.file(spec))
        return [f"removed the scheduled task {task}"]

    def status(self, spec: ServiceSpec) -> list[str]:
        task = self.task(spec)
        done = self.run(["schtasks", "/Query", "/TN", task, "/FO", "LIST"])
        if done.returncode != 0:
            return [f"{spec.name}: not installed (no scheduled task {task})"]
        found = dict(
            (key.strip(), value.strip())
            for key, _, value in (line.partition(":") for line in done.stdout.splitlines())
            if value
        )
        return [f"{spec.name}: {found.get('Status', '?')}", f"task: {task}"]


def _windows_account() -> str:
    user = os.environ.get("USERNAME", "")
    domain = os.environ.get("USERDOMAIN", "")
    return f"{domain}\\{user}" if domain and user else user


def manager_for(platform: str, run: Runner = run_command, state_dir: Path | None = None) -> Manager:
    """The service manager of ``platform`` (one of :data:`PLATFORMS`)."""
    if platform == "linux":
        return Systemd(run)
    if platform == "macos":
        return Launchd(run, state_dir)
    if platform == "windows":
        return TaskScheduler(run, state_dir)
    raise ServiceError(f"unknown platform {platform!r}: choose from {', '.join(PLATFORMS)}")
