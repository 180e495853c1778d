"""Stock processes: checksum, rename, sidecar."""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from skyframe.errors import ProcessError
from skyframe.events import Job
from skyframe.markers import process
from skyframe.storage import CHUNK_SIZE, safe_relative_path
from skyframe.units import Label

HashName = Literal["sha256", "sha1", "md5", "blake2b", "sha512"]


def file_digest(job: Job, algo: str) -> str:
    """Stream the job's file through a hash and return the hex digest."""
    digest = hashlib.new(algo)
    with job.open() as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


@process
def process_checksum(job: Job, algo: HashName = "sha256") -> None:
    """Record the file's digest in job.meta[algo] (streamed, any size)."""
    job.meta[algo] = file_digest(job, algo)


class _TemplateFields(Mapping[str, Any]):
    """Fields a rename template may use; ``sha256`` is computed only when asked for."""

    def __init__(self, job: Job) -> None:
        rel = PurePosixPath(job.relpath)
        parent = str(rel.parent)
        self._job = job
        self._fields: dict[str, Any] = {
            **job.meta,
            "relpath": job.relpath,
            "name": rel.name,
            "stem": rel.stem,
            "suffix": rel.suffix,
            "ext": rel.suffix.lstrip(".").lower(),
            "parent": "" if parent == "." else parent,
            "parent_name": rel.parent.name,
            "pipeline": job.pipeline,
            "mtime": job.event.mtime,
            "size": job.event.size,
        }

    def __getitem__(self, key: str) -> Any:
        if key not in self._fields and key == "sha256":
            self._fields["sha256"] = self._job.meta.setdefault(
                "sha256", file_digest(self._job, "sha256")
            )
        if key not in self._fields:
            raise KeyError(key)
        return self._fields[key]

    def __iter__(self) -> Any:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)


def template_fields(template: str) -> list[str]:
    """The field names a template uses; ValueError when it is malformed or not a plain name."""
    names = []
    for _literal, field, _spec, _conversion in string.Formatter().parse(template):
        if field is None:
            continue
        if not field.isidentifier():
            raise ValueError(f"template field {{{field}}} must be a plain name such as {{stem}}")
        names.append(field)
    return names


def render_template(template: str, job: Job) -> str:
    """Fill a template such as ``{mtime:%Y/%m/%d}/{stem}-{sha256:.12}{suffix}``."""
    template_fields(template)
    try:
        rendered = template.format_map(_TemplateFields(job))
    except KeyError as exc:
        raise ProcessError(f"template {template!r}: unknown field {exc.args[0]!r}") from None
    except (ValueError, TypeError) as exc:  # a format spec that does not fit the value
        raise ProcessError(f"template {template!r}: {exc}") from None
    # An empty field ({parent} at the source root) must not turn "{parent}/x" into "/x".
    return rendered if template.startswith("/") else rendered.lstrip("/")


def _check_template(template: str) -> str:
    template_fields(template)
    # The names it gives with every field filled: an empty, absolute or ".." one would send
    # every file to the dead letters.
    sample = "".join(
        literal + ("x" if field is not None else "")
        for literal, field, _spec, _conversion in string.Formatter().parse(template)
    )
    try:
        safe_relative_path(sample)
    except ValueError as exc:
        raise ValueError(
            f"template {template!r} gives no name a sink takes ({exc}): write a relative "
            "name such as {parent}/{name}"
        ) from None
    return template


#: A rename template, checked when the config is loaded.
Template = Annotated[str, AfterValidator(_check_template), Label("Template")]


@process
def process_rename(job: Job, template: Template) -> None:
    """Set the remote name from a template: {parent}/{mtime:%Y-%m-%d}/{stem}{suffix} ..."""
    job.remote_name = safe_relative_path(render_template(template, job))


def _check_suffix(suffix: str) -> str:
    if "/" in suffix or "\\" in suffix:
        raise ValueError(
            f"suffix {suffix!r} is added to the file's name: .json, .meta.json (no / or \\)"
        )
    return suffix


#: What a sidecar's remote name adds to its file's: never nothing, which would be the file's,
#: nor a folder (NAME/x.json beside a file NAME: no folder can hold both).
Suffix = Annotated[
    str, Field(min_length=1), AfterValidator(_check_suffix), Label("a suffix such as .json")
]


@process
def process_sidecar(job: Job, suffix: Suffix = ".json", fields: list[str] | None = None) -> None:
    """Deliver a JSON file of the job's metadata beside the file (remote name + suffix)."""
    meta = {k: v for k, v in job.meta.items() if fields is None or k in fields}
    document = {
        "source": job.relpath,
        "pipeline": job.pipeline,
        "size": job.event.size,
        "mtime": job.event.mtime.isoformat(),
        "meta": meta,
    }
    data = json.dumps(document, indent=2, sort_keys=True, default=str).encode()
    job.add_file(suffix, data, beside=True)
