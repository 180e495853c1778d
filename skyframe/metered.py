"""Whether the system says its network link is metered (a phone's hotspot, a satellite plan).

Each platform tells it its own way, asked through its own command:

- Linux: NetworkManager's ``Metered`` property (through ``busctl``, systemd's D-Bus tool):
  yes or "guessed yes" (a phone's hotspot) is metered, no or "guessed no" is not, unknown
  says nothing.
- Windows: the cost of the Internet connection's profile (``NetworkCostType``, through
  PowerShell): ``Fixed`` or ``Variable`` is metered, ``Unrestricted`` is not.
- macOS offers no command that tells: the answer is "cannot tell".

"Cannot tell" (no NetworkManager, no such command) is None, with the reason in
:attr:`MeteredProbe.problem`; the daemon then goes on uploading, as if the link were not
metered, and says so once.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

TIMEOUT = 10.0  #: seconds the system's command may take

LINUX = [
    "busctl",
    "--system",
    "get-property",
    "org.freedesktop.NetworkManager",
    "/org/freedesktop/NetworkManager",
    "org.freedesktop.NetworkManager",
    "Metered",
]
WINDOWS = [
    "powershell",
    "-NoProfile",
    "-NonInteractive",
    "-Command",
    "[void][Windows.Networking.Connectivity.NetworkInformation,Windows.Networking.Connectivity,"
    "ContentType=WindowsRuntime]; "
    "$p = [Windows.Networking.Connectivity.NetworkInformation]::GetInternetConnectionProfile(); "
    "if ($p) { $p.GetConnectionCost().NetworkCostType } else { 'Unknown' }",
]
#: NetworkManager's NMMetered: 1 yes, 2 no, 3 guessed yes, 4 guessed no (0 unknown)
NM_METERED = {1: True, 2: False, 3: True, 4: False}
#: Windows's NetworkCostType
WINDOWS_COST = {"fixed": True, "variable": True, "unrestricted": False}

Run = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def from_networkmanager(output: str) -> bool | None:
    """``u 1`` (busctl's answer) -> metered or not; None when NetworkManager cannot tell."""
    kind, _, value = output.strip().partition(" ")
    if kind != "u" or not value.isdigit():
        return None
    return NM_METERED.get(int(value))


def from_windows(output: str) -> bool | None:
    """``Fixed``, ``Variable``, ``Unrestricted`` -> metered or not; None for anything else."""
    return WINDOWS_COST.get(output.strip().lower())


#: Windows: the question runs with no console window. The daemon of a scheduled task
#: (pythonw) has no console, and each console program it starts would open one on the desktop.
NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0)


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
        creationflags=NO_WINDOW,
    )


class MeteredProbe:
    """Asks the system, each call: True (metered), False (not), None (it cannot tell)."""

    def __init__(self, platform: str = sys.platform, run: Run = _run) -> None:
        self.platform = platform
        self.run = run
        self.problem = ""  #: why the last answer was None

    def __call__(self) -> bool | None:
        if self.platform.startswith("linux"):
            command, read, what = LINUX, from_networkmanager, "NetworkManager"
        elif self.platform == "win32":
            command, read, what = WINDOWS, from_windows, "Windows"
        else:
            self.problem = f"{self.platform} does not say whether a link is metered"
            return None
        try:
            done = self.run(command)
        except FileNotFoundError:
            self.problem = f"{command[0]} is not installed"
            return None
        except subprocess.TimeoutExpired:
            self.problem = f"{command[0]} did not answer within {TIMEOUT:g} s"
            return None
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip().splitlines()
            self.problem = f"{what} did not answer: {said[-1] if said else done.returncode}"
            return None
        found = read(done.stdout)
        if found is None:
            self.problem = f"{what} does not know whether the link is metered"
        return found
