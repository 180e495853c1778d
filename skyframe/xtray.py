"""The tray icon on X: a window that a notification area embeds (the freedesktop.org system
tray protocol, over XEmbed), through python-xlib, on one thread.

pystray's own X backend, which ``skyframe tray`` used before, asks the notification area to
take the icon in again at every new image, and hands each change from the thread that makes
it to its loop's thread over one python-xlib connection. With trayer, tested here, that lost
the icon now and then: the loop waiting for good on a reply, the icon put back outside the
area, or kept there one pixel wide. This icon docks once, and again only when a notification
area starts (its ``MANAGER`` announcement); every X request is made by the thread that runs
it, and other threads hand it their changes through a queue and a pipe that wakes it.

It offers what :class:`skyframe.tray.TrayApp` uses of a pystray icon: ``run(setup)``,
``icon``, ``title``, ``visible``, ``update_menu()``, ``notify()`` and ``stop()``. As with
pystray on X, there is no menu: a click runs the default action.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import threading
from collections.abc import Callable
from typing import Any

from PIL import Image
from Xlib import X, Xutil
from Xlib.display import Display
from Xlib.error import ConnectionClosedError, XError
from Xlib.protocol import event as xevent

from skyframe.errors import SkyframeError

log = logging.getLogger(__name__)

SIZE = 24  #: the size asked of the notification area (it may give another)
_REQUEST_DOCK = 0  #: SYSTEM_TRAY_REQUEST_DOCK
_XEMBED_MAPPED = 1


class XTrayIcon:
    """An icon in the notification area of the X display ``DISPLAY`` names.

    ``name`` makes the window's class (``NAME``, instance ``NAMESystemTrayIcon``, as
    pystray's); ``on_click`` runs, on a thread of its own, when the icon is clicked with the
    first button. Raises ``Xlib.error.DisplayError`` when there is no display to connect to.
    """

    def __init__(
        self,
        name: str,
        image: Image.Image,
        title: str,
        on_click: Callable[[], object] | None = None,
    ) -> None:
        self._image = image
        self._title = title
        self._visible = False
        self._on_click = on_click
        #: what changed ("icon", "title", "visible", "stop"), for the loop to apply
        self._changes: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._stopped = threading.Event()
        self._docked_in: int | None = None  #: the window that holds the icon, once embedded
        self._display = Display()
        self._display.set_error_handler(self._x_error)
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        screen = self._display.screen()
        self._root = screen.root
        self._area = self._display.intern_atom(
            f"_NET_SYSTEM_TRAY_S{self._display.get_default_screen()}"
        )
        self._opcode = self._display.intern_atom("_NET_SYSTEM_TRAY_OPCODE")
        self._manager_atom = self._display.intern_atom("MANAGER")
        xembed_info = self._display.intern_atom("_XEMBED_INFO")
        self._window = self._root.create_window(
            -SIZE,
            -SIZE,
            SIZE,
            SIZE,
            0,
            screen.root_depth,
            window_class=X.InputOutput,
            background_pixel=screen.black_pixel,
            event_mask=X.ExposureMask | X.StructureNotifyMask | X.ButtonPressMask,
        )
        self._window.set_wm_class(f"{name}SystemTrayIcon", name)
        self._window.set_wm_name(title)
        self._window.set_wm_normal_hints(
            flags=Xutil.PSize | Xutil.PMinSize,
            width=SIZE,
            height=SIZE,
            min_width=SIZE,
            min_height=SIZE,
        )
        self._window.change_property(xembed_info, xembed_info, 32, [0, _XEMBED_MAPPED])
        self._gc = self._window.create_gc()
        self._drawn: tuple[int, int] | None = None  #: the size the image was drawn at
        # A notification area that starts announces itself to the root window's clients.
        self._root.change_attributes(event_mask=X.StructureNotifyMask)
        self._display.sync()

    # --- what other threads call ---------------------------------------------------------

    @property
    def icon(self) -> Image.Image:
        return self._image

    @icon.setter
    def icon(self, image: Image.Image) -> None:
        self._image = image
        self._change("icon")

    @property
    def title(self) -> str:
        return self._title

    @title.setter
    def title(self, text: str) -> None:
        self._title = text
        self._change("title")

    @property
    def visible(self) -> bool:
        return self._visible

    @visible.setter
    def visible(self, value: bool) -> None:
        self._visible = value
        self._change("visible")

    @property
    def docked(self) -> bool:
        """Whether a notification area holds the icon now."""
        return self._docked_in is not None

    def update_menu(self) -> None:
        """Nothing: an icon on X has no menu (a click runs the default action)."""

    def notify(self, message: str, title: str | None = None) -> None:
        """An X notification area shows no messages: the message goes to the log."""
        log.warning("%s", message)

    def stop(self) -> None:
        """End :meth:`run` (from any thread)."""
        self._change("stop")

    def run(self, setup: Callable[[XTrayIcon], object] | None = None) -> None:
        """Handle the X events until :meth:`stop`; ``setup(icon)`` runs on a thread of its
        own meanwhile (as pystray's ``run``). Without ``setup`` the icon is shown."""
        if setup is None:
            self.visible = True
        else:
            threading.Thread(target=setup, args=(self,), name="tray-setup", daemon=True).start()
        try:
            self._loop()
        except ConnectionClosedError as exc:
            raise SkyframeError(f"the tray icon's X display closed: {exc}") from None
        finally:
            self._stopped.set()
            with contextlib.suppress(Exception):  # the server went away: nothing to tidy
                self._window.destroy()
                self._display.sync()
            with contextlib.suppress(Exception):  # closed already when the server went
                self._display.close()
            os.close(self._wake_read)
            os.close(self._wake_write)

    # --- the loop's thread -----------------------------------------------------------------

    def _change(self, what: str) -> None:
        if self._stopped.is_set():
            return
        self._changes.put(what)
        with contextlib.suppress(OSError):  # closed as the loop ended
            os.write(self._wake_write, b"\0")

    def _loop(self) -> None:
        connection = self._display.fileno()
        while True:
            while self._display.pending_events():
                self._handle(self._display.next_event())
            while True:
                try:
                    what = self._changes.get_nowait()
                except queue.Empty:
                    break
                if what == "stop":
                    return
                self._apply(what)
            self._display.flush()
            if self._display.pending_events():
                continue  # read while waiting for a reply: handled before sleeping
            readable, _, _ = select.select([connection, self._wake_read], [], [])
            if self._wake_read in readable:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_read, 4096):
                        pass

    def _apply(self, what: str) -> None:
        if what == "icon":
            self._drawn = None
            self._draw()
        elif what == "title":
            self._window.set_wm_name(self._title)
        elif what == "visible":
            if self._visible:
                self._dock()
            else:
                self._undock()

    def _dock(self) -> None:
        """Ask the notification area, if one runs, to take the icon in; once it does, it
        answers by making the icon's window its child."""
        if self._docked_in is not None or not self._visible:
            return
        manager = self._display.get_selection_owner(self._area)
        if manager == X.NONE:
            log.info("tray: no notification area yet; the icon waits for one")
            return
        self._display.send_event(
            manager,
            xevent.ClientMessage(
                type=X.ClientMessage,
                window=manager,
                client_type=self._opcode,
                data=(32, [X.CurrentTime, _REQUEST_DOCK, self._window.id, 0, 0]),
            ),
            event_mask=X.NoEventMask,
        )

    def _undock(self) -> None:
        self._window.unmap()
        self._window.reparent(self._root, -SIZE, -SIZE)
        self._docked_in = None

    def _handle(self, event: Any) -> None:
        kind = event.type
        mine = getattr(event, "window", None) == self._window
        if kind == X.ClientMessage and event.client_type == self._manager_atom:
            _format, data = event.data
            if data[1] == self._area:  # a notification area started: dock there
                self._docked_in = None
                self._dock()
        elif kind == X.ReparentNotify and mine:
            # In the area, or back on the root window: an area that quits hands its icons
            # back to the root (XEmbed's save-set); its successor will announce itself.
            parent = event.parent.id
            self._docked_in = None if parent == self._root.id else parent
        elif kind == X.Expose and mine and event.count == 0:
            self._drawn = None
            self._draw()
        elif kind == X.ConfigureNotify and mine:
            self._draw()
        elif kind == X.ButtonPress and mine and event.detail == 1 and self._on_click:
            threading.Thread(target=self._on_click, name="tray-click", daemon=True).start()

    def _draw(self) -> None:
        """The image, scaled to the window and put on black (an X window has no alpha)."""
        geometry = self._window.get_geometry()
        width, height = max(geometry.width, 1), max(geometry.height, 1)
        if (width, height) == self._drawn:
            return
        picture = Image.new("RGB", (width, height))
        scaled = self._image.convert("RGBA").resize((width, height), Image.Resampling.LANCZOS)
        picture.paste(scaled, mask=scaled)
        self._window.put_pil_image(self._gc, 0, 0, picture)
        self._drawn = (width, height)

    def _x_error(self, error: XError, request: Any = None) -> None:
        # A window gone between a look and a request (an area that quits as the icon docks):
        # the next announcement or event puts things right.
        log.debug("tray: X error %s", error)
