"""``bwlimit``: the rate measured on the wire (through a counting proxy) stays at the limit,
per sink and for all concurrent transfers together."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import servers
from fakes.proxy import CountingProxy
from helpers import (
    finish,
    sftp_through,
    start_skyframe,
    unique_name,
    write_random,
    write_sink_config,
)

MB = 1_000_000
MIB = 1024 * 1024
LIMIT = 4 * MB


class Sampler:
    """Samples the proxy's upward byte count every 10 ms while a run goes on."""

    def __init__(self, proxy: CountingProxy) -> None:
        self.proxy = proxy
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.proxy.bytes_up))
            time.sleep(0.01)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def rate(self, total: int) -> float:
        """Bytes per second between the moments 20% and 90% of ``total`` had gone up.

        Uploads are paced before each piece they send, so the count rises in steps; with
        pieces of one size, both moments are the first samples past a step, which makes the
        quotient the paced rate.
        """

        def first_past(share: float) -> tuple[float, int]:
            return next((t, n) for t, n in self.samples if n >= share * total)

        (t1, n1), (t2, n2) = first_past(0.2), first_past(0.9)
        assert t2 > t1, self.samples
        return (n2 - n1) / (t2 - t1)


def s3_through(proxy: CountingProxy, server: servers.S3Server, **extra: Any) -> dict[str, Any]:
    bucket = unique_name("b")
    server.make_bucket(bucket)
    options = {"endpoint_url": f"http://{proxy.address}", "key": server.key}
    options |= {"secret": server.secret, "part_size": "5MiB"}
    return {"url": f"s3://{bucket}/drop", "options": options, **extra}


def test_sink_bwlimit_holds_the_rate_on_the_wire(
    s3_server: servers.S3Server, tmp_path: Path
) -> None:
    size = 5 * 5 * MIB  # five whole parts: every step of the count is one part
    write_random(tmp_path / "incoming" / "clip.mp4", size, seed=7)
    with CountingProxy(servers.LOOPBACK, s3_server.port) as proxy:
        config = write_sink_config(tmp_path, s3_through(proxy, s3_server, bwlimit="4MB/s"))
        with Sampler(proxy) as sampler:
            finish(start_skyframe(config, "-q", "run", "--once"))
    rate = sampler.rate(size)
    assert rate == pytest.approx(LIMIT, rel=0.15), f"{rate / MB:.2f} MB/s"


def test_global_bwlimit_is_shared_by_concurrent_transfers(
    sftp_server: servers.SFTPServer, tmp_path: Path
) -> None:
    for index in range(4):  # two whole 4 MiB SFTP writes each, all four files at once
        write_random(tmp_path / "incoming" / f"clip{index}.mp4", 8 * MIB, seed=10 + index)
    with CountingProxy(servers.LOOPBACK, sftp_server.port) as proxy:
        sink = sftp_through(proxy, sftp_server, tmp_path)
        folder = Path(urlsplit(sink["url"]).path)
        config = write_sink_config(tmp_path, sink, bwlimit="8MB/s")
        with Sampler(proxy) as sampler:
            finish(start_skyframe(config, "-q", "run", "--once"))
    assert len(list(folder.iterdir())) == 4
    rate = sampler.rate(4 * 8 * MIB)
    assert rate == pytest.approx(2 * LIMIT, rel=0.15), f"{rate / MB:.2f} MB/s"
