"""The hub's page in a real headless Chromium (Debian's, driven by Playwright, as in
test_dashboard.py), against a hub on SQLite and on PostgreSQL: stations listed, the file
search, the pause button creating a command, the sign-in."""

from __future__ import annotations

import time
from typing import Any

import pytest
from playwright.sync_api import Page
from test_hub import (
    OPERATOR_TOKEN,
    SHA_A,
    Hub,
    batch,
    event,
    start_hub,  # noqa: F401 (the fixture: a hub on each database)
    status,
)

pytestmark = pytest.mark.slow


def fill(hub: Hub) -> None:
    """Two stations: one reporting (with a file, today's flight and a status), one never."""
    token = hub.add_station("field-laptop-3")
    hub.add_station("quiet-1")
    now = time.time()
    group = {"group": {"name": "flight", "key": "today/f1"}, "sha256": SHA_A}
    hub.ingest(
        token,
        batch(
            "field-laptop-3",
            event(relpath="f1/DJI_0042.JPG", at=now, meta=group),
            event(relpath="f1/<img src=x onerror=window.__pwned=1>.JPG", at=now),
            status=status(dead=1),
        ),
    )


def test_stations_search_and_pause(start_hub: Any, page: Page) -> None:  # noqa: F811
    hub: Hub = start_hub()
    fill(hub)
    page.goto(hub.url + "/")
    page.locator('#conn[data-state="live"]').wait_for()
    card = page.locator('article.station[data-station="field-laptop-3"]')
    card.wait_for()
    assert card.get_attribute("data-state") == "online"
    assert "dead letters 1" in card.inner_text()
    assert card.locator('li.pipeline[data-pipeline="survey"]').count() == 1
    quiet = page.locator('article.station[data-station="quiet-1"]')
    assert quiet.get_attribute("data-state") == "never seen"
    flight = page.locator('tr.flight[data-name="today/f1"]')
    flight.wait_for()
    assert "1 / 1" in flight.inner_text()

    # Where is this file: by name, then by sha256.
    page.locator("#search-input").fill("dji_0042.jpg")
    page.locator("#search-form button").click()
    found = page.locator("#search-results tr.found")
    found.first.wait_for()
    assert found.count() == 1
    assert "2025/f1/DJI_0042.JPG" in found.first.inner_text()
    page.locator("#search-input").fill(SHA_A)
    page.locator("#search-form button").click()
    page.locator('#search-results tr.found[data-station="field-laptop-3"]').wait_for()
    page.locator("#search-input").fill("*.JPG")
    page.locator("#search-form button").click()
    found.nth(1).wait_for()
    assert found.count() == 2
    assert page.evaluate("window.__pwned") is None

    # Pause: a command waits for the station's next report.
    card.locator("button.station-pause").click()
    page.locator('#commands li[data-state="pending"]').wait_for()
    commands = hub.get("/api/commands?station=field-laptop-3")["commands"]
    assert [(c["action"], c["pipeline"], c["state"]) for c in commands] == [
        ("pause", None, "pending")
    ]
    assert commands[0]["id"] in page.locator("#notice").inner_text()
    card.locator('li.pipeline[data-pipeline="survey"] button.pipeline-toggle').click()
    page.locator("#commands li").nth(1).wait_for()
    latest = hub.get("/api/commands")["commands"][0]
    assert (latest["action"], latest["pipeline"]) == ("pause", "survey")


def test_sign_in_with_the_operator_token(start_hub: Any, page: Page) -> None:  # noqa: F811
    hub: Hub = start_hub(f"operators:\n  token: {OPERATOR_TOKEN}\n")
    fill(hub)
    page.goto(hub.url + "/")
    page.locator("#login").wait_for()
    page.locator("#login-token").fill("wrong")
    page.locator("#login-form button").click()
    page.locator("#login-error").wait_for()
    assert page.locator("#login-error").inner_text() == "wrong token"
    page.locator("#login-token").fill(OPERATOR_TOKEN)
    page.locator("#login-form button").click()
    page.locator('article.station[data-station="field-laptop-3"]').wait_for()
    assert page.locator("#login").is_hidden()
    # The token is in neither storage: the page holds an HttpOnly cookie only.
    stored = page.evaluate("JSON.stringify([sessionStorage, localStorage, document.cookie])")
    assert OPERATOR_TOKEN not in stored
