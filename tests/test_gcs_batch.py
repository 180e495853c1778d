"""GCS's batch sender against the real GCS emulator (fake-gcs-server).

The contract every sink kind meets is in ``test_sinks.py``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import servers
from helpers import batch_requests, gcs_sink

from skyframe.errors import SourceUnreadableError


def test_gcs_batch_sends_small_files_at_once_and_reports_each(
    tmp_path: Path, gcs_server: servers.GCSServer
) -> None:
    from skyframe.config import SinkConfig
    from skyframe.protocols.gcs.plugin import skyframe_transfer_batch
    from skyframe.storage import TransferResult, open_sink

    sink = open_sink(SinkConfig.model_validate(gcs_sink(gcs_server)), tmp_path)
    send = skyframe_transfer_batch(sink)
    assert send is not None
    files = {f"batch/{i:02d} é.jpg": os.urandom(700) for i in range(20)}
    files |= {"batch/gone.jpg": b"gone", "batch/empty.jpg": b""}
    requests = batch_requests(sink, tmp_path / "src", files)
    (tmp_path / "src" / "batch" / "gone.jpg").unlink()
    check = gcs_server.filesystem()
    try:
        outcomes = send(requests)
        assert isinstance(outcomes[-2], SourceUnreadableError)
        assert not check.exists(requests[-2].remote_path)
        for request, outcome in zip(requests, outcomes, strict=True):
            if request is requests[-2]:
                continue
            data = request.local_path.read_bytes()
            assert outcome == TransferResult(len(data), hashlib.sha256(data).hexdigest())
            assert check.cat_file(request.remote_path) == data
            assert check.info(request.remote_path)["metadata"] == {"sha256": outcome.sha256}
    finally:
        servers.close_filesystem(check)
        sink.close()
