"""``run --once`` to SFTP over a field link that drops every few seconds (tests/fakes/link.py in
front of the test OpenSSH server): everything arrives, the large file goes on from where each
cut left it, and no temporary file is left on the server.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import servers
from fakes.link import LinkEmulator, mbit
from helpers import finish, journal_entries, sftp_through, start_skyframe, write_random

PHOTOS = 10
PHOTO_SIZE = 200_000
VIDEO_SIZE = 8_000_000
PAYLOAD = PHOTOS * PHOTO_SIZE + VIDEO_SIZE
RATE = mbit(24)  #: about 3.3 s of payload on the link alone: a cut or two land in it
RTT = 0.04
CUT_EVERY = 2.0


def test_run_once_over_a_link_cut_every_two_seconds_delivers_everything(
    sftp_server: servers.SFTPServer, tmp_path: Path
) -> None:
    incoming = tmp_path / "incoming"
    expected: dict[str, int] = {}
    for n in range(PHOTOS):
        name = f"photos/DJI_{n:04}.JPG"
        (incoming / "photos").mkdir(parents=True, exist_ok=True)
        (incoming / name).write_bytes(os.urandom(PHOTO_SIZE))
        expected[name] = PHOTO_SIZE
    write_random(incoming / "video" / "DJI_0100.MP4", VIDEO_SIZE, seed=7)
    expected["video/DJI_0100.MP4"] = VIDEO_SIZE

    with LinkEmulator(
        servers.LOOPBACK, sftp_server.port, up_bps=RATE, rtt=RTT, cut_every=CUT_EVERY
    ) as link:
        sink = sftp_through(link, sftp_server, tmp_path)
        config = tmp_path / "skyframe.yaml"
        config.write_text(
            f"""
state_dir: state
retry: {{max_attempts: 5, initial: 0.5, max: 5}}
pipelines:
  - name: flight
    source: {{path: incoming, settle: 0}}
    sinks:
      - {json.dumps(sink)}
""",
            encoding="utf-8",
        )
        began = time.monotonic()
        out = finish(start_skyframe(config, "-v", "run", "--once"), timeout=120)
        seconds = time.monotonic() - began
        sent, cuts, cut_events = link.bytes_up, link.cut_connections, link.cuts

    root = Path(sink["url"].split(f":{link.port}", 1)[1])
    landed = {
        str(path.relative_to(root)): path.stat().st_size
        for path in root.rglob("*")
        if path.is_file()
    }
    assert landed == expected, out  # everything, and no temporary (.part) file left
    assert cuts > 0, f"the link was never cut in {seconds:.1f} s"
    # The large file went on from where each cut left it, not from its start: a cut sends
    # again only what was on its way (a batch's photos being written, 1 MiB at most, and the
    # video's writes on the wire), not the video's 8 MB.
    assert sent < PAYLOAD + cut_events * 2_000_000, (sent, PAYLOAD, cut_events, out[-3000:])
    assert journal_entries(tmp_path) == []
