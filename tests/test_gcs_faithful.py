"""FaithfulGCS speaks the resumable-upload protocol the way GCS does, checked through gcsfs.

gcsfs's own helpers are the client: `gcsfs.core.initiate_upload`, `gcsfs.core.upload_chunk`
(a POST with `Content-Range: bytes A-B/TOTAL`) and `fs._call` for status queries
(`PUT`, empty body, `Content-Range: bytes */TOTAL`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

# Read by gcsfs at import: keep the plain GCSFileSystem (no zonal-bucket probe).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import aiohttp
import gcsfs.core
import pytest
from fakes.gcs_faithful import CHUNK_QUANTUM, FaithfulGCS
from fsspec.asyn import sync
from gcsfs.retry import HttpError
from servers import close_filesystem

Q = CHUNK_QUANTUM
BUCKET = "bucket"
OCTETS = "application/octet-stream"


@pytest.fixture
def server() -> Iterator[FaithfulGCS]:
    with FaithfulGCS() as srv:
        srv.create_bucket(BUCKET)
        yield srv


@pytest.fixture
def fs(server: FaithfulGCS) -> Iterator[Any]:
    filesystem = gcsfs.core.GCSFileSystem(
        token="anon", project="test", endpoint_url=server.endpoint_url, skip_instance_cache=True
    )
    yield filesystem
    close_filesystem(filesystem)


def initiate(fs: Any, key: str, metadata: dict[str, str] | None = None) -> str:
    location: str = sync(fs.loop, gcsfs.core.initiate_upload, fs, BUCKET, key, OCTETS, metadata)
    return location


def chunk(fs: Any, location: str, data: bytes, offset: int, total: int) -> Any:
    """gcsfs's upload_chunk: None after a 308, the object resource after a 200."""
    return sync(fs.loop, gcsfs.core.upload_chunk, fs, location, data, offset, total, OCTETS)


def query(fs: Any, location: str, total: int | str = "*") -> tuple[Any, bytes]:
    """A status query through gcsfs: (response headers, body)."""
    headers = {"Content-Range": f"bytes */{total}"}
    result: tuple[Any, bytes] = sync(fs.loop, fs._call, "PUT", location, headers=headers, data=b"")
    return result


def only_session(server: FaithfulGCS) -> str:
    (session_id,) = server.sessions()
    return session_id


def test_three_chunk_upload_gives_the_exact_bytes_back(server: FaithfulGCS, fs: Any) -> None:
    data = os.urandom(4 * Q + 12345)
    location = initiate(fs, "dir/three chunks.bin", {"flight": "F-7"})
    assert location.startswith(f"{server.endpoint_url}/upload/storage/v1/b/{BUCKET}/o?")
    assert "uploadType=resumable" in location
    assert "upload_id=" in location

    assert chunk(fs, location, data[:Q], 0, len(data)) is None
    assert chunk(fs, location, data[Q : 3 * Q], Q, len(data)) is None
    resource = chunk(fs, location, data[3 * Q :], 3 * Q, len(data))

    assert resource["name"] == "dir/three chunks.bin"
    assert resource["bucket"] == BUCKET
    assert resource["size"] == str(len(data))
    assert resource["md5Hash"] == base64.b64encode(hashlib.md5(data).digest()).decode()
    assert resource["metadata"] == {"flight": "F-7"}
    assert resource["generation"].isdigit()
    assert server.object_bytes(BUCKET, "dir/three chunks.bin") == data
    assert fs.cat_file(f"{BUCKET}/dir/three chunks.bin") == data
    assert fs.info(f"{BUCKET}/dir/three chunks.bin")["size"] == len(data)
    assert server.session_state(only_session(server)) == "final"
    assert server.bytes_received == len(data)
    chunk_ranges = [r for m, _, r in server.requests if m == "POST" and r]
    assert chunk_ranges == [
        f"bytes 0-{Q - 1}/{len(data)}",
        f"bytes {Q}-{3 * Q - 1}/{len(data)}",
        f"bytes {3 * Q}-{len(data) - 1}/{len(data)}",
    ]


def test_status_query_reports_persisted_range_and_does_not_finalize(
    server: FaithfulGCS, fs: Any
) -> None:
    data = os.urandom(3 * Q)
    location = initiate(fs, "queried.bin")
    session_id = only_session(server)

    headers, body = query(fs, location, len(data))  # nothing persisted yet: no Range at all
    assert "Range" not in headers
    assert body == b""

    chunk(fs, location, data[:Q], 0, len(data))
    for total in (len(data), "*"):
        headers, body = query(fs, location, total)
        assert headers["Range"] == f"bytes=0-{Q - 1}"
        assert body == b""
    assert server.persisted(session_id) == Q
    assert server.session_state(session_id) == "active"
    assert server.object_bytes(BUCKET, "queried.bin") is None
    assert not fs.exists(f"{BUCKET}/queried.bin")

    assert chunk(fs, location, data[Q:], Q, len(data))["size"] == str(len(data))
    assert server.object_bytes(BUCKET, "queried.bin") == data


def test_overlapping_resend_is_discarded(server: FaithfulGCS, fs: Any) -> None:
    data = os.urandom(2 * Q + 500)
    location = initiate(fs, "overlap.bin")
    chunk(fs, location, data[:Q], 0, len(data))

    # Resend from 0 with different bytes in the part already persisted: they must be ignored.
    resend = b"\0" * Q + data[Q : 2 * Q]
    assert chunk(fs, location, resend, 0, len(data)) is None
    assert server.persisted(only_session(server)) == 2 * Q
    assert server.bytes_received == 3 * Q

    chunk(fs, location, data[2 * Q :], 2 * Q, len(data))
    assert server.object_bytes(BUCKET, "overlap.bin") == data


def test_non_final_chunk_must_end_on_a_256_kib_boundary(server: FaithfulGCS, fs: Any) -> None:
    location = initiate(fs, "ragged.bin")
    with pytest.raises(HttpError) as raised:
        chunk(fs, location, b"x" * (Q + 1), 0, 4 * Q)
    assert raised.value.code == 400
    assert server.persisted(only_session(server)) == 0

    # A final chunk may have any size.
    assert chunk(fs, location, b"x" * 1000, 0, 1000)["size"] == "1000"


def test_chunk_starting_past_the_persisted_size_is_rejected(server: FaithfulGCS, fs: Any) -> None:
    location = initiate(fs, "gap.bin")
    chunk(fs, location, b"a" * Q, 0, 4 * Q)
    with pytest.raises(HttpError) as raised:
        chunk(fs, location, b"c" * Q, 2 * Q, 4 * Q)
    assert raised.value.code == 400
    assert server.persisted(only_session(server)) == Q


def test_lost_reply_errors_the_client_but_the_status_query_shows_the_chunk(
    server: FaithfulGCS, fs: Any
) -> None:
    data = os.urandom(2 * Q + 1)
    location = initiate(fs, "lost.bin")
    server.lose_next_reply()

    async def post_without_retries() -> int:
        headers = {"Content-Range": f"bytes 0-{Q - 1}/{len(data)}"}
        async with fs.session.post(location, data=data[:Q], headers=headers) as response:
            status: int = response.status
            return status

    with pytest.raises(aiohttp.ServerDisconnectedError):
        sync(fs.loop, post_without_retries)

    headers, _ = query(fs, location, len(data))
    assert headers["Range"] == f"bytes=0-{Q - 1}"
    assert server.persisted(only_session(server)) == Q

    chunk(fs, location, data[Q:], Q, len(data))
    assert server.object_bytes(BUCKET, "lost.bin") == data


def test_gcsfs_retries_a_lost_reply_by_resending_the_same_chunk(
    server: FaithfulGCS, fs: Any
) -> None:
    """gcsfs's retry_request resends after a ServerDisconnectedError (after a 1-2 s sleep)."""
    data = os.urandom(2 * Q + 1)
    location = initiate(fs, "retried.bin")
    server.lose_next_reply()

    assert chunk(fs, location, data[:Q], 0, len(data)) is None  # no error reaches the caller

    sent = [r for m, _, r in server.requests if m == "POST" and r]
    assert sent == [f"bytes 0-{Q - 1}/{len(data)}"] * 2
    assert server.bytes_received == 2 * Q
    assert server.persisted(only_session(server)) == Q
    chunk(fs, location, data[Q:], Q, len(data))
    assert server.object_bytes(BUCKET, "retried.bin") == data


def test_lost_final_reply_leaves_a_finalized_session_that_answers_the_resource(
    server: FaithfulGCS, fs: Any
) -> None:
    location = initiate(fs, "lost-final.bin")
    server.lose_next_reply()

    async def post_without_retries() -> int:
        headers = {"Content-Range": "bytes 0-9/10"}
        async with fs.session.post(location, data=b"0123456789", headers=headers) as response:
            status: int = response.status
            return status

    with pytest.raises(aiohttp.ServerDisconnectedError):
        sync(fs.loop, post_without_retries)
    assert server.object_bytes(BUCKET, "lost-final.bin") == b"0123456789"

    headers, body = query(fs, location, 10)
    assert "Range" not in headers
    resource = json.loads(body)
    assert resource["size"] == "10"
    assert chunk(fs, location, b"0123456789", 0, 10) == resource  # a resend gets the same


def test_expired_session_answers_410(server: FaithfulGCS, fs: Any) -> None:
    location = initiate(fs, "expired.bin")
    chunk(fs, location, b"x" * Q, 0, 2 * Q)
    server.expire("all")
    assert server.session_state(only_session(server)) == "expired"

    with pytest.raises(HttpError) as raised:
        query(fs, location, 2 * Q)
    assert raised.value.code == 410
    with pytest.raises(HttpError) as raised:
        chunk(fs, location, b"x" * Q, Q, 2 * Q)
    assert raised.value.code == 410
    assert server.object_bytes(BUCKET, "expired.bin") is None


def test_unknown_bucket_is_404(fs: Any) -> None:
    with pytest.raises(FileNotFoundError):
        sync(fs.loop, gcsfs.core.initiate_upload, fs, "no-such-bucket", "k", OCTETS)


def test_delete_cancels_the_session(server: FaithfulGCS, fs: Any) -> None:
    location = initiate(fs, "cancelled.bin")
    chunk(fs, location, b"x" * Q, 0, 2 * Q)

    _, body = sync(fs.loop, fs._call, "DELETE", location)  # 499 is not an error to gcsfs
    assert body == b""
    assert server.session_state(only_session(server)) == "cancelled"
    assert ("DELETE", location.removeprefix(server.endpoint_url), None) in server.requests

    with pytest.raises(FileNotFoundError):
        query(fs, location, 2 * Q)
    with pytest.raises(FileNotFoundError):
        chunk(fs, location, b"x" * Q, Q, 2 * Q)
    assert server.object_bytes(BUCKET, "cancelled.bin") is None


def test_unknown_total_is_finalized_by_a_query_with_the_total(server: FaithfulGCS, fs: Any) -> None:
    """Streaming: chunks with a `*` total, then `bytes */TOTAL` commits, as GCS does."""
    data = os.urandom(2 * Q)
    location = initiate(fs, "streamed.bin")
    for offset in (0, Q):
        headers = {"Content-Range": f"bytes {offset}-{offset + Q - 1}/*"}
        reply, body = sync(
            fs.loop, fs._call, "PUT", location, headers=headers, data=data[offset : offset + Q]
        )
        assert reply["Range"] == f"bytes=0-{offset + Q - 1}"
        assert body == b""
    assert query(fs, location, "*")[0]["Range"] == f"bytes=0-{2 * Q - 1}"
    with pytest.raises(HttpError):  # a total below what is stored
        query(fs, location, Q)
    assert server.object_bytes(BUCKET, "streamed.bin") is None

    _, body = query(fs, location, 2 * Q)
    assert json.loads(body)["size"] == str(2 * Q)
    assert server.object_bytes(BUCKET, "streamed.bin") == data


def test_object_reads_and_delete(server: FaithfulGCS, fs: Any) -> None:
    data = os.urandom(1000)
    chunk(fs, initiate(fs, "a/b c.bin"), data, 0, len(data))
    path = f"{BUCKET}/a/b c.bin"

    assert fs.cat_file(path, start=10, end=20) == data[10:20]
    _, media = sync(fs.loop, fs._call, "GET", "b/{}/o/{}", BUCKET, "a/b c.bin", alt="media")
    assert media == data
    assert fs.info(path)["md5Hash"] == server.object_resource(BUCKET, "a/b c.bin")["md5Hash"]  # type: ignore[index]

    fs.rm(path)
    assert server.object_bytes(BUCKET, "a/b c.bin") is None
    with pytest.raises(FileNotFoundError):
        fs.cat_file(path)


def test_close_is_idempotent_and_frees_the_port() -> None:
    server = FaithfulGCS().start()
    port = server.port
    server.close()
    server.close()
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", port), timeout=1),
    ):
        pass
