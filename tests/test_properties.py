"""Properties that hold for any file name or URL a source or a config can bring."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from skyframe.display import escape, is_utf8, redact
from skyframe.scanner import scan_source
from skyframe.storage import NAME_MAX, temporary_path

#: a file name as the kernel takes it: any bytes but "/" and NUL, at most 255 of them
raw_names = st.binary(min_size=1, max_size=NAME_MAX).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
)
#: a name that can be written remotely (UTF-8, no separator)
text_names = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"), min_size=1
).filter(lambda s: len(s.encode()) <= NAME_MAX and s not in (".", ".."))


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_escaped_text_is_one_inert_line(text: str) -> None:
    shown = escape(text)
    assert not re.search(r"[\x00-\x1f\x7f-\x9f]", shown)
    assert is_utf8(shown)
    assert escape(shown) == shown  # nothing left to escape


@settings(max_examples=60, deadline=None)
@given(st.lists(raw_names, min_size=1, max_size=6, unique=True))
def test_a_scan_takes_exactly_the_utf8_names_and_never_fails(names: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = os.fsencode(folder)
        for name in names:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"x")
        skipped: list[Path] = []
        found = {
            event.relpath
            for event in scan_source(
                "p", Path(folder), on_skip=lambda path, reason: skipped.append(path)
            )
        }
    decoded = {os.fsdecode(name) for name in names}
    assert found == {name for name in decoded if is_utf8(name)}
    assert {p.name for p in skipped} == {name for name in decoded if not is_utf8(name)}


@settings(max_examples=200, deadline=None)
@given(text_names, st.text(max_size=30))
def test_temporary_names_fit_and_belong_to_their_owner(name: str, owner: str) -> None:
    temporary = temporary_path(f"root/dir/{name}", owner)
    parent, _, base = temporary.rpartition("/")
    assert parent == "root/dir"
    assert base.startswith(".")
    assert len(base.encode()) <= NAME_MAX
    assert temporary != temporary_path(f"root/dir/{name}", owner + "-other")


url_part = st.text(st.sampled_from("abcXYZ019-_.~!$&'()*+,;="), min_size=1, max_size=20)


@settings(max_examples=150, deadline=None)
@given(url_part, url_part, st.sampled_from(["http", "https", "sftp", "s3"]))
def test_a_url_password_never_survives_redaction(user: str, password: str, scheme: str) -> None:
    text = f"cannot reach {scheme}://{user}:{password}@host.example:9000/bucket: refused"
    assert redact(text) == f"cannot reach {scheme}://{user}:***@host.example:9000/bucket: refused"
