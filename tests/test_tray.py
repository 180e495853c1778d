"""``skyframe tray``: the state it reads from the daemon's status, the icon it draws, its
actions through the API, and the real icon in a notification area (Xvfb and trayer, Debian's
packages), screenshotted to the test output folder."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ARTIFACTS
from helpers import Daemon, spawn_daemon, wait_for
from PIL import Image, ImageGrab

from skyframe.config import load_config
from skyframe.errors import SkyframeError
from skyframe.tray import (
    COLOURS,
    RING,
    Kind,
    TrayModel,
    TrayState,
    icon_image,
    pystray_chose_x,
    state_of,
)

STATUS: dict[str, Any] = {
    "paused": False,
    "pipelines": [
        {
            "name": "survey",
            "paused": False,
            "queue": {"pending": 0, "leased": 0, "waiting": 0, "dead": 0},
            "sinks": [{"key": "s3", "display": "s3://b/x", "health": "ok"}],
        }
    ],
    "transfers": [],
    "throughput": {"bytes_per_s": 0.0},
    "totals": {"delivered": 7},
}


def status(**changes: Any) -> dict[str, Any]:
    import copy

    made = copy.deepcopy(STATUS)
    pipeline = made["pipelines"][0]
    for key, value in changes.items():
        if key in ("queue", "sinks"):
            pipeline[key] = value
        else:
            made[key] = value
    return made


def test_the_state_from_the_status() -> None:
    assert state_of(None, "no daemon") == TrayState("offline", "skyframe: not running: no daemon")
    assert state_of(status(), url="http://x").kind == "idle"
    assert state_of(status()).title == "skyframe: idle, 7 delivered"
    sending = state_of(
        status(
            transfers=[
                {"size": 1000, "bytes_done": 250},
                {"size": 3000, "bytes_done": 750},
            ],
            throughput={"bytes_per_s": 2_000_000.0},
            queue={"pending": 4, "leased": 2, "waiting": 1, "dead": 0},
        )
    )
    assert (sending.kind, sending.progress) == ("sending", 0.25)
    assert sending.title.startswith("skyframe: sending 2 files, 25% (")
    assert sending.title.endswith("; 5 waiting")
    paused = state_of(status(paused=True, queue={"pending": 3, "dead": 1}))
    assert (paused.kind, paused.paused) == ("paused", True)
    assert paused.title == "skyframe: paused; 1 dead-lettered; 3 waiting"
    down = state_of(status(sinks=[{"key": "s3", "display": "s3://b/x", "health": "offline"}]))
    assert (down.kind, down.title) == ("errors", "skyframe: s3://b/x offline")


def ring_fraction(image: Image.Image) -> float:
    """How much of the progress ring is drawn, read back from the icon's pixels."""
    size = image.width
    radius, centre, samples = size / 2 - size / 6, size / 2, 72
    hits = 0
    for n in range(samples):
        angle = math.radians(-90 + 360 * (n + 0.5) / samples)
        pixel = image.getpixel(
            (round(centre + radius * math.cos(angle)), round(centre + radius * math.sin(angle)))
        )
        hits += isinstance(pixel, tuple) and pixel[:3] == RING
    return hits / samples


def test_the_icon_shows_state_progress_and_pause() -> None:
    for kind, colour in COLOURS.items():
        image = icon_image(TrayState(kind, ""))  # type: ignore[arg-type]
        assert image.getpixel((32, 32))[:3] == colour  # type: ignore[index]
        assert ring_fraction(image) == 0
    assert ring_fraction(icon_image(TrayState("sending", "", 0.25))) == pytest.approx(
        0.25, abs=0.03
    )
    assert ring_fraction(icon_image(TrayState("sending", "", 1.0))) == 1.0
    paused = icon_image(TrayState("paused", "", paused=True))
    assert paused.getpixel((32, 32))[:3] == COLOURS["paused"]  # type: ignore[index]
    assert paused.getpixel((26, 32))[:3] == RING  # type: ignore[index]  # the left bar


def test_the_model_reads_and_steers_the_daemon_through_its_api(daemon: Any) -> None:
    running: Daemon = daemon(token=True)
    model = TrayModel(running.engine.config)
    state = model.refresh()
    assert state.kind == "idle", state
    assert state.dashboard is not None
    assert state.dashboard.startswith("http://127.0.0.1:")
    model.pause()
    assert model.refresh().kind == "paused"
    model.resume()
    assert model.refresh().kind == "idle"
    running.stop()
    gone = model.refresh()
    assert gone.kind == "offline"
    assert gone.title.startswith("skyframe: not running: ")


# --- the real icon, in a notification area ------------------------------------------------------


class Desktop:
    """Xvfb with trayer's notification area along its top edge."""

    def __init__(self) -> None:
        self.xvfb = subprocess.Popen(
            # -noreset: without it the server resets when its last client goes (trayer, when
            # a test stops it), and a client connecting meanwhile is refused.
            [
                "Xvfb",
                "-displayfd",
                "1",
                "-screen",
                "0",
                "320x80x24",
                "-nolisten",
                "tcp",
                "-noreset",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        assert self.xvfb.stdout is not None
        number = self.xvfb.stdout.readline().strip()
        if not number:
            self.xvfb.kill()
            pytest.fail("Xvfb did not start (Debian's xvfb package)")
        self.display = f":{number.decode()}"
        self.trayer = self.start_trayer()

    def start_trayer(self) -> subprocess.Popen[bytes]:
        """trayer, a GTK notification area along the top edge (not yet ready: see
        :meth:`wait_ready`)."""
        return subprocess.Popen(
            [
                "trayer",
                "--edge",
                "top",
                "--align",
                "left",
                "--widthtype",
                "pixel",
                "--width",
                "200",
                "--heighttype",
                "pixel",
                "--height",
                "40",
                "--transparent",
                "false",
                "--tint",
                "0xffffff",
            ],
            env={**os.environ, "DISPLAY": self.display},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )

    def wait_ready(self) -> None:
        """Until trayer owns the notification area (the selection icons dock to) and its panel
        shows (its background along the top edge)."""

        from Xlib import X
        from Xlib.display import Display

        display = Display(self.display)
        tray = display.intern_atom("_NET_SYSTEM_TRAY_S0")

        def panel() -> bool:
            if self.trayer.poll() is not None:
                pytest.fail(f"trayer ended with exit code {self.trayer.returncode}")
            owned = display.get_selection_owner(tray) != X.NONE
            return owned and self.grab().convert("RGB").getpixel((150, 20)) != (0, 0, 0)

        try:
            wait_for(panel, timeout=30, what="trayer's notification area")
        finally:
            display.close()

    def grab(self) -> Image.Image:
        return ImageGrab.grab(xdisplay=self.display)

    def close(self) -> None:
        for process in (self.trayer, self.xvfb):
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.xvfb.stdout is not None:
            self.xvfb.stdout.close()


@pytest.fixture
def desktop() -> Iterator[Desktop]:
    for program in ("Xvfb", "trayer"):
        if subprocess.run(["which", program], capture_output=True, check=False).returncode:
            pytest.fail(f"{program} is missing: .ci/setup installs it (Debian's xvfb, trayer)")
    made = Desktop()
    try:
        made.wait_ready()
        yield made
    finally:
        made.close()


def shows(desktop: Desktop, colour: tuple[int, int, int], name: str) -> bool:
    """Whether the notification area holds a patch of ``colour`` (the icon); saved as NAME."""
    if desktop.trayer.poll() is not None:
        pytest.fail(f"trayer ended with exit code {desktop.trayer.returncode}")
    shot = desktop.grab().convert("RGB")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot.save(ARTIFACTS / f"{name}.png")
    area = shot.crop((0, 0, 200, 40))
    found = sum(
        area.getpixel((x, y)) == colour for x in range(area.width) for y in range(area.height)
    )
    return found >= 20


def test_the_tray_icon_in_a_notification_area(tmp_path: Path, desktop: Desktop) -> None:
    config = tmp_path / "skyframe.yaml"
    config.write_text(
        "state_dir: state\napi: {listen: 127.0.0.1:0}\npipelines:\n  - name: survey\n"
        "    source: {path: incoming, settle: 0}\n    sinks:\n      - url: outbox\n",
        encoding="utf-8",
    )
    (tmp_path / "incoming").mkdir()
    log = tmp_path / "tray.log"
    with log.open("wb") as out:
        tray = subprocess.Popen(
            [sys.executable, "-m", "skyframe", "tray", "--interval", "0.3s", str(config)],
            env={**os.environ, "DISPLAY": desktop.display},
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
        )
    daemon = None
    try:
        try:
            wait_for(
                lambda: (
                    shows(desktop, COLOURS["offline"], "tray-offline") or tray.poll() is not None
                ),
                timeout=30,
                what="the grey icon (no daemon yet)",
            )
        except AssertionError as exc:  # what the tray said, and the last screenshot's name
            raise AssertionError(
                f"{exc} (screenshot: {ARTIFACTS / 'tray-offline.png'}); the tray's output:\n"
                + log.read_text(errors="replace")
            ) from None
        assert tray.poll() is None, log.read_text(errors="replace")
        daemon = spawn_daemon(tmp_path, tmp_path / "daemon.log", config.name)
        wait_for(lambda: shows(desktop, COLOURS["idle"], "tray-idle"), timeout=60, what="green")
        model = TrayModel(load_config(config))
        model.pause()  # as the menu's Pause does
        wait_for(lambda: shows(desktop, COLOURS["paused"], "tray-paused"), timeout=30, what="amber")
        model.resume()
        wait_for(lambda: shows(desktop, COLOURS["idle"], "tray-resumed"), timeout=30, what="green")
    finally:
        for process in (tray, daemon):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


# --- skyframe's own icon on X (what the tray shows where pystray would use its X backend) ----


class RunningIcon:
    """An XTrayIcon on ``desktop``, its loop on a thread of this process."""

    def __init__(self, desktop: Desktop, monkeypatch: pytest.MonkeyPatch) -> None:
        from skyframe.xtray import XTrayIcon

        monkeypatch.setenv("DISPLAY", desktop.display)
        self.clicks = threading.Event()
        self.icon = XTrayIcon(
            "skyframe-test",
            icon_image(TrayState("offline", "")),
            "skyframe: test",
            on_click=self.clicks.set,
        )
        self.thread = threading.Thread(target=self.icon.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.icon.stop()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the icon's loop did not end"


def icon_window(desktop: Desktop) -> tuple[bool, int, int]:
    """The test icon's window, as the X server has it: (inside the area, width, height)."""
    from Xlib.display import Display
    from Xlib.error import XError

    display = Display(desktop.display)
    try:
        root = display.screen().root
        found: list[tuple[bool, int, int]] = []

        def walk(window: Any, depth: int) -> None:
            try:
                children = window.query_tree().children
            except XError:  # a window of an area that just quit, gone meanwhile
                return
            for child in children:
                try:
                    kind = child.get_wm_class()
                except XError:
                    continue
                if kind == ("skyframe-testSystemTrayIcon", "skyframe-test"):
                    geometry = child.get_geometry()
                    found.append((depth > 0, geometry.width, geometry.height))
                walk(child, depth + 1)

        walk(root, 0)
        assert len(found) == 1, found
        return found[0]
    finally:
        display.close()


def test_the_x_icon_stays_in_the_area_through_quick_changes(
    desktop: Desktop, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = RunningIcon(desktop, monkeypatch)
    try:
        wait_for(lambda: shows(desktop, COLOURS["offline"], "xtray-grey"), timeout=30, what="grey")
        kinds: list[Kind] = ["idle", "sending", "paused", "idle", "errors"]  # ends red
        for n in range(40):  # pystray's X icon docked again at each: it got lost now and then
            kind = kinds[n % len(kinds)]
            running.icon.icon = icon_image(TrayState(kind, ""))
            running.icon.title = f"skyframe: {kind} {n}"
        wait_for(lambda: shows(desktop, COLOURS["errors"], "xtray-last"), timeout=30, what="red")
        inside, width, height = icon_window(desktop)
        assert inside
        assert width >= 16
        assert height >= 16
        assert running.icon.docked
    finally:
        running.stop()


def test_the_x_icon_waits_for_an_area_and_docks_again_when_it_restarts(
    desktop: Desktop, monkeypatch: pytest.MonkeyPatch
) -> None:
    desktop.trayer.terminate()
    desktop.trayer.wait(10)
    running = RunningIcon(desktop, monkeypatch)
    try:
        time.sleep(1)
        assert icon_window(desktop)[0] is False  # no area: the icon waits outside
        for _ in range(2):  # an area that starts, then one that starts after it quit
            desktop.trayer = desktop.start_trayer()
            desktop.wait_ready()
            wait_for(lambda: running.icon.docked, timeout=30, what="the icon docked")
            wait_for(
                lambda: shows(desktop, COLOURS["offline"], "xtray-again"), timeout=30, what="grey"
            )
            desktop.trayer.terminate()
            desktop.trayer.wait(10)
            wait_for(lambda: not running.icon.docked, timeout=30, what="the area gone")
        desktop.trayer = desktop.start_trayer()  # for the fixture to stop
    finally:
        running.stop()


def test_a_click_on_the_x_icon_runs_the_default_action(
    desktop: Desktop, monkeypatch: pytest.MonkeyPatch
) -> None:
    from Xlib import X
    from Xlib.display import Display
    from Xlib.ext import xtest

    running = RunningIcon(desktop, monkeypatch)
    try:
        wait_for(lambda: shows(desktop, COLOURS["offline"], "xtray-click"), timeout=30, what="grey")
        shot = desktop.grab().convert("RGB")
        x, y = next(
            (x, y)
            for y in range(40)
            for x in range(200)
            if shot.getpixel((x, y)) == COLOURS["offline"]
        )
        display = Display(desktop.display)
        try:
            xtest.fake_input(display, X.MotionNotify, x=x + 2, y=y + 2)
            xtest.fake_input(display, X.ButtonPress, 1)
            xtest.fake_input(display, X.ButtonRelease, 1)
            display.sync()
        finally:
            display.close()
        assert running.clicks.wait(10), "the click did not reach the icon"
    finally:
        running.stop()


def test_the_x_icon_ends_with_one_line_when_the_display_goes(
    desktop: Desktop, monkeypatch: pytest.MonkeyPatch
) -> None:
    from skyframe.xtray import XTrayIcon

    monkeypatch.setenv("DISPLAY", desktop.display)
    icon = XTrayIcon("skyframe-test", icon_image(TrayState("offline", "")), "skyframe: test")
    ended: list[BaseException | None] = []

    def run() -> None:
        try:
            icon.run()
        except BaseException as exc:  # what run() raised, for the test to look at
            ended.append(exc)
        else:
            ended.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(lambda: shows(desktop, COLOURS["offline"], "xtray-gone"), timeout=30, what="grey")
    desktop.xvfb.terminate()
    desktop.xvfb.wait(10)
    thread.join(10)
    assert len(ended) == 1
    assert isinstance(ended[0], SkyframeError)
    assert str(ended[0]).startswith("the tray icon's X display closed")


def test_pystrays_x_backend_is_told_by_its_icons_module() -> None:
    class XorgIcon:
        __module__ = "pystray._xorg"

    class IndicatorIcon:
        __module__ = "pystray._appindicator"

    assert pystray_chose_x(type("pystray", (), {"Icon": XorgIcon}))
    assert not pystray_chose_x(type("pystray", (), {"Icon": IndicatorIcon}))
    assert not pystray_chose_x(type("pystray", (), {}))
