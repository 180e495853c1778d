"""Two files of one pipeline whose rename template gives them one remote name: the second is
refused with both names, never written over the first (skyframe.sharing.RemoteNames)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import WriteConfig, make_file, s3_sink, sftp_sink, skyframe, tree_files

from skyframe.sharing import RemoteNameBusyError, RemoteNames
from skyframe.state import Manifest, ManifestEntry

FLATTEN = """
    state_dir: state
    retry: {max_attempts: 5, initial: 0.05, max: 0.1}
    pipelines:
      - name: field
        source: {path: incoming, settle: 0}
        processes:
          - rename: {template: "{name}"}
        sinks:
          - SINK
    """


def _config(write_config: WriteConfig, sink: dict[str, Any] | None = None) -> Path:
    entry = json.dumps(sink) if sink is not None else "{url: outbox}"
    return write_config(FLATTEN.replace("SINK", entry))


def _run(config: Path) -> tuple[int, str]:
    done = skyframe(config.parent, "run", str(config), "--once")
    return done.returncode, done.stdout + done.stderr


def test_two_files_of_one_name_in_one_run_deliver_one_and_refuse_the_other(
    write_config: WriteConfig,
) -> None:
    config = _config(write_config)
    incoming = config.parent / "incoming"
    make_file(incoming, "flight-1/DJI_0001.JPG", b"first flight")
    make_file(incoming, "flight-2/DJI_0001.JPG", b"second flight")
    code, out = _run(config)
    assert code == 1, out
    assert "1 delivered" in out or "delivered 1" in out, out
    outbox = tree_files(config.parent / "outbox")
    assert list(outbox) == ["DJI_0001.JPG"]
    kept = "flight-1" if outbox["DJI_0001.JPG"] == b"first flight" else "flight-2"
    refused = "flight-2" if kept == "flight-1" else "flight-1"
    assert (
        f"DJI_0001.JPG holds {kept}/DJI_0001.JPG; {refused}/DJI_0001.JPG of pipeline 'field' "
        "is not written over it"
    ) in out, out
    assert "Traceback" not in out


def test_a_name_delivered_on_an_earlier_run_is_not_written_over_by_another_file(
    write_config: WriteConfig,
) -> None:
    config = _config(write_config)
    incoming = config.parent / "incoming"
    make_file(incoming, "monday/DJI_0001.JPG", b"monday")
    assert _run(config)[0] == 0
    make_file(incoming, "tuesday/DJI_0001.JPG", b"tuesday")
    code, out = _run(config)
    assert code == 1, out
    assert "holds monday/DJI_0001.JPG; tuesday/DJI_0001.JPG" in out, out
    assert tree_files(config.parent / "outbox") == {"DJI_0001.JPG": b"monday"}
    # A new version of the file that holds the name still replaces its own copy.
    make_file(incoming, "monday/DJI_0001.JPG", b"monday, edited", mtime=2_000_000_000)
    code, out = _run(config)
    assert "dead-lettered by earlier runs: 1" in out, out  # tuesday's file
    assert tree_files(config.parent / "outbox") == {"DJI_0001.JPG": b"monday, edited"}


@pytest.mark.parametrize("kind", ["s3", "sftp"])
def test_a_batch_of_small_files_refuses_the_second_of_one_name(
    write_config: WriteConfig, request: pytest.FixtureRequest, kind: str
) -> None:
    if kind == "s3":
        server: Any = request.getfixturevalue("s3_server")
        sink = s3_sink(server)
    else:
        server = request.getfixturevalue("sftp_server")
        sink = sftp_sink(server)
    config = _config(write_config, sink)
    incoming = config.parent / "incoming"
    for flight in range(6):  # small new files: they go in batches
        make_file(incoming, f"flight-{flight}/DJI_0001.JPG", f"flight {flight}".encode())
        make_file(incoming, f"flight-{flight}/DJI_{flight + 2:04d}.JPG", b"own name")
    code, out = _run(config)
    assert code == 1, out
    assert "delivered 7 file(s)" in out, out
    refused = [line for line in out.splitlines() if line.startswith("  failed field:flight-")]
    assert len(refused) == 5, out
    assert all("is not written over it" in line for line in refused), out
    assert "Traceback" not in out


def test_the_index_of_remote_names_is_built_for_a_manifest_written_before_it(
    tmp_path: Path,
) -> None:
    manifest = Manifest(tmp_path / "manifest")
    entry = ManifestEntry.now(5, 1, "0" * 64, "2024/DJI_0001.JPG")
    manifest.record_many([("field", "sink", "a/DJI_0001.JPG", entry)])
    _drop_index(manifest)
    assert manifest.holder("field", "sink", "2024/DJI_0001.JPG") is None
    manifest.index_remote_names()
    assert manifest.holder("field", "sink", "2024/DJI_0001.JPG") == "a/DJI_0001.JPG"
    assert [r for _p, _s, r, _e in manifest.entries()] == ["a/DJI_0001.JPG"]
    # The file delivered again under another name: the old name holds nothing of it now.
    moved = ManifestEntry.now(5, 2, "0" * 64, "2025/DJI_0001.JPG")
    manifest.record_many([("field", "sink", "a/DJI_0001.JPG", moved)])
    assert manifest.holder("field", "sink", "2024/DJI_0001.JPG") is None
    assert manifest.holder("field", "sink", "2025/DJI_0001.JPG") == "a/DJI_0001.JPG"
    manifest.forget("field", "sink", "a/DJI_0001.JPG")
    assert manifest.holder("field", "sink", "2025/DJI_0001.JPG") is None
    manifest.close()


def test_the_dry_run_does_not_write_the_index(write_config: WriteConfig) -> None:
    config = _config(write_config)
    make_file(config.parent / "incoming", "a/x.jpg", b"x")
    assert _run(config)[0] == 0
    manifest = Manifest(config.parent / "state" / "manifest")
    _drop_index(manifest)
    manifest.close()
    done = skyframe(config.parent, "run", str(config), "--dry-run")
    assert done.returncode == 0, done.stderr
    manifest = Manifest(config.parent / "state" / "manifest")
    assert manifest.holder("field", manifest.entries()[0][1], "x.jpg") is None
    manifest.close()


def _drop_index(manifest: Manifest) -> None:
    """Make ``manifest`` what an earlier version wrote: the records, no index."""
    cache = manifest._cache
    for key in list(cache.iterkeys()):
        if key.startswith("\x01"):
            del cache[key]


def test_an_old_manifest_s_shared_name_is_indexed_to_the_file_delivered_last(
    tmp_path: Path,
) -> None:
    manifest = Manifest(tmp_path / "manifest")
    first = ManifestEntry(1, 1, "0" * 64, "DJI_0001.JPG", delivered_at=200.0)
    second = ManifestEntry(1, 1, "0" * 64, "DJI_0001.JPG", delivered_at=100.0)
    manifest.record_many(
        [
            ("field", "sink", "flight-1/DJI_0001.JPG", first),
            ("field", "sink", "flight-2/DJI_0001.JPG", second),
        ]
    )
    _drop_index(manifest)  # written before names were kept apart
    manifest.index_remote_names()
    assert manifest.holder("field", "sink", "DJI_0001.JPG") == "flight-1/DJI_0001.JPG"
    manifest.close()


def test_a_name_being_written_is_refused_for_now_and_free_once_the_other_failed(
    tmp_path: Path,
) -> None:
    manifest = Manifest(tmp_path / "manifest")
    names = RemoteNames(manifest)
    sink: Any = SimpleNamespace(key="outbox", display="outbox")
    with (
        pytest.raises(RemoteNameBusyError) as busy,
        names.claim("field", sink, "DJI_0001.JPG", "flight-1/DJI_0001.JPG"),
        names.claim("field", sink, "DJI_0001.JPG", "flight-2/DJI_0001.JPG"),
    ):
        pass
    assert busy.value.retryable
    assert "is being written with flight-1/DJI_0001.JPG" in str(busy.value)
    # flight-1 failed (nothing recorded): the name is free for flight-2.
    with names.claim("field", sink, "DJI_0001.JPG", "flight-2/DJI_0001.JPG"):
        pass
    manifest.close()
