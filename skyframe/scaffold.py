"""``skyframe init``: the questions and their checks, and the commented project it writes.

The command line asks through a :class:`Prompter`; the one here asks nothing (every answer is
a flag or its default), so that a script or CI never waits for input. Secrets are never asked
for: only the names of the environment variables that hold them, written as ``${VAR}``.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import ValidationError

from skyframe.config import (
    DEFAULT_CONFIG_NAME,
    SinkConfig,
    interpolate,
    is_local_url,
    load_config,
    local_sink_folder,
    path_problem,
    url_typo,
)
from skyframe.display import is_utf8
from skyframe.errors import ConfigError, SkyframeError
from skyframe.pipeline import build_pipelines
from skyframe.plugin_manager import get_plugin_manager
from skyframe.protocols import Protocols, scheme_of
from skyframe.registry import Registry
from skyframe.storage import ProbeResult, check_sinks, open_sink, redact_url
from skyframe.units import expand_home, local_url_path

KINDS: Final = ("photos", "video", "logs", "any")
STATE_DIR: Final = ".skyframe"
STUB_FILES: Final = ("rules.py", "processes.py")
CHECK_TIMEOUT: Final = 20.0  #: seconds the sink check may take
#: What stands in for a variable that is not set while the written config is checked.
_PLACEHOLDER = "skyframe-init-placeholder"
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: An AWS access key id typed where its variable's name was asked.
_ACCESS_KEY_ID = re.compile(r"(AKIA|ASIA)[A-Z0-9]{12,}")
_PIPELINE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
#: A string YAML reads back as the same string without quotes (no number, bool or null).
_PLAIN = re.compile(r"[A-Za-z_~./][A-Za-z0-9_~./@:+=-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NOT_PLAIN = frozenset({"y", "n", "yes", "no", "true", "false", "on", "off", "null"})
_COMMENT_COLUMN = 38
_WIDTH = 100  #: the longest line with its comment beside it

#: The kinds of data and their steps: (YAML of the step, comment).
Step = tuple[str, str]
PHOTOS = "jpg, jpeg, dng, tif, tiff, png, heic, raw, arw, cr2, nef, mrk"
VIDEOS = "mp4, mov, mkv, avi, insv, srt"
LOGS = "srt, tlog, ulg, bin, log, txt, csv, kml, gpx, mrk"


@dataclass(frozen=True)
class Preset:
    """What a kind of data gets: its rules, processes and groups."""

    summary: str
    settle: str
    rules: tuple[Step, ...]
    processes: tuple[Step, ...]
    groups: tuple[Step, ...] = ()


PRESETS: Final[Mapping[str, Preset]] = {
    "photos": Preset(
        "drone photos",
        "2s",
        (
            (f"type: {{extensions: [{PHOTOS}]}}", "photos, and DJI RTK .MRK event files"),
            ("size: {min: 1B}", "no empty files (a card pulled mid-write)"),
        ),
        (
            ("checksum: {algo: sha256}", "job.meta['sha256'], in the sidecar and the history"),
            ("geotag", "the photo's position and capture time, from its EXIF/XMP"),
            ("thumbnail: {max_px: 512}", "NAME.thumb.jpg, a preview beside each photo"),
            ("sidecar: {suffix: .json}", "the metadata above as JSON beside each file (last)"),
        ),
        (
            (
                "flight: {by: folder, quiet: 10m}",
                "a folder is a flight: once quiet 10 minutes, its report (GeoJSON, "
                "OpenDroneMap geo.txt, sha256 manifest) is delivered with it",
            ),
        ),
    ),
    "video": Preset(
        "drone video",
        "10s",
        (
            (
                f"type: {{extensions: [{VIDEOS}]}}",
                "videos and DJI .SRT telemetry (add lrf for DJI's low-resolution copies)",
            ),
            ("size: {min: 1B, max: 256GB}", "larger files are held back (raise max if needed)"),
        ),
        (("geotag", "a DJI .SRT becomes a GeoJSON track beside it"),),
    ),
    "logs": Preset(
        "flight logs",
        "2s",
        (
            (f"type: {{extensions: [{LOGS}]}}", "DJI, MAVLink, PX4, ArduPilot logs and tracks"),
            ("size: {min: 1B, max: 2GB}", ""),
        ),
        (
            ("checksum: {algo: sha256}", "job.meta['sha256'], in the history"),
            ("geotag", "a DJI .SRT becomes a GeoJSON track; an .MRK is read"),
            ('rename: {template: "{mtime:%Y-%m-%d}/{relpath}"}', "by the day each log was written"),
        ),
    ),
    "any": Preset(
        "any files",
        "2s",
        (("size: {min: 1B}", "every file but empty ones"),),
        (("checksum: {algo: sha256}", "job.meta['sha256'], in the history"),),
    ),
}
STUB_RULE: Final[Step] = (
    "not_hidden",
    "from rules.py beside this file: edit it, or drop this line",
)
STUB_PROCESS: Final[Step] = ("tag_flight", "from processes.py beside this file")


class InitError(SkyframeError):
    """``init`` cannot go on: a file it would replace exists, or a check failed (--strict)."""


Ask = Callable[[str, str, Callable[[str], str]], str]


class Prompter:
    """Asks the questions: through ``ask`` and ``confirm`` on a terminal; without them, each
    answer is the default (a flag's value, or init's own), and nothing waits for input."""

    def __init__(
        self,
        say: Callable[[str], None],
        warn: Callable[[str], None],
        ask: Ask | None = None,
        confirm: Callable[[str, bool], bool] | None = None,
    ) -> None:
        self.say = say  #: a line of information
        self.warn = warn  #: a line about a problem
        self._ask = ask
        self._confirm = confirm

    @property
    def interactive(self) -> bool:
        """True when someone answers."""
        return self._ask is not None

    def ask(self, question: str, default: str, check: Callable[[str], str]) -> str:
        """The answer as ``check`` returns it; ``check`` raises ValueError for a wrong one (a
        terminal asks again)."""
        return check(default) if self._ask is None else self._ask(question, default, check)

    def confirm(self, question: str, default: bool) -> bool:
        """A yes or no."""
        return default if self._confirm is None else self._confirm(question, default)


@dataclass
class Sink:
    """The sink as it will be written: URL, name, and options with their comments."""

    url: str
    options: dict[str, tuple[str, str]] = field(default_factory=dict)  #: key: (value, comment)
    comments: list[str] = field(default_factory=list)  #: lines above ``options``
    variables: list[str] = field(default_factory=list)  #: environment variables it reads

    @property
    def values(self) -> dict[str, str]:
        """The options as the config holds them (``${VAR}`` not expanded)."""
        return {key: value for key, (value, _) in self.options.items()}


@dataclass
class Answers:
    """Everything ``init`` writes."""

    config_file: Path
    kind: str
    source: str
    sink: Sink
    name: str
    stubs: bool

    @property
    def folder(self) -> Path:
        """The config's folder: relative paths in it start there."""
        return self.config_file.absolute().parent


# --- checks of single answers (ValueError with a one-line reason) ------------------------------


def parse_kind(text: str) -> str:
    """photos, video, logs or any (singular, plural and any case accepted)."""
    word = text.strip().lower()
    aliases = {"photo": "photos", "images": "photos", "videos": "video", "log": "logs"}
    word = aliases.get(word, word)
    if word not in KINDS:
        raise ValueError(f"unknown kind {text.strip()!r}: choose {', '.join(KINDS)}")
    return word


def parse_variable(text: str) -> str:
    """An environment variable's name; never echoes what was typed (it may be the secret)."""
    name = text.strip()
    if _ACCESS_KEY_ID.fullmatch(name):
        raise ValueError("that looks like an access key id: give the name of its variable")
    if not _VARIABLE.fullmatch(name):
        raise ValueError(
            "not a variable name (letters, digits and _, not starting with a digit): give the "
            "name of the environment variable that holds the secret, not the secret"
        )
    return name


def parse_name(text: str) -> str:
    """A pipeline name."""
    name = text.strip()
    if not _PIPELINE_NAME.fullmatch(name):
        raise ValueError(
            f"invalid pipeline name {name!r}: letters, digits, _, . and -, "
            "starting with a letter or digit"
        )
    return name


def literal(value: str) -> str:
    """A value as the config holds it when its ``$`` is not a ``${VAR}`` reference."""
    return value.replace("$", "$$")


def yaml_scalar(value: str) -> str:
    """A string as YAML reads it back: plain where that is safe, else double-quoted."""
    if _PLAIN.fullmatch(value) and value.lower() not in _NOT_PLAIN:
        return value
    return json.dumps(value, ensure_ascii=False)


def _home(path: str) -> str:
    """The path with the home folder written as ~ (the config may move to another account)."""
    home = str(Path.home())
    if path == home or path.startswith(home + os.sep):
        return "~" + path[len(home) :]
    return path


# --- the interview ------------------------------------------------------------------------------


class Interview:
    """The questions, in order, with their defaults and checks.

    ``given`` holds the answers given as flags (by key: ``source``, ``sink``, ``kind``,
    ``name``, ``endpoint``, ``key_var``, ``secret_var``, ``key_file``, ``password_var``,
    ``known_hosts``, ``token_var``): their questions are not asked. A wrong one is an error
    without a terminal, and asked again with one.
    """

    def __init__(
        self,
        config_file: Path,
        prompter: Prompter,
        given: Mapping[str, str | None],
        *,
        stubs: bool | None = None,
        check: bool = True,
        strict: bool = False,
        timeout: float = CHECK_TIMEOUT,
        force: bool = False,
    ) -> None:
        self.config_file = config_file
        self.folder = config_file.absolute().parent
        self.prompter = prompter
        self.given = {k: v for k, v in given.items() if v is not None}
        self.stubs = stubs
        self.check = check
        self.strict = strict
        self.timeout = timeout
        self.force = force
        self.environ: Mapping[str, str] = os.environ  #: what the sink check runs with
        self.previous: dict[str, str] = {}  #: answers so far: the defaults when asked again
        self._protocols: Protocols | None = None

    @property
    def protocols(self) -> Protocols:
        """The protocols of the built-in and installed plugins."""
        if self._protocols is None:
            self._protocols = Protocols.from_plugin_manager(get_plugin_manager())
        return self._protocols

    def run(self) -> Answers:
        """Ask everything; raises ConfigError (a wrong flag) or InitError."""
        refuse_overwrite(
            [self.config_file, *(self._stub_paths() if self.stubs else [])], self.force
        )
        kind = self.answer("kind", f"Kind of data ({', '.join(KINDS)})", "photos", parse_kind)
        source = self.answer(
            "source",
            f"Folder where the files land{self._relative_to()} (created if missing)",
            "incoming",
            self.parse_source,
        )
        sink = self.ask_sink(source)
        name = self.answer("name", "Pipeline name", kind if kind != "any" else "field", parse_name)
        stubs = self.stubs
        if stubs is None:
            stubs = self.prompter.confirm(
                "Write rules.py and processes.py, stubs for rules and processes of your own?",
                False,
            )
            if stubs and not self.force and any(p.exists() for p in self._stub_paths()):
                self.prompter.warn(
                    "rules.py or processes.py exists already: kept as it is (--force replaces it)"
                )
                stubs = False
        return Answers(self.config_file, kind, source, sink, name, stubs)

    def answer(self, key: str, question: str, default: str, check: Callable[[str], str]) -> str:
        """A flag's value, else the answer to ``question`` (checked)."""
        flag = "--" + key.replace("_", "-")

        def checked(text: str) -> str:
            if _CONTROL.search(text):  # a line break would end a comment, or start a key
                raise ValueError("no control characters (line breaks, tabs...), please")
            if not is_utf8(text):  # bytes that are not UTF-8
                raise ValueError("not valid UTF-8 text: the config is written in UTF-8")
            return check(text)

        given = self.given.pop(key, None)
        if given is not None:
            try:
                value = checked(given)
            except ValueError as exc:
                if not self.prompter.interactive:
                    raise ConfigError(str(exc), key=flag) from None
                self.prompter.warn(f"{flag}: {exc}")
            else:
                self.previous[key] = value
                return value
        try:
            value = self.prompter.ask(question, self.previous.get(key, default), checked)
        except ValueError as exc:  # without a terminal: the default does not do
            raise ConfigError(str(exc), key=flag) from None
        self.previous[key] = value
        return value

    def _relative_to(self) -> str:
        if self.folder == Path.cwd():
            return ""
        return f", relative to {_home(str(self.folder))}"

    def _stub_paths(self) -> list[Path]:
        return [self.folder / name for name in STUB_FILES]

    # -- the source and the sink

    def parse_source(self, text: str) -> str:
        """A folder (it need not exist yet) that does not hold the config's folder."""
        value = text.strip().rstrip("/\\") or text.strip()
        if not value:
            raise ValueError("give a folder")
        problem = path_problem(self.folder / expand_home(value))
        if problem:
            raise ValueError(problem)
        path = (self.folder / expand_home(value)).resolve()
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path} is a file, not a folder")
        if self.folder.resolve().is_relative_to(path):
            raise ValueError(
                f"{path} holds the config's folder: skyframe's state ({STATE_DIR}) and the "
                "config itself would be delivered; choose a folder beside it (incoming)"
            )
        return value

    def parse_sink(self, text: str, source: str) -> str:
        """A sink URL or local folder whose protocol is known, with no password in it."""
        url = text.strip()
        if not url:
            raise ValueError("give a folder or a URL")
        typo = url_typo(url)
        if typo:
            raise ValueError(typo)
        self.protocols.for_url(url)  # ValueError naming what to install
        scheme = scheme_of(url)
        parts = urlsplit(url)
        if parts.password:
            raise ValueError(
                "no password in the URL: it goes in an environment variable (asked next)"
            )
        if scheme in ("s3", "s3a", "gcs", "gs") and (not parts.netloc or "@" in parts.netloc):
            raise ValueError(f"expected {scheme}://bucket/prefix (credentials are asked next)")
        if scheme in ("sftp", "ssh"):
            if not parts.hostname:
                raise ValueError(f"expected {scheme}://user@host:port/path")
            try:
                _ = parts.port
            except ValueError:
                raise ValueError(f"the port of {url} is not a number") from None
        if is_local_url(url):
            problem = path_problem(self.folder / expand_home(local_url_path(url)))
            if problem:
                raise ValueError(problem)
        folder = local_sink_folder(url, self.folder)
        if folder is not None:
            self._check_local_sink(folder, (self.folder / expand_home(source)).resolve())
        return url

    def _check_local_sink(self, folder: Path, source: Path) -> None:
        base = self.folder.resolve()
        if base.is_relative_to(folder):
            raise ValueError(
                f"{folder} holds the config's folder: a delivered file could replace "
                f"{self.config_file.name}, rules.py or processes.py; choose a folder inside "
                "it (outbox) or elsewhere"
            )
        if folder.is_relative_to(source) or source.is_relative_to(folder):
            raise ValueError(
                f"{folder} and the source folder {source} overlap: delivered files "
                "would be picked up again"
            )
        state = base / STATE_DIR
        if folder.is_relative_to(state) or state.is_relative_to(folder):
            raise ValueError(f"{folder} and skyframe's state folder {state} overlap")

    def ask_sink(self, source: str) -> Sink:
        """The sink URL, its credentials and options, checked; asked again in a terminal
        while it does not do."""
        while True:
            url = self.answer(
                "sink",
                "Deliver to: a folder, s3://bucket/prefix, gcs://bucket/prefix or "
                "sftp://user@host:port/path",
                "outbox",
                lambda text: self.parse_sink(text, source),
            )
            sink = self.credentials(url)
            problem = self.open_problem(sink)
            if problem is not None:
                if not self.prompter.interactive:
                    raise ConfigError(problem, key="--sink")
                self.prompter.warn(problem)
                continue
            if not self.check:
                return sink
            ok, line = check_sink(sink, self.folder, self.protocols, self.timeout, self.environ)
            if ok:
                self.prompter.say(line)
                return sink
            if not self.prompter.interactive:
                if self.strict:
                    raise InitError(line)
                self.prompter.warn(f"{line}; writing the config anyway (--strict refuses)")
                return sink
            self.prompter.warn(line)
            if self.prompter.confirm(f"Keep {redact_url(url)} anyway?", False):
                return sink

    def open_problem(self, sink: Sink) -> str | None:
        """Why the sink's URL and options would not load (None when they do); unset
        variables stand for placeholders here."""
        environ = {**placeholders(sink.variables, self.environ), **self.environ}
        try:
            options = {k: interpolate(v, environ) for k, v in sink.values.items()}
            open_sink(SinkConfig(url=sink.url, options=options), self.folder, None, self.protocols)
        except ValidationError as exc:
            errors = exc.errors()
            where = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
            return f"{where + ': ' if where else ''}{errors[0]['msg'] if errors else exc}"
        except (ValueError, ImportError) as exc:
            return " ".join(str(exc).split())
        return None

    # -- credentials, by protocol

    def credentials(self, url: str) -> Sink:
        """Ask what the sink's protocol needs; secrets as ``${VAR}`` only."""
        scheme = scheme_of(url)
        if scheme in ("s3", "s3a"):
            return self._s3(url)
        if scheme in ("gcs", "gs"):
            return self._gcs(url)
        if scheme in ("sftp", "ssh"):
            return self._sftp(url)
        sink = Sink(url)
        if local_sink_folder(url, self.folder) is None:
            sink.comments.append(
                "options of this protocol's fsspec backend; use ${VAR} for secrets"
            )
        return sink

    def _endpoint(self, what: str) -> str:
        def parse(text: str) -> str:
            value = text.strip()
            if value and not urlsplit(value).scheme.startswith("http"):
                raise ValueError(f"expected http(s)://host:port, or nothing for {what}")
            return value

        return self.answer("endpoint", f"Server endpoint (empty for {what})", "", parse)

    def _variable(self, key: str, question: str, default: str, *, optional: bool = False) -> str:
        def parse(text: str) -> str:
            if optional and text.strip() == "-":
                return "-"
            return parse_variable(text)

        hint = " (- for none)" if optional else ""
        return self.answer(
            key, f"{question}: name of the environment variable{hint}", default, parse
        )

    def _s3(self, url: str) -> Sink:
        sink = Sink(url)
        endpoint = self._endpoint("AWS")
        if endpoint:
            sink.options["endpoint_url"] = (
                literal(endpoint),
                "an S3-compatible server (MinIO, SeaweedFS...); leave it out for AWS",
            )
        key = self._variable("key_var", "S3 access key id", "SKYFRAME_S3_KEY", optional=True)
        if key == "-":
            sink.comments.append(
                "credentials: AWS's own chain (AWS_ACCESS_KEY_ID..., ~/.aws, instance role)"
            )
            return sink
        secret = self._variable("secret_var", "S3 secret access key", "SKYFRAME_S3_SECRET")
        sink.options["key"] = (f"${{{key}}}", "access key id")
        sink.options["secret"] = (f"${{{secret}}}", "secret key")
        sink.variables += [key, secret]
        sink.comments.append("secrets come from the environment, never from this file")
        return sink

    def _gcs(self, url: str) -> Sink:
        sink = Sink(url)
        token = self._variable(
            "token_var", "GCS service-account JSON file", "SKYFRAME_GCS_TOKEN", optional=True
        )
        if token != "-":
            sink.options["token"] = (
                f"${{{token}:-google_default}}",
                f"the JSON file {token} names; unset: gcloud's default credentials",
            )
        else:
            sink.comments.append("credentials: gcloud's default (GOOGLE_APPLICATION_CREDENTIALS)")
        endpoint = self._endpoint("Google")
        if endpoint:
            sink.options["endpoint_url"] = (
                literal(endpoint),
                "an emulator or private endpoint",
            )
        return sink

    def _sftp(self, url: str) -> Sink:
        parts = urlsplit(url)
        if not parts.username:
            user = self.answer("user", "SFTP user name", getpass.getuser(), _user)
            netloc = f"{quote(user, safe='')}@{parts.netloc}"
            url = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
            parts = urlsplit(url)
        sink = Sink(url)
        port = parts.port or 22
        if "password_var" in self.given:
            method = "password"
        elif "key_file" in self.given:
            method = "key"
        else:
            method = self.answer("login", "Log in with a key or a password", "key", _login)
        if method == "password":
            password = self._variable("password_var", "SFTP password", "SKYFRAME_SFTP_PASSWORD")
            sink.options["password"] = (
                f"${{{password}}}",
                "from the environment, never in this file",
            )
            sink.variables.append(password)
        else:
            key_file = self.answer(
                "key_file",
                "Private key file (empty: your ~/.ssh keys and the ssh agent)",
                "",
                self._existing_file("key file", optional=True),
            )
            if key_file:
                sink.options["key_file"] = (literal(_home(key_file)), "the key to log in with")
        known_hosts = self.answer(
            "known_hosts",
            "Known hosts file (the server's host key is checked against it)",
            "~/.ssh/known_hosts",
            self._existing_file(
                "known_hosts",
                hint=f"add the server's key first: ssh-keyscan -p {port} {parts.hostname} "
                ">> {} (and compare its fingerprint with the server's)",
            ),
        )
        sink.options["known_hosts"] = (
            literal(_home(known_hosts)),
            "host keys are verified: add a new server's with ssh-keyscan",
        )
        return sink

    def _existing_file(
        self, what: str, *, optional: bool = False, hint: str = ""
    ) -> Callable[[str], str]:
        def parse(text: str) -> str:
            value = text.strip()
            if not value and optional:
                return ""
            path = (self.folder / expand_home(value)).resolve()
            if not path.is_file():
                fix = f"; {hint.format(value)}" if hint else ""
                raise ValueError(f"{what}: {path} does not exist{fix}")
            return value

        return parse


def _user(text: str) -> str:
    user = text.strip()
    if not user or any(c in user for c in "@/: "):
        raise ValueError("give the user name to log in as")
    return user


def _login(text: str) -> str:
    word = text.strip().lower()
    if word not in ("key", "password"):
        raise ValueError("answer key or password")
    return word


def placeholders(names: list[str], environ: Mapping[str, str]) -> dict[str, str]:
    """A stand-in value for each variable not set in ``environ``."""
    return {name: _PLACEHOLDER for name in names if not environ.get(name)}


# --- the sink check -----------------------------------------------------------------------------


def check_sink(
    sink: Sink,
    folder: Path,
    protocols: Protocols,
    timeout: float,
    environ: Mapping[str, str],
) -> tuple[bool, str]:
    """(True, what was checked) or (False, what is wrong): a local folder must be creatable;
    a remote sink gets ``skyframe check``'s probe, with the variables of ``environ``."""
    shown = redact_url(sink.url)
    local = local_sink_folder(sink.url, folder)
    if local is not None:
        existing = local
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            return False, f"check of {shown}: {existing} is not a folder"
        if not os.access(existing, os.W_OK | os.X_OK):
            return False, f"check of {shown}: {existing} is not writable"
        return True, f"ok    {shown}: a folder skyframe can write into"
    unset = [name for name in sink.variables if not environ.get(name)]
    if unset:
        return False, (
            f"{shown} not checked: {' and '.join(unset)} "
            f"{'is' if len(unset) == 1 else 'are'} not set here (run skyframe check once set)"
        )
    try:
        options = {k: interpolate(v, environ) for k, v in sink.values.items()}
        opened = open_sink(SinkConfig(url=sink.url, options=options), folder, None, protocols)
    except (ValueError, ImportError, ValidationError) as exc:
        return False, f"check of {shown}: {' '.join(str(exc).split())}"
    [(_, outcome)] = check_sinks([opened], timeout, close=True)
    if isinstance(outcome, ProbeResult):
        return True, (
            f"ok    {shown}: connect {outcome.connect * 1000:.0f} ms, "
            f"write+check+delete {outcome.write * 1000:.0f} ms"
        )
    message = str(outcome).removeprefix(f"{opened.display}: ")
    if not isinstance(outcome, SkyframeError):
        message = f"{type(outcome).__name__}: {' '.join(message.split())}"
    return False, f"check of {shown} failed: {message}"


# --- what is written ----------------------------------------------------------------------------


def _line(indent: int, text: str, comment: str = "") -> str:
    """A YAML line with its comment beside it, or above it when that would be too long."""
    line = " " * indent + text
    if not comment:
        return line
    if len(line) < _COMMENT_COLUMN and _COMMENT_COLUMN + len(comment) + 2 <= _WIDTH:
        return f"{line.ljust(_COMMENT_COLUMN - 1)} # {comment}"
    if len(line) + len(comment) + 4 <= _WIDTH:
        return f"{line}  # {comment}"
    above = textwrap.wrap(comment, _WIDTH - indent - 2)
    return "\n".join([*(f"{' ' * indent}# {part}" for part in above), line])


def _sink_name(url: str, folder: Path) -> str:
    local = local_sink_folder(url, folder)
    if local is not None:
        return local.name or "outbox"
    parts = urlsplit(url)
    return parts.hostname or parts.netloc or scheme_of(url)


def render_config(answers: Answers) -> str:
    """The commented skyframe.yaml."""
    preset = PRESETS[answers.kind]
    sink = answers.sink
    shown = redact_url(sink.url)
    lines = [
        "# skyframe config written by `skyframe init`:",
        f"# {preset.summary} from {answers.source}/ to {shown}.",
        "# Check it with `skyframe validate`, the sink with `skyframe check`, then deliver with",
        "# `skyframe run --once` (what is there) or `skyframe run` (keeps watching).",
        "# Every key is described in skyframe's docs/config.md, each rule and process in",
        "# docs/builtins.md; `skyframe plugins` lists them with their options.",
        _line(0, f"state_dir: {STATE_DIR}", "queue, manifest, journals; relative to this file"),
        "pipelines:",
        _line(2, f"- name: {yaml_scalar(answers.name)}", "deliveries are recorded under it"),
        _line(
            4,
            f"source: {{path: {yaml_scalar(literal(answers.source))}, recursive: true, "
            f"settle: {preset.settle}}}",
            "settle: how long a file must rest first",
        ),
        _line(4, "rules:", "all must accept; `ignore` (swap, temp files) runs first"),
    ]
    rules = list(preset.rules) + ([STUB_RULE] if answers.stubs else [])
    lines += [_line(6, f"- {text}", comment) for text, comment in rules]
    processes = list(preset.processes)
    if answers.stubs:
        last = len(processes) - 1 if processes and processes[-1][0].startswith("sidecar") else None
        processes.insert(len(processes) if last is None else last, STUB_PROCESS)
    lines.append(_line(4, "processes:", "run in order on each accepted file"))
    lines += [_line(6, f"- {text}", comment) for text, comment in processes]
    if preset.groups:
        lines.append(_line(4, "groups:", "files that belong together"))
        lines += [_line(6, f"- {text}", comment) for text, comment in preset.groups]
    lines.append(_line(4, "sinks:", "every accepted file goes to every sink"))
    lines.append(
        _line(
            6, f"- url: {yaml_scalar(literal(sink.url))}", "a folder (relative to this file) or URL"
        )
    )
    lines.append(
        _line(
            8,
            f"name: {yaml_scalar(literal(_sink_name(sink.url, answers.folder)))}",
            "deliveries are recorded under it: keep it if the URL changes",
        )
    )
    lines += [_line(8, f"# {comment}") for comment in sink.comments]
    if sink.options:
        lines.append(_line(8, "options:"))
        lines += [
            _line(10, f"{key}: {yaml_scalar(value)}", comment)
            for key, (value, comment) in sink.options.items()
        ]
    elif local_sink_folder(sink.url, answers.folder) is None:
        lines.append(_line(8, "options: {}", "fsspec storage options; values may use ${VAR}"))
    return "\n".join(lines) + "\n"


RULES_STUB: Final = '''\
"""This project's own rules, loaded beside skyframe.yaml (written by `skyframe init`).

A rule is a function named ``rule_<name>`` marked with ``@rule``: its first argument is the
file (a FileEvent), its keyword arguments are the options given in skyframe.yaml, checked
against the type hints before anything runs. It returns True to accept the file, or the reason
to reject it. Use it by its name in a pipeline's ``rules:``; ``skyframe plugins`` lists it.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from skyframe import FileEvent, rule


@rule
def rule_not_hidden(event: FileEvent, allow: list[str] | None = None) -> bool | str:
    """Reject hidden files and files in hidden folders (.thumbnails/, .cache/...)."""
    for part in PurePosixPath(event.relpath).parts:
        if part.startswith(".") and part not in (allow or ()):
            return f"{part} is hidden"
    return True
'''

PROCESSES_STUB: Final = '''\
"""This project's own processes, loaded beside skyframe.yaml (written by `skyframe init`).

A process is a function named ``process_<name>`` marked with ``@process``: its first argument
is the job, its keyword arguments the options given in skyframe.yaml. It may read the file
(``job.open()``), add metadata (``job.meta``), change the remote name (``job.remote_name``) or
add files to deliver with it (``job.add_file``). Use it by its name in ``processes:``.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from skyframe import Job, process


@process
def process_tag_flight(job: Job, field: str = "flight") -> None:
    """Record the file's folder (its flight, on most drones' cards) in the job's metadata."""
    job.meta[field] = PurePosixPath(job.relpath).parent.name or "unsorted"
'''


def refuse_overwrite(paths: list[Path], force: bool) -> None:
    """InitError naming the first of ``paths`` that exists, unless ``force``."""
    if force:
        return
    for path in paths:
        if path.exists():
            raise InitError(f"{path} exists already: --force replaces it")


@dataclass
class Written:
    """What :func:`write_project` did."""

    files: list[Path]
    created: list[Path]  #: folders it made
    variables: list[str]  #: what must be set in the environment before a run


def write_project(answers: Answers, *, force: bool = False) -> Written:
    """Write the config (and the stubs), once the config is known to load as ``skyframe
    validate`` loads it; raises InitError or PluginError, and then leaves nothing behind."""
    folder = answers.folder
    config_file = folder / answers.config_file.name
    stubs = [folder / "rules.py", folder / "processes.py"] if answers.stubs else []
    refuse_overwrite([config_file, *stubs], force)
    created = [p for p in (folder, folder / expand_home(answers.source)) if not p.exists()]
    previous: dict[Path, bytes] = {}
    text = render_config(answers)
    try:
        for path in created:
            path.mkdir(parents=True, exist_ok=True)
        previous.update((path, path.read_bytes()) for path in stubs if path.exists())
        for path, content in zip(stubs, (RULES_STUB, PROCESSES_STUB), strict=False):
            _write(path, content)
        temporary = folder / f".{config_file.name}.{os.getpid()}.init"
        try:
            with temporary.open("w", encoding="utf-8") as out:
                out.write(text)
            try:
                _validate(temporary, answers.sink.variables)
            except ConfigError as exc:  # a bug of init's, or a project file that does not load
                message = str(exc).replace(temporary.name, config_file.name)
                raise InitError(f"nothing written: the config would not load: {message}") from None
            os.replace(temporary, config_file)
        finally:
            temporary.unlink(missing_ok=True)
    except BaseException as exc:
        for path in stubs:  # as they were
            if path in previous:
                path.write_bytes(previous[path])
            else:
                path.unlink(missing_ok=True)
        for path in reversed(created):
            _remove_empty(path)
        if isinstance(exc, OSError):  # a folder that cannot be made, a disk that is full...
            where = f"{exc.filename}: " if exc.filename else ""
            raise InitError(f"nothing written: {where}{exc.strerror or exc}") from None
        raise
    return Written([config_file, *stubs], created, list(answers.sink.variables))


def _write(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.init")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _remove_empty(path: Path) -> None:
    with contextlib.suppress(OSError):  # not empty: something else is in it
        path.rmdir()


def _validate(config_file: Path, variables: list[str]) -> None:
    """What ``skyframe validate`` checks, with placeholders for the unset ``variables``."""
    environ = {**os.environ, **placeholders(variables, os.environ)}
    config = load_config(config_file, environ)
    pm = get_plugin_manager(
        [config.resolve_path(p) for p in config.plugins], project_dir=config.base_dir
    )
    build_pipelines(config, Registry.from_plugin_manager(pm))


def shown(path: Path) -> str:
    """A path for a message: relative to the current folder when inside it."""
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def next_steps(answers: Answers, written: Written) -> list[str]:
    """What to do now, one line each."""
    config = shown(answers.config_file)
    where = "" if config == DEFAULT_CONFIG_NAME else f" {config}"
    lines = []
    if written.variables:
        lines.append(
            f"set {' and '.join(written.variables)} wherever skyframe runs "
            "(the file only names them)"
        )
    lines.append(f"skyframe validate{where}")
    if local_sink_folder(answers.sink.url, answers.folder) is None:
        lines.append(f"skyframe check{where}")
    lines.append(f"skyframe run{where} --once   # or without --once: keep watching")
    return lines
