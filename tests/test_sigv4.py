"""The direct S3 client's SigV4 signer gives, header for header, what botocore's signer gives."""

from __future__ import annotations

import calendar
import hashlib
import time
from urllib.parse import quote

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from skyframe.protocols.s3.sigv4 import SigV4Signer, host_of

BODY = b"survey frame 0042\n" * 100
SHA256 = hashlib.sha256(BODY).hexdigest()


def botocore_headers(
    url: str,
    headers: dict[str, str],
    credentials: Credentials,
    region: str,
    *,
    method: str = "PUT",
    body: bytes = BODY,
) -> dict[str, str]:
    request = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
    S3SigV4Auth(credentials, "s3", region).add_auth(request)
    return {name.lower(): value for name, value in request.headers.items()}


@pytest.mark.parametrize(
    ("endpoint", "key", "metadata", "token", "region"),
    [
        ("http://127.0.0.1:9000", "d00/f000001.bin", {"sha256": SHA256}, None, "us-east-1"),
        ("https://s3.example.org", "flight 7/Ñandú ~1+2=3.jpg", {}, "session/token+=", "eu-west-3"),
        ("http://[::1]:8333", "a/b/c", {"note": "  two   spaces  ", "sha256": SHA256}, None, "r"),
        ("https://store.example.org:443", "x", {"Mixed-Case": "v"}, None, "us-east-1"),
    ],
)
def test_signature_matches_botocore(
    endpoint: str, key: str, metadata: dict[str, str], token: str | None, region: str
) -> None:
    credentials = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    path = f"/bucket/{quote(key, safe='/~')}"
    headers = {f"x-amz-meta-{name}": value for name, value in metadata.items()}
    expected = botocore_headers(endpoint + path, headers, credentials, region)
    when = calendar.timegm(time.strptime(expected["x-amz-date"], "%Y%m%dT%H%M%SZ"))

    signer = SigV4Signer(host_of(endpoint), region)
    ours = signer.sign(
        "PUT",
        path,
        headers,
        SHA256,
        access_key=credentials.access_key,
        secret_key=credentials.secret_key,
        token=token,
        now=when,
    )
    assert ours.pop("host") == (endpoint.split("//")[1].removesuffix(":443"))
    assert ours == expected


@pytest.mark.parametrize("method", ["HEAD", "DELETE"])
def test_requests_without_a_body_match_botocore(method: str) -> None:
    # The sinks' check reads the probe object's size and deletes it with the same signer.
    credentials = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    path = "/bucket/drop/.skyframe-check-12-3456"
    expected = botocore_headers(
        "http://127.0.0.1:9000" + path, {}, credentials, "us-east-1", method=method, body=b""
    )
    when = calendar.timegm(time.strptime(expected["x-amz-date"], "%Y%m%dT%H%M%SZ"))
    ours = SigV4Signer("127.0.0.1:9000", "us-east-1").sign(
        method,
        path,
        {},
        hashlib.sha256(b"").hexdigest(),
        access_key=credentials.access_key,
        secret_key=credentials.secret_key,
        now=when,
    )
    ours.pop("host")
    assert ours == expected


def test_the_signing_key_follows_the_date_and_the_secret() -> None:
    signer = SigV4Signer("127.0.0.1:9000", "us-east-1")
    day = calendar.timegm((2026, 12, 4, 23, 59, 59))

    def authorization(secret: str, when: float) -> str:
        headers = signer.sign(
            "PUT", "/b/k", {}, SHA256, access_key="A", secret_key=secret, now=when
        )
        return headers["authorization"]

    first = authorization("s1", day)
    assert authorization("s1", day) == first
    assert "20261205/us-east-1/s3/aws4_request" in authorization("s1", day + 1)
    assert authorization("s2", day) != first
    assert authorization("s1", day) == first  # back to the first key, derived again


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://127.0.0.1:8333", "127.0.0.1:8333"),
        ("http://Store.Example.org:80/", "store.example.org"),
        ("https://store.example.org:443", "store.example.org"),
        ("https://store.example.org:8443/base", "store.example.org:8443"),
        ("http://[::1]:9000", "[::1]:9000"),
    ],
)
def test_host_header(url: str, host: str) -> None:
    assert host_of(url) == host
