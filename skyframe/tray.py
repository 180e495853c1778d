"""``skyframe tray``: the daemon's state at a glance, in the desktop's notification area.

The icon talks to the daemon's HTTP API only (``GET /api/status``, ``POST /api/pause`` and
``/api/resume``), through :class:`skyframe.client.DaemonClient`, never to its internals: it
runs as a process of its own, started at login, and shows "not running" until a daemon
answers. Its colour says the state; a ring around it, the progress of what is being sent; its
tooltip, the numbers. The menu pauses and resumes uploads and opens the dashboard and the
state directory (where the logs are).

The icon itself is pystray's (an optional extra: ``pip install 'skyframe[tray]'``), drawn with
Pillow, except where pystray would use its X backend: there it is :mod:`skyframe.xtray`'s.
This module keeps the state and the drawing apart from either, so both are tested without a
desktop.
"""

from __future__ import annotations

import logging
import threading
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image, ImageDraw

from skyframe import deps
from skyframe.config import Config
from skyframe.errors import SkyframeError
from skyframe.units import format_rate

log = logging.getLogger(__name__)

Kind = Literal["offline", "idle", "sending", "paused", "errors"]
#: The icon's colour in each state (RGB).
COLOURS: dict[Kind, tuple[int, int, int]] = {
    "offline": (128, 128, 128),
    "idle": (34, 160, 70),
    "sending": (30, 110, 220),
    "paused": (235, 160, 20),
    "errors": (210, 40, 40),
}
RING = (255, 255, 255)  #: the progress ring's colour
DOWN = ("offline", "refused")  #: sink health that counts as an error
INTERVAL = 2.0  #: seconds between two looks at the daemon
X_BACKEND = "pystray._xorg"  #: the module of pystray's icon when it uses its X backend


@dataclass(frozen=True)
class TrayState:
    """What the icon shows."""

    kind: Kind
    title: str  #: the tooltip, one line
    progress: float | None = None  #: 0..1 of the bytes being sent, when sending
    paused: bool = False
    dashboard: str | None = None  #: the daemon's URL, when it answers


def state_of(status: dict[str, Any] | None, why: str = "", url: str | None = None) -> TrayState:
    """The icon's state from the daemon's ``/api/status`` document (None: no answer, ``why``)."""
    if status is None:
        return TrayState("offline", f"skyframe: not running{': ' + why if why else ''}")
    pipelines = [p for p in status.get("pipelines") or [] if isinstance(p, dict)]
    paused = bool(status.get("paused")) or (
        bool(pipelines) and all(p.get("paused") for p in pipelines)
    )
    queues = [p.get("queue") or {} for p in pipelines]
    waiting = sum(int(q.get("pending", 0)) + int(q.get("waiting", 0)) for q in queues)
    dead = sum(int(q.get("dead", 0)) for q in queues)
    down = [
        str(sink.get("display") or sink.get("key"))
        for p in pipelines
        for sink in p.get("sinks") or []
        if isinstance(sink, dict) and sink.get("health") in DOWN
    ]
    transfers = [t for t in status.get("transfers") or [] if isinstance(t, dict)]
    problems = []
    if dead:
        problems.append(f"{dead} dead-lettered")
    if down:
        problems.append(f"{', '.join(down)} offline")
    if paused:
        return TrayState(
            "paused", "skyframe: paused" + _also(problems, waiting), paused=True, dashboard=url
        )
    if status.get("metered"):  # held by the daemon itself, not by a pause: no Resume
        held = "skyframe: held, the link is metered"
        return TrayState("paused", held + _also(problems, waiting), dashboard=url)
    if transfers:
        size = sum(max(int(t.get("size") or 0), 0) for t in transfers)
        done = sum(max(int(t.get("bytes_done") or 0), 0) for t in transfers)
        progress = min(done / size, 1.0) if size else 0.0
        rate = float((status.get("throughput") or {}).get("bytes_per_s") or 0.0)
        files = f"{len(transfers)} file{'s' if len(transfers) > 1 else ''}"
        title = f"skyframe: sending {files}, {progress:.0%} ({format_rate(rate)})"
        kind: Kind = "errors" if problems else "sending"
        return TrayState(kind, title + _also(problems, waiting), progress, dashboard=url)
    if problems:
        return TrayState("errors", "skyframe: " + "; ".join(problems), dashboard=url)
    delivered = int((status.get("totals") or {}).get("delivered", 0))
    if waiting:
        return TrayState("sending", f"skyframe: {waiting} waiting", 0.0, dashboard=url)
    return TrayState("idle", f"skyframe: idle, {delivered} delivered", dashboard=url)


def _also(problems: list[str], waiting: int) -> str:
    parts = [*problems, *([f"{waiting} waiting"] if waiting else [])]
    return f"; {'; '.join(parts)}" if parts else ""


def icon_image(state: TrayState, size: int = 64) -> Image.Image:
    """The icon: a disc in the state's colour, the progress as a ring, pause bars if paused."""
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    margin = max(size // 16, 1)
    draw.ellipse((margin, margin, size - margin, size - margin), fill=(*COLOURS[state.kind], 255))
    if state.progress is not None and state.progress > 0:
        inset = size // 6
        box = (inset, inset, size - inset, size - inset)
        end = -90 + 360 * state.progress
        draw.arc(box, -90, end, fill=(*RING, 255), width=max(size // 10, 2))
    if state.paused:
        bar = max(size // 8, 2)
        top, bottom = size * 5 // 16, size * 11 // 16
        left = size // 2 - bar - bar // 2
        draw.rectangle((left, top, left + bar, bottom), fill=(*RING, 255))
        draw.rectangle((left + 2 * bar, top, left + 3 * bar, bottom), fill=(*RING, 255))
    return image


class TrayModel:
    """The daemon of a config, as the icon sees it through the API."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.state = TrayState("offline", "skyframe: starting")

    def _client(self) -> Any:
        from skyframe.client import DaemonClient

        return DaemonClient(self.config)

    def refresh(self) -> TrayState:
        """Ask the daemon; the new state (``offline`` with the reason when it does not answer)."""
        try:
            client = self._client()
            status = client.request("GET", "/api/status")
        except SkyframeError as exc:
            self.state = state_of(None, str(exc))
        else:
            self.state = state_of(status, url=client.url)
        return self.state

    def pause(self) -> None:
        """Pause every upload (the daemon keeps it across restarts)."""
        self._client().request("POST", "/api/pause", {})

    def resume(self) -> None:
        """Resume them."""
        self._client().request("POST", "/api/resume", {})


def _pystray() -> Any:
    try:
        import pystray
    except ImportError as exc:
        if getattr(exc, "name", None) == "pystray":
            raise SkyframeError(
                "the tray icon needs pystray: pip install 'skyframe[tray]'"
            ) from None
        raise SkyframeError(f"no desktop to show the tray icon on: {exc}") from None
    except Exception as exc:  # pystray connects to the display as it is imported
        raise SkyframeError(f"no desktop to show the tray icon on: {exc}") from None
    return pystray


def pystray_chose_x(pystray: Any) -> bool:
    """Whether pystray's icon is its X backend's (no AppIndicator or GTK for it, or
    ``PYSTRAY_BACKEND=xorg``): the tray then shows :class:`skyframe.xtray.XTrayIcon` instead.

    pystray names its backends only in ``PYSTRAY_BACKEND``; which one it took shows in the
    module of its ``Icon`` class, ``pystray._xorg`` (listed in docs/dependencies.md). Another
    name, or ``SKYFRAME_NO_INTERNALS``, keeps pystray's icon."""
    if not deps.internals_allowed():
        deps.missed("pystray", "the X backend's module name", "pystray's own icon on X")
        return False
    return getattr(getattr(pystray, "Icon", None), "__module__", None) == X_BACKEND


def _x_icon(state: TrayState, on_click: Callable[[], object]) -> Any:
    from Xlib.error import DisplayError

    from skyframe.xtray import XTrayIcon

    try:
        return XTrayIcon("skyframe", icon_image(state), state.title, on_click=on_click)
    except DisplayError as exc:
        raise SkyframeError(f"no desktop to show the tray icon on: {exc}") from None


def _look(state: TrayState) -> tuple[object, ...]:
    """What of a state the icon's image shows."""
    progress = None if state.progress is None else round(state.progress, 2)
    return (state.kind, state.paused, progress)


class TrayApp:
    """The icon and its menu, kept up to date by a look at the daemon every ``interval``."""

    def __init__(
        self,
        config: Config,
        interval: float = INTERVAL,
        opener: Callable[[str], object] = webbrowser.open,
    ) -> None:
        self.config = config
        self.model = TrayModel(config)
        self.interval = interval
        self.opener = opener
        self._stop = threading.Event()
        self._shown: tuple[object, str] | None = None

    def run(self) -> None:
        """Show the icon until Quit (blocks). SkyframeError when there is no desktop."""
        pystray = _pystray()
        state = self.model.refresh()
        self._shown = (_look(state), state.title)  # what the icon is made with below
        icon: Any
        if pystray_chose_x(pystray):
            icon = _x_icon(state, on_click=lambda: self._dashboard(None, None))
        else:
            icon = self._pystray_icon(pystray, state)
        try:
            icon.run(setup=self._watch)
        finally:
            self._stop.set()

    def _pystray_icon(self, pystray: Any, state: TrayState) -> Any:
        item, menu = pystray.MenuItem, pystray.Menu
        return pystray.Icon(
            "skyframe",
            icon_image(state),
            state.title,
            menu(
                item(lambda _item: self.model.state.title, None, enabled=False),
                item("Pause uploads", self._act(self.model.pause, "pause"), visible=self._running),
                item(
                    "Resume uploads",
                    self._act(self.model.resume, "resume"),
                    visible=lambda _item: self.model.state.paused,
                ),
                item(
                    "Open the dashboard",
                    self._dashboard,
                    default=True,
                    enabled=lambda _item: self.model.state.dashboard is not None,
                ),
                item("Open the state folder (logs)", self._folder),
                item("Quit", self._quit),
            ),
        )

    def _running(self, _item: Any) -> bool:
        return self.model.state.kind != "offline" and not self.model.state.paused

    def show(self, icon: Any, state: TrayState) -> None:
        """Put ``state`` on the icon: only what changed (a new image makes some notification
        areas dock the icon anew)."""
        look = _look(state)
        if self._shown is None or self._shown[0] != look:
            icon.icon = icon_image(state)
        if self._shown is None or self._shown[1] != state.title:
            icon.title = state.title
            icon.update_menu()
        self._shown = (look, state.title)

    def _act(self, action: Callable[[], None], what: str) -> Callable[[Any, Any], None]:
        def run(icon: Any, _item: Any) -> None:
            try:
                action()
            except SkyframeError as exc:
                icon.notify(f"{what}: {exc}", "skyframe")
            self.show(icon, self.model.refresh())

        return run

    def _dashboard(self, _icon: Any, _item: Any) -> None:
        if self.model.state.dashboard:
            self.opener(self.model.state.dashboard + "/")

    def _folder(self, _icon: Any, _item: Any) -> None:
        self.opener(self.config.state_path.as_uri())

    def _quit(self, icon: Any, _item: Any) -> None:
        self._stop.set()
        icon.stop()

    def _watch(self, icon: Any) -> None:
        icon.visible = True
        while not self._stop.is_set():
            try:
                self.show(icon, self.model.refresh())
            except Exception:  # the icon must keep going whatever one look does
                log.exception("tray: the state could not be shown")
            self._stop.wait(self.interval)
