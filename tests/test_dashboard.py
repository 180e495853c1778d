"""The live dashboard, in a real headless Chromium, against a real daemon in a subprocess.

Each test starts ``skyframe run`` on a config of its own (API on a free loopback port), opens
the address the daemon wrote to ``<state_dir>/api.json`` and checks the page against what the
API says. The browser is Debian's Chromium driven by Playwright; when it is missing the tests
fail and say so. A full-page screenshot of each test's last state is saved in
``test-artifacts/`` at the repository root (``SKYFRAME_TEST_ARTIFACTS`` overrides it).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, spawn_daemon, wait_for
from playwright.sync_api import Page, expect

pytestmark = pytest.mark.slow

START_TIMEOUT = 30.0  # seconds for a daemon to write api.json

# `relpath` names that are HTML. A slash cannot be part of a file name, so the second one is
# a file `b>.txt` in a folder `<b>bold<`.
IMG_NAME = "<img src=x onerror=window.__pwned=1>.txt"
BOLD_NAME = "<b>bold</b>.txt"
LATE_NAME = "<img src=y onerror=window.__pwned=2>late.txt"
SINK_NAME = "<i>sink</i>"


def one_pipeline(*, api: str = '{listen: "127.0.0.1:0"}', sink_extra: str = "") -> str:
    """A config with the pipeline `survey` from incoming/ to outbox/, the API on a free port."""
    return f"""
        state_dir: state
        shutdown_grace: 1s
        api: {api}
        pipelines:
          - name: survey
            source: {{path: incoming, settle: 0}}
            sinks:
              - url: outbox
                {sink_extra}
        """


# --- the daemon ------------------------------------------------------------------------------


@dataclass
class Daemon:
    root: Path
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.load(response)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def dead(self) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = self.get("/api/jobs?state=dead")["jobs"]
        return jobs

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM by PID, SIGKILL if it does not end in time."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)


StartDaemon = Callable[[str], Daemon]


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[StartDaemon]:
    """Start ``skyframe run`` on a config (text) in tmp_path; stopped at the end of the test."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(config: str) -> Daemon:
        (tmp_path / "skyframe.yaml").write_text(textwrap.dedent(config).lstrip())
        (tmp_path / "incoming").mkdir(exist_ok=True)
        log = tmp_path / "daemon.log"
        process = spawn_daemon(tmp_path, log)
        processes.append(process)
        api_file = tmp_path / "state" / "api.json"
        deadline = time.monotonic() + START_TIMEOUT
        info: dict[str, Any] = {}
        while not info:
            if process.poll() is not None:
                raise AssertionError(
                    f"the daemon exited ({process.returncode}) before it wrote {api_file}:\n"
                    + log.read_text(errors="replace")[-3000:]
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the daemon did not write {api_file} within {START_TIMEOUT:.0f} s:\n"
                    + log.read_text(errors="replace")[-3000:]
                )
            try:
                info = json.loads(api_file.read_text())
            except (OSError, ValueError):
                time.sleep(0.05)
        assert info.get("pid") == process.pid, info
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", info["url"]), info
        # The address is printed for the user too.
        wait_for(
            lambda: f"dashboard and API: {info['url']}/" in log.read_text(errors="replace"),
            what="the dashboard line",
            timeout=20,
        )
        return Daemon(tmp_path, process, info["url"], log)

    yield start
    for process in processes:
        stop(process)


# --- the browser -----------------------------------------------------------------------------


def open_dashboard(page: Page, daemon: Daemon) -> None:
    page.goto(daemon.url + "/")
    page.locator('#conn[data-state="live"]').wait_for()
    page.locator("article.pipeline").first.wait_for()


# --- the tests -------------------------------------------------------------------------------


def test_progress_bar_of_a_running_upload_advances(
    tmp_path: Path, start_daemon: StartDaemon, page: Page
) -> None:
    size = 30_000_000
    (tmp_path / "incoming").mkdir()
    with (tmp_path / "incoming" / "flight.mp4").open("wb") as f:
        f.truncate(size)  # sparse: instant to write, 15 s to send at 2MB/s
    daemon = start_daemon(one_pipeline(sink_extra="bwlimit: 2MB/s"))
    open_dashboard(page, daemon)
    row = page.locator('#transfers li.transfer[data-relpath="flight.mp4"]')
    row.wait_for()

    def reading() -> tuple[int, float]:
        done = int(row.get_attribute("data-bytes-done") or -1)
        value = row.locator("progress").evaluate("bar => bar.value")
        return done, float(value)

    wait_for(lambda: reading()[0] > 0, what="the first progress of flight.mp4", timeout=10)
    first, first_value = reading()
    time.sleep(2.5)
    second, second_value = reading()
    assert 0 < first < second < size, (first, second)
    assert 0 < first_value < second_value < size, (first_value, second_value)
    assert row.get_attribute("data-size") == str(size)
    percent = float(row.get_attribute("data-percent") or "nan")
    assert 0 < percent < 100
    assert re.search(r"MB of 30\.0 MB · \d+ %", row.inner_text()), row.inner_text()
    # The API agrees that the file is on its way, not done.
    transfers = daemon.get("/api/status")["transfers"]
    assert [t["relpath"] for t in transfers] == ["flight.mp4"], transfers
    assert 0 < transfers[0]["bytes_done"] < size


def test_pause_button_pauses_and_resumes_the_daemon(start_daemon: StartDaemon, page: Page) -> None:
    daemon = start_daemon(one_pipeline())
    open_dashboard(page, daemon)
    state = page.locator("#daemon-state")
    toggle = page.locator("#daemon-toggle")
    card = page.locator('article.pipeline[data-pipeline="survey"]')
    assert state.get_attribute("data-paused") == "false"
    assert toggle.inner_text() == "Pause"

    toggle.click()
    page.locator('#daemon-state[data-paused="true"]').wait_for()
    assert daemon.get("/api/status")["paused"] is True
    assert state.inner_text() == "paused"
    assert toggle.inner_text() == "Resume"
    assert card.locator(".badge").inner_text() == "held"  # held by the daemon-wide pause

    toggle.click()
    page.locator('#daemon-state[data-paused="false"]').wait_for()
    status = daemon.get("/api/status")
    assert status["paused"] is False
    assert toggle.inner_text() == "Pause"

    # The pipeline's own button pauses only that pipeline.
    card.locator("button.pipeline-toggle").click()
    page.locator('article.pipeline[data-pipeline="survey"][data-paused="true"]').wait_for()
    status = daemon.get("/api/status")
    assert status["paused"] is False
    assert status["pipelines"][0]["paused"] is True
    card.locator("button.pipeline-toggle").click()
    page.locator('article.pipeline[data-pipeline="survey"][data-paused="false"]').wait_for()
    assert daemon.get("/api/status")["pipelines"][0]["paused"] is False


BROKEN_PIPELINE = f"""
    state_dir: state
    shutdown_grace: 1s
    api: {{listen: "127.0.0.1:0"}}
    pipelines:
      - name: survey
        source: {{path: incoming, settle: 0}}
        retry: {{max_attempts: 1}}
        sinks:
          - url: outbox
            name: {json.dumps(SINK_NAME)}
    """


def test_file_names_with_html_are_shown_as_text(
    tmp_path: Path, start_daemon: StartDaemon, page: Page
) -> None:
    # The sink folder is a regular file: every upload fails and, with one attempt, is
    # dead-lettered at once. Names reach the page through the dead-letter list, the recent
    # errors of the status and the live feed of lifecycle events.
    incoming = tmp_path / "incoming"
    (incoming / "<b>bold<").mkdir(parents=True)
    (incoming / IMG_NAME).write_text("img")
    (incoming / BOLD_NAME).write_text("bold")
    (tmp_path / "outbox").write_text("not a folder")
    daemon = start_daemon(BROKEN_PIPELINE)
    wait_for(lambda: len(daemon.dead()) == 2, what="two dead letters", timeout=20)
    open_dashboard(page, daemon)
    dead = page.locator("#dead-list li.dead")
    dead.nth(1).wait_for()
    assert sorted(dead.locator(".dead-path").all_inner_texts()) == sorted([BOLD_NAME, IMG_NAME])

    # A file that fails while the page is open comes through the event stream.
    (incoming / LATE_NAME).write_text("late")
    feed = page.locator("#feed li.event", has_text=LATE_NAME)
    feed.first.wait_for()
    page.locator(f'#dead-list li.dead[data-relpath="{LATE_NAME}"]').wait_for()
    page.locator("#errors li.event", has_text=LATE_NAME).first.wait_for()

    sink = page.locator('article.pipeline[data-pipeline="survey"] li.sink .sink-name')
    assert sink.inner_text() == SINK_NAME
    text = page.locator("main").inner_text()
    for name in (IMG_NAME, BOLD_NAME, LATE_NAME, SINK_NAME):
        assert name in text, name
    # Nothing was parsed as HTML: no element from a name, no handler ran.
    created = page.evaluate(
        "document.querySelectorAll('img, b, i, script:not([src]), [onerror]').length"
    )
    assert created == 0
    assert page.evaluate("typeof window.__pwned") == "undefined"

    # Long names wrap: on a phone's screen the page never scrolls sideways.
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390


def test_retry_button_puts_a_dead_letter_back_in_the_queue(
    tmp_path: Path, start_daemon: StartDaemon, page: Page
) -> None:
    incoming = tmp_path / "incoming"
    (incoming / "flight-01").mkdir(parents=True)
    (incoming / "flight-01" / "DJI_0001.JPG").write_bytes(b"jpeg" * 1000)
    (tmp_path / "outbox").write_text("not a folder")
    daemon = start_daemon(BROKEN_PIPELINE)
    wait_for(lambda: len(daemon.dead()) == 1, what="a dead letter", timeout=20)
    open_dashboard(page, daemon)
    row = page.locator('#dead-list li.dead[data-relpath="flight-01/DJI_0001.JPG"]')
    row.wait_for()
    assert "outbox" in row.locator(".dead-error").inner_text()

    (tmp_path / "outbox").unlink()  # the cause is fixed: the sink folder can be made
    row.locator("button.retry").click()
    wait_for(
        lambda: not daemon.dead(),
        what="the dead-letter list to empty through the API",
        timeout=20,
    )
    delivered = tmp_path / "outbox" / "flight-01" / "DJI_0001.JPG"
    wait_for(delivered.is_file, what="the retried file to be delivered", timeout=20)
    assert delivered.read_bytes() == b"jpeg" * 1000
    page.locator("#dead-empty").wait_for()
    assert page.locator("#dead-list li").count() == 0
    page.locator("#feed li.event[data-kind='delivered']", has_text="DJI_0001.JPG").wait_for()
    expect(page.locator("#total-delivered")).to_have_text("1")


def test_sign_in_form_when_the_daemon_has_a_token(start_daemon: StartDaemon, page: Page) -> None:
    daemon = start_daemon(one_pipeline(api='{listen: "127.0.0.1:0", token: "s3cret-token"}'))
    with pytest.raises(urllib.error.HTTPError) as refused:
        daemon.get("/api/status")
    assert refused.value.code == 401
    refused.value.close()

    page.goto(daemon.url + "/")
    page.locator("#login-token").wait_for()
    assert page.locator("#conn").get_attribute("data-state") == "signed-out"
    page.fill("#login-token", "wrong")
    page.press("#login-token", "Enter")
    expect(page.locator("#login-error")).to_have_text("Wrong token.")

    page.fill("#login-token", "s3cret-token")
    page.press("#login-token", "Enter")
    page.locator('#conn[data-state="live"]').wait_for()
    page.locator('article.pipeline[data-pipeline="survey"]').wait_for()
    assert page.locator("#login").is_hidden()
    cookies = page.context.cookies()
    port = daemon.url.rsplit(":", 1)[-1]
    assert [(c["name"], c["httpOnly"]) for c in cookies] == [(f"skyframe_session_{port}", True)]
    assert "s3cret-token" not in cookies[0]["value"]  # derived from the token, not the token
    # Signed in, the buttons work too.
    page.locator("#daemon-toggle").click()
    page.locator('#daemon-state[data-paused="true"]').wait_for()


def test_flights_show_their_files_and_photo_positions(
    tmp_path: Path, start_daemon: StartDaemon, page: Page
) -> None:
    daemon = start_daemon(
        """
        state_dir: state
        shutdown_grace: 1s
        api: {listen: "127.0.0.1:0"}
        pipelines:
          - name: survey
            source: {path: incoming, recursive: true, settle: 0}
            processes: [geotag]
            groups:
              - flight: {quiet: 1s}
            sinks:
              - url: outbox
        """
    )
    open_dashboard(page, daemon)
    flight = tmp_path / "incoming" / "flight-07"
    flight.mkdir()
    ebee = REPO / "tests" / "data" / "drone" / "ebee-snowpeak"
    for photo in sorted(ebee.glob("*.JPG")):
        (flight / photo.name).write_bytes(photo.read_bytes())
    card = page.locator('#flights li.flight[data-key="flight-07"]')
    expect(card.locator(".badge")).to_have_text("complete")
    expect(card.locator(".flight-counts")).to_contain_text("3 of 3 files delivered")
    expect(card.locator("svg circle.photo")).to_have_count(3)
    expect(card.locator("svg polygon.footprint")).to_have_count(1)
    (api_group,) = daemon.get("/api/groups")["groups"]
    assert (api_group["key"], api_group["files"], api_group["state"]) == (
        "flight-07",
        3,
        "reported",
    )
    assert len(api_group["positions"]) == 3


def test_reload_button_reloads_the_config_and_shows_a_refusal(
    tmp_path: Path, start_daemon: StartDaemon, page: Page
) -> None:
    daemon = start_daemon(one_pipeline())
    open_dashboard(page, daemon)
    button = page.locator("#reload-config")
    notice = page.locator("#notice")
    # A second pipeline, added by the button.
    (tmp_path / "logs").mkdir()
    config = tmp_path / "skyframe.yaml"
    added = config.read_text() + (
        "  - name: logs\n    source: {path: logs, settle: 0}\n    sinks:\n      - url: logbox\n"
    )
    config.write_text(added)
    button.click()
    expect(notice).to_have_text("Config reloaded: added logs.")
    page.locator('article.pipeline[data-pipeline="logs"]').wait_for()
    # A broken config: refused with its error, the running one goes on.
    config.write_text(added.replace("settle: 0}", "setle: 0}"))
    button.click()
    expect(notice).to_contain_text("config not reloaded: ")
    expect(notice).to_contain_text("unknown key 'setle'")
    assert [p["name"] for p in daemon.get("/api/status")["pipelines"]] == ["survey", "logs"]


def test_executors_are_shown_with_their_state(start_daemon: StartDaemon, page: Page) -> None:
    config = one_pipeline().replace(
        "        pipelines:",
        '        executors:\n          cluster: {dask: "tcp://127.0.0.1:9", timeout: 5s}\n'
        "        pipelines:",
    )
    daemon = start_daemon(config)
    open_dashboard(page, daemon)
    row = page.locator('#executors li[data-executor="cluster"]')
    row.wait_for()
    assert page.locator("#executors-section").is_visible()
    assert row.inner_text() == (
        "cluster: dask tcp://127.0.0.1:9, not connected, 0 worker(s), 0 call(s) in flight"
    )


def test_no_executors_no_section(start_daemon: StartDaemon, page: Page) -> None:
    open_dashboard(page, start_daemon(one_pipeline()))
    assert page.locator("#executors-section").is_hidden()
