"""Each stock process through the registry, on real files."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from helpers import make_file
from pydantic import ValidationError

from skyframe.errors import ProcessError, UnsafePathError
from skyframe.events import FileEvent, Job
from skyframe.plugin_manager import get_plugin_manager
from skyframe.registry import Registry

REGISTRY = Registry.from_plugin_manager(get_plugin_manager(load_entry_points=False))
MTIME = datetime(2024, 5, 17, 10, 15, 2, tzinfo=UTC).timestamp()


def make_job(
    tmp_path: Path, relpath: str = "flight-03/DJI_0001.JPG", data: bytes = b"pixels"
) -> Job:
    path = make_file(tmp_path / "src", relpath, data, mtime=MTIME)
    st = os.stat(path)
    event = FileEvent("survey", path, relpath, st.st_size, st.st_mtime_ns)
    return Job(event, scratch_dir=tmp_path / "scratch")


def run(name: str, job: Job, **options: Any) -> None:
    spec = REGISTRY.processes[name]
    spec.func(job, **spec.validate_options(options))


@pytest.mark.parametrize("algo", ["sha256", "md5", "sha1", "blake2b"])
def test_checksum(tmp_path: Path, algo: str) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # several read chunks
    job = make_job(tmp_path, data=data)
    run("checksum", job, algo=algo)
    assert job.meta[algo] == hashlib.new(algo, data).hexdigest()


def test_checksum_rejects_unknown_algorithm() -> None:
    with pytest.raises(ValidationError):
        REGISTRY.processes["checksum"].validate_options({"algo": "crc32"})


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{relpath}", "flight-03/DJI_0001.JPG"),
        ("{parent}/{stem}{suffix}", "flight-03/DJI_0001.JPG"),
        ("{mtime:%Y/%m/%d}/{name}", "2024/05/17/DJI_0001.JPG"),
        ("{pipeline}/{parent_name}/{ext}/{stem}", "survey/flight-03/jpg/DJI_0001"),
        ("{sha256:.12}{suffix}", hashlib.sha256(b"pixels").hexdigest()[:12] + ".JPG"),
        ("./a//b/{name}", "a/b/DJI_0001.JPG"),
    ],
)
def test_rename_templates(tmp_path: Path, template: str, expected: str) -> None:
    job = make_job(tmp_path)
    run("rename", job, template=template)
    assert job.remote_name == expected


def test_rename_uses_meta_fields(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    job.meta["camera"] = "M3E"
    run("rename", job, template="{camera}/{name}")
    assert job.remote_name == "M3E/DJI_0001.JPG"


@pytest.mark.parametrize(
    "template", ["../{name}", "/abs/{name}", "{parent}/../../x", "a\x07/{name}", "", "{name}/.."]
)
def test_rename_cannot_escape_sink_root(tmp_path: Path, template: str) -> None:
    # Refused when the config is loaded; and were it not, when the name is made.
    with pytest.raises(ValidationError, match="gives no name a sink takes"):
        REGISTRY.processes["rename"].validate_options({"template": template})
    job = make_job(tmp_path)
    with pytest.raises(UnsafePathError):
        REGISTRY.processes["rename"].func(job, template=template)


def test_rename_refuses_a_name_its_fields_make_unsafe(tmp_path: Path) -> None:
    job = make_job(tmp_path, relpath="flight-03/bell\x07.jpg")  # a name the template passes on
    with pytest.raises(UnsafePathError, match="control characters"):
        run("rename", job, template="{parent}/{name}")


@pytest.mark.parametrize("template", ["{mtime.__class__}", "{name", "{0}/x", "{meta[x]}"])
def test_rename_template_checked_at_config_time(template: str) -> None:
    with pytest.raises(ValidationError):
        REGISTRY.processes["rename"].validate_options({"template": template})


def test_rename_unknown_field_is_not_retried(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    with pytest.raises(ProcessError, match="unknown field 'camera'") as info:
        run("rename", job, template="{camera}/{name}")
    assert info.value.retryable is False
    with pytest.raises(ProcessError, match="Invalid format specifier"):
        run("rename", job, template="{size:%Y}/{name}")


def test_rename_empty_parent_at_source_root(tmp_path: Path) -> None:
    job = make_job(tmp_path, relpath="DJI_0001.JPG")
    run("rename", job, template="{parent}/{mtime:%Y}/{name}")
    assert job.remote_name == "2024/DJI_0001.JPG"


def test_sidecar_is_delivered_beside_the_final_name(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    job.meta["sha256"] = "abc"
    run("sidecar", job)
    run("rename", job, template="{mtime:%Y-%m-%d}/{name}")
    (derived,) = job.derived
    assert derived.resolve(job.remote_name) == "2024-05-17/DJI_0001.JPG.json"
    document = json.loads(derived.path.read_text())
    assert document["source"] == "flight-03/DJI_0001.JPG"
    assert document["meta"] == {"sha256": "abc"}
    assert document["size"] == 6
    assert derived.path.is_relative_to(tmp_path / "scratch")


def test_sidecar_fields_filter(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    job.meta.update(sha256="abc", secret_note="x")
    run("sidecar", job, suffix=".meta.json", fields=["sha256"])
    (derived,) = job.derived
    assert derived.remote_name == ".meta.json"
    assert json.loads(derived.path.read_text())["meta"] == {"sha256": "abc"}


def test_two_files_added_under_one_name_fail_the_file_rather_than_replace(
    tmp_path: Path,
) -> None:
    # [thumbnail, {sidecar: {suffix: .thumb.jpg}}] lost the thumbnail to the sidecar, unsaid.
    job = make_job(tmp_path)
    run("sidecar", job, suffix=".thumb.jpg")
    with pytest.raises(ProcessError, match=r"two processes add a file beside the file as NAME"):
        run("sidecar", job, suffix=".thumb.jpg")
    job.add_file("extra/notes.txt", b"a")
    with pytest.raises(ProcessError, match=r"as extra/notes.txt: the second would replace"):
        job.add_file("extra/notes.txt", b"b")
    job.add_file(".txt", b"c", beside=True)  # another name: fine
    assert [d.remote_name for d in job.derived] == [".thumb.jpg", "extra/notes.txt", ".txt"]
