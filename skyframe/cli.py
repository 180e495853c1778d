"""The ``skyframe`` command. Domain errors become one line here, and nowhere else."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

from skyframe import __version__
from skyframe.config import DEFAULT_CONFIG_NAME
from skyframe.display import SafeLogFilter, escape
from skyframe.errors import ConfigError, SkyframeError
from skyframe.launch import StartupGC
from skyframe.state import STATE_DB_ERRORS

if TYPE_CHECKING:
    from skyframe.pipeline import Pipeline
    from skyframe.storage import Sink

log = logging.getLogger("skyframe")

PREFLIGHT_TIMEOUT = 60.0  #: seconds to wait for the sinks' answers before a run starts
LOG_FILE_WARN_EVERY = 3600.0  #: seconds between two warnings that the log file cannot be written

config_argument = click.argument(
    "config_file",
    metavar="CONFIG",
    default=DEFAULT_CONFIG_NAME,
    type=click.Path(dir_okay=False, path_type=Path),
)
config_option = click.option(
    "-c",
    "--config",
    "config_file",
    metavar="CONFIG",
    default=DEFAULT_CONFIG_NAME,
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The config file.",
)


#: The longest wait an option takes, in seconds (a day): more would overflow the clock's type.
MAX_TIMEOUT = 86_400.0


def _a_number(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if math.isnan(value):  # FloatRange lets nan through: no comparison with it is true
        raise click.BadParameter("expected a number of seconds, not nan")
    return value


class SkyframeGroup(click.Group):
    """Prints SkyframeError as one line (exit 2 for config errors, 1 otherwise), a wrong option
    or argument of a command as one line (exit 2), and a Ctrl-C that no command handles
    (loading the config, checking the sinks) as one line, exit 130."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # a wrong option: one line (click's own takes four)
            if (
                ctx.meta.get("skyframe.traceback")
                or exc.ctx is None
                or isinstance(exc, _HELP_SHOWN)
            ):
                raise
            _usage_line(exc, exc.ctx)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            if ctx.meta.get("skyframe.traceback"):
                raise
            click.echo("skyframe: interrupted", err=True)
            ctx.exit(130)
        except SkyframeError as exc:
            if ctx.meta.get("skyframe.traceback"):
                raise
            lines = exc.lines() if isinstance(exc, ConfigError) else [str(exc)]
            for line in lines:
                click.echo(f"skyframe: error: {line}", err=True)
            ctx.exit(exc.exit_code)
        except STATE_DB_ERRORS as exc:
            if ctx.meta.get("skyframe.traceback"):
                raise
            detail = str(exc) or "database timeout"
            click.echo(f"skyframe: error: the state database is unusable: {detail}", err=True)
            ctx.exit(1)

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        """The group's own options and command name (``skyframe --bogus``): one line too."""
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            if exc.ctx is None or "--traceback" in args or isinstance(exc, _HELP_SHOWN):
                raise
            _usage_line(exc, exc.ctx)
            raise click.exceptions.Exit(exc.exit_code) from None


#: click's "no arguments: here is the help" (a UsageError since click 8.2): shown as it is.
_HELP_SHOWN: tuple[type[Exception], ...] = tuple(
    getattr(click.exceptions, name)
    for name in ("NoArgsIsHelpError",)
    if hasattr(click.exceptions, name)
)


def _usage_line(exc: click.UsageError, ctx: click.Context) -> None:
    path = ctx.command_path
    message = exc.format_message().rstrip(".")
    click.echo(f"skyframe: error: {path}: {message} (see {path} --help)", err=True)


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.levelname = record.levelname.lower()
        return super().format(record)


def _setup_logging(verbose: int, quiet: bool, stderr: Console) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    if quiet:
        level = logging.ERROR
    handler: logging.Handler
    if stderr.is_terminal:
        handler = RichHandler(console=stderr, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_PlainFormatter("skyframe: %(levelname)s: %(message)s"))
    handler.setLevel(level)
    handler.addFilter(SafeLogFilter())  # names escaped, URL passwords, credentials removed
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Pillow's debug lines are a line per EXIF tag of every photo read (geotag): noise that
    # made the reading several times as costly with a debug log, and nothing to diagnose.
    logging.getLogger("PIL").setLevel(logging.INFO)


@click.group(cls=SkyframeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="skyframe")
@click.option("--traceback", is_flag=True, help="Show the full stack trace of errors.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors and the summary.")
@click.pass_context
def cli(ctx: click.Context, traceback: bool, verbose: int, quiet: bool) -> None:
    """Move field data from the folders where it lands to remote storage, reliably."""
    ctx.meta["skyframe.traceback"] = traceback
    # emoji=False: a file named "p:fire:.jpg" is printed as it is called.
    ctx.obj = {"stdout": Console(emoji=False), "stderr": Console(stderr=True, emoji=False)}
    _setup_logging(verbose, quiet, ctx.obj["stderr"])


@contextmanager
def _stop_on_signals(
    stop: Callable[[], None], reload: Callable[[str], None] | None = None
) -> Iterator[None]:
    """The first SIGINT/SIGTERM stops cleanly; a second one exits at once. With ``reload``,
    SIGHUP asks for a reload of the config (where there is a SIGHUP: not on Windows)."""
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if len(received) > 1:
            log.error("second signal: exiting now; unfinished jobs resume at the next start")
            os._exit(130)
        log.warning(
            "%s received: finishing in-flight work, then stopping (again to force)",
            signal.Signals(signum).name,
        )
        stop()

    def hangup(signum: int, frame: FrameType | None) -> None:
        assert reload is not None
        reload("SIGHUP")  # only sets a flag: the reload runs in its own thread

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    sighup = getattr(signal, "SIGHUP", None)
    if reload is not None and sighup is not None:
        previous[sighup] = signal.signal(sighup, hangup)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@cli.command()
@config_argument
@click.option("--once", is_flag=True, help="Scan, deliver everything, and exit.")
@click.option("--workers", type=click.IntRange(1, 64), help="Files processed at once.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Say what a run would do with each file (rules, remote name, delivered or not); "
    "queue, record and send nothing.",
)
@click.option(
    "--watch-config/--no-watch-config",
    default=True,
    show_default=True,
    help="Without --once: reload when CONFIG, rules.py, processes.py or a plugin file changes.",
)
@click.pass_obj
def run(  # noqa: PLR0917 (click passes every option)
    obj: dict[str, Console],
    config_file: Path,
    once: bool,
    workers: int | None,
    dry_run: bool,
    watch_config: bool,
) -> None:
    """Run the pipelines in CONFIG (default ./skyframe.yaml).

    Without --once: watch the sources and deliver new and changed files until SIGINT or
    SIGTERM (exit 0); SIGHUP, `POST /api/reload`, the dashboard's button or (unless
    --no-watch-config) a change of the config's files reloads the config, and an invalid one
    is refused while the running one goes on. With --once: scan every source, deliver what is
    new or changed, print a
    summary and exit 0 when everything accepted was delivered, 1 when a file failed or waits in
    the dead-letter list or the run was stopped with work left. Config errors exit 2.
    With --dry-run: one line per file, what a run would do with it; exit 1 when a rule or
    process fails on a file, else 0.
    """
    from skyframe.console import ProgressReporter, print_summary
    from skyframe.engine import Engine
    from skyframe.pipeline import load_project
    from skyframe.units import format_size

    project = load_project(config_file)
    if dry_run:
        _dry_run(project)
        return
    if workers is not None:
        project.config.workers = workers
    _log_to_file(project.config)
    log.info(
        "skyframe %s (pid %d): %s %s",
        __version__,
        os.getpid(),
        "run --once of" if once else "watching with",
        project.config.file,
    )
    preflight = _Preflight(project.pipelines)
    if not once:
        preflight.gate()  # before "watching": a refused sink ends the daemon before it starts
    engine = Engine(
        project.config, project.pm, project.pipelines, watch_config=watch_config and not once
    )
    engine.on_stuck = _exit_stuck
    stdout, stderr = obj["stdout"], obj["stderr"]
    if once:
        # The sinks' answers are awaited only when the first job would be handed out: the
        # state is opened and the sources scanned meanwhile.
        engine.gate = preflight.gate
    work = engine.run_once if once else engine.run_daemon
    try:
        with _stop_on_signals(engine.stop, None if once else engine.request_reload):
            if not once:
                folders = ", ".join(str(p.source_root) for p in project.pipelines)
                click.echo(f"skyframe {__version__}: watching {folders} (Ctrl-C to stop)", err=True)
                engine.on_api = lambda url: click.echo(f"dashboard and API: {url}/", err=True)
            if stderr.is_terminal:
                sinks = {p.name: len(p.sinks) for p in project.pipelines}
                with ProgressReporter(stderr, sinks) as reporter:
                    project.pm.register(reporter, name="skyframe.console-progress")
                    summary = work()
            else:
                summary = work()
    finally:
        preflight.finish()
        engine.close()
    log.info(
        "skyframe stopped: delivered %d file(s) (%s), %d unchanged, %d failed, %d dead-lettered",
        summary.delivered,
        format_size(summary.delivered_bytes),
        summary.unchanged,
        len(summary.failed),
        summary.dead_letters,
    )
    print_summary(stdout, summary)
    if engine.abandoned:
        log.error(
            "%d job(s) did not stop in time; exiting now, they resume at the next start",
            engine.abandoned,
        )
        if sys.stdout is not None:  # pythonw has none
            sys.stdout.flush()
        os._exit(1)
    if once and not summary.ok:
        sys.exit(1)


def _exit_stuck() -> None:
    """A fatal stop that hangs (the engine said where): end the process; the queue is gone
    with the state directory, so nothing that could resume is lost."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # pythonw has none
            with contextlib.suppress(Exception):
                stream.flush()
    os._exit(1)


def _log_to_file(config: Any) -> None:
    """``log_file``: the log also goes to a file in the state directory that rotates."""
    from logging.handlers import RotatingFileHandler

    class LogFileHandler(RotatingFileHandler):
        """A line that cannot be written (a full disk) is said on stderr in one line, once an
        hour at most, rather than with a traceback for every line."""

        said_at = -math.inf

        def handleError(self, record: logging.LogRecord) -> None:
            now = time.monotonic()
            if now - self.said_at >= LOG_FILE_WARN_EVERY:
                self.said_at = now
                problem = sys.exc_info()[1]
                detail = getattr(problem, "strerror", None) or problem
                if sys.stderr is not None:  # pythonw (a Windows service) has none: the line goes
                    sys.stderr.write(  # unsaid rather than raising in the thread that logged
                        f"skyframe: warning: log_file: cannot write {path}: {detail}\n"
                    )

    settings, path = config.log_file, config.log_path
    if settings is None or path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = LogFileHandler(
            path, maxBytes=settings.max_size, backupCount=settings.count, encoding="utf-8"
        )
    except OSError as exc:
        raise SkyframeError(f"log_file: cannot write {path}: {exc.strerror or exc}") from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.getLevelName(settings.level.upper()))
    handler.addFilter(SafeLogFilter())  # names escaped, URL passwords, credentials removed
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(min(root.level, handler.level))  # the terminal's handler keeps its own level


def _dry_run(project: Any) -> None:
    """``run --dry-run``: a line per file on standard output, the counts on standard error."""
    from skyframe.dryrun import Decision, dry_run

    def line(d: Decision) -> None:
        if d.verdict in ("reject", "error"):
            detail = d.reason
        else:
            detail = f"-> {d.remote}"
            if d.derived:
                detail += " (with " + ", ".join(d.derived) + ")"
        sinks = ", ".join(f"{key}: {state}" for key, state in d.sinks.items())
        click.echo("\t".join(escape(x) for x in (d.verdict, d.pipeline, d.relpath, detail, sinks)))

    result = dry_run(project.pipelines, project.config.state_path, on_decision=line)
    counts = result.counts
    click.echo(
        f"dry run: {counts['send']} to send, {counts['delivered']} delivered already, "
        f"{counts['reject']} rejected, {counts['error']} failing; nothing was changed",
        err=True,
    )
    if counts["error"]:
        raise SystemExit(1)


class _Preflight:
    """The check of every remote sink, started at once (:class:`skyframe.storage.SinkChecks`).

    :meth:`gate` waits until every sink has answered or taken the check's write, then resumes
    the garbage collector (see :func:`main`): a refusal (credentials, host key, bucket) is
    fatal, :meth:`gate` raises it; an unreachable sink is not (files queue until it is back),
    a warning is logged. The rest of a check (the size check and the delete, a round trip
    each) goes on while the first files are sent; :meth:`finish` waits for it, so that no
    check object is left behind, and what fails in it is logged as a warning.
    """

    def __init__(self, pipelines: list[Pipeline]) -> None:
        from skyframe.storage import SinkChecks

        remote = [s for p in pipelines for s in p.sinks if s.remote]
        self.checks = SinkChecks(remote, late=self._warn)

    @staticmethod
    def _warn(sink: Sink, outcome: BaseException) -> None:
        if isinstance(outcome, SkyframeError):
            log.warning("%s; files queue until it answers", outcome)
        else:
            log.warning(
                "%s: write check failed: %s: %s", sink.display, type(outcome).__name__, outcome
            )

    def gate(self) -> None:
        from skyframe.errors import SinkRefusedError

        for sink, outcome in self.checks.ready(PREFLIGHT_TIMEOUT):
            if isinstance(outcome, SinkRefusedError):
                raise outcome
            if isinstance(outcome, BaseException):
                self._warn(sink, outcome)
        StartupGC.settle()

    def finish(self) -> None:
        from skyframe.storage import SWEEP_TIMEOUT

        self.checks.finish(SWEEP_TIMEOUT)


@cli.command()
@config_argument
@click.pass_obj
def validate(obj: dict[str, Console], config_file: Path) -> None:
    """Check CONFIG (names, options, folders, sink URLs) without running it."""
    from skyframe.pipeline import load_project

    project = load_project(config_file)
    out = obj["stdout"]
    out.print(f"{config_file}: OK", highlight=False, markup=False)
    for p in project.pipelines:
        sinks = ", ".join(s.display for s in p.sinks)
        out.print(
            f"  {p.name}: {p.source_root} -> {sinks} "
            f"({len(p.rules)} rules, {len(p.processes)} processes)",
            highlight=False,
            markup=False,
        )


def _prompt(question: str, default: str, check: Callable[[str], str]) -> str:
    """A question on the terminal, asked again while ``check`` refuses the answer."""

    def convert(text: str) -> str:
        try:
            return check(text)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None

    return str(
        click.prompt(question, default=default, show_default=bool(default), value_proc=convert)
    )


@cli.command()
@config_argument
@click.option("--kind", metavar="KIND", help="photos, video, logs or any (default: photos).")
@click.option("--source", metavar="PATH", help="Where the files land (default: incoming).")
@click.option("--sink", metavar="URL", help="A folder or a URL: s3://, gcs://, sftp://...")
@click.option("--name", metavar="NAME", help="The pipeline's name (default: the kind).")
@click.option("--endpoint", metavar="URL", help="S3 or GCS: the server (default: AWS, Google).")
@click.option("--key-var", metavar="VAR", help="S3: the variable of the key id, - for none.")
@click.option("--secret-var", metavar="VAR", help="S3: the variable of the secret key.")
@click.option("--key-file", metavar="PATH", help="SFTP: the private key to log in with.")
@click.option("--password-var", metavar="VAR", help="SFTP: the variable of the password.")
@click.option("--known-hosts", metavar="PATH", help="SFTP: trusted host keys.")
@click.option("--token-var", metavar="VAR", help="GCS: the variable of the JSON key file.")
@click.option("--stubs/--no-stubs", default=None, help="Also write rules.py and processes.py.")
@click.option("--check/--no-check", default=True, help="Check the sink (default: yes).")
@click.option("--strict", is_flag=True, help="A failed sink check is an error, not a warning.")
@click.option(
    "--timeout",
    metavar="SECONDS",
    type=click.FloatRange(min=0.1, max=MAX_TIMEOUT),
    callback=_a_number,
    default=20.0,
    show_default=True,
    help="Seconds to wait for the sink.",
)
@click.option("-y", "--yes", is_flag=True, help="Ask nothing: the flags, else the defaults.")
@click.option("--force", is_flag=True, help="Replace CONFIG, rules.py and processes.py.")
def init(  # noqa: PLR0917 (click passes every option)
    config_file: Path,
    stubs: bool | None,
    check: bool,
    strict: bool,
    timeout: float,
    yes: bool,
    force: bool,
    **answers: str | None,
) -> None:
    """Write a commented CONFIG (default ./skyframe.yaml) for a new pipeline.

    On a terminal it asks for the kind of data, the source folder, the sink and the names of
    the environment variables that hold its secrets, and checks the sink as `skyframe check`
    does; flags answer questions beforehand. Without a terminal (or with --yes) it asks nothing.
    It never replaces a file without --force. Exit 0 when written; 1 when a file exists, the
    check failed with --strict, or a folder or file cannot be written; 2 for a wrong flag.
    """
    from skyframe.scaffold import Interview, Prompter, next_steps, shown, write_project

    interactive = not yes and sys.stdin is not None and sys.stdin.isatty()
    prompter = Prompter(
        say=click.echo,
        warn=lambda line: click.echo(f"skyframe: warning: {line}", err=True),
        ask=_prompt if interactive else None,
        confirm=click.confirm if interactive else None,
    )
    if interactive:
        click.echo(
            f"A pipeline for {config_file}: Enter takes the [default]; Ctrl-C stops, "
            "and nothing is written before the last answer."
        )
    interview = Interview(
        config_file,
        prompter,
        answers,
        stubs=stubs,
        check=check,
        strict=strict,
        timeout=timeout,
        force=force,
    )
    chosen = interview.run()
    written = write_project(chosen, force=force)
    for folder in written.created:
        click.echo(f"created {shown(folder)}{os.sep}")
    click.echo("wrote " + ", ".join(shown(path) for path in written.files))
    click.echo("next:")
    for line in next_steps(chosen, written):
        click.echo(f"  {line}")


@cli.command()
@config_argument
@click.option("--deep", is_flag=True, help="Read every object back and compare its sha256.")
@click.option(
    "--repair", is_flag=True, help="Queue again the files whose copy is missing or different."
)
def verify(config_file: Path, deep: bool, repair: bool) -> None:
    """Check that what the manifest says was delivered is on the sinks.

    Each recorded object must exist with its size and, where the store keeps it (S3, GCS),
    its sha256; --deep reads every object back. Objects nothing accounts for are listed as
    extra. One line per problem; exit 1 when there is any, 0 when all is in place.
    """
    from skyframe.pipeline import load_project
    from skyframe.verify import Finding
    from skyframe.verify import verify as run_verify

    project = load_project(config_file)

    def line(f: Finding) -> None:
        columns = (f.kind, f.pipeline, f.sink, f.relpath, f.remote, f.detail, f.repaired)
        click.echo("\t".join(escape(c) for c in columns).rstrip("\t"))

    result = run_verify(
        project.pipelines, project.config.state_path, deep=deep, repair=repair, on_finding=line
    )
    kinds = Counter(f.kind for f in result.findings)
    counts = ", ".join(
        f"{kinds[k]} {k}" for k in ("missing", "different", "extra", "unreadable") if kinds[k]
    )
    click.echo(
        f"verify: {result.checked} recorded object(s) checked, {result.hashed} by sha256: "
        f"{counts or 'all in place'}",
        err=True,
    )
    if result.findings:
        raise SystemExit(1)


@cli.command()
@config_argument
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1, max=MAX_TIMEOUT),
    callback=_a_number,
    default=60.0,
    show_default=True,
    help="Seconds to wait for each sink.",
)
def check(config_file: Path, timeout: float) -> None:
    """Check that every sink in CONFIG is reachable and writable: connect, write a small hidden
    object, check its size and delete it. One line per sink; exit 1 if any fails."""
    from skyframe.pipeline import load_project
    from skyframe.storage import ProbeResult, check_sinks

    project = load_project(config_file)
    sinks = [s for p in project.pipelines for s in p.sinks]
    pipeline_of = {id(s): p.name for p in project.pipelines for s in p.sinks}
    failed = 0
    for sink, outcome in check_sinks(sinks, timeout, close=True):
        where = f"{pipeline_of[id(sink)]} -> {sink.display}"
        if isinstance(outcome, ProbeResult):
            click.echo(
                f"ok    {where}: connect {outcome.connect * 1000:.0f} ms, "
                f"write+check+delete {outcome.write * 1000:.0f} ms"
            )
        else:
            failed += 1
            message = str(outcome).removeprefix(f"{sink.display}: ")
            if not isinstance(outcome, SkyframeError):
                message = f"{type(outcome).__name__}: {' '.join(message.split())}"
            click.echo(f"FAIL  {where}: {message}")
    if failed:
        sys.exit(1)


@cli.command("test")
@config_argument
@click.option(
    "-t",
    "--tests",
    "test_paths",
    multiple=True,
    metavar="PATH",
    type=click.Path(path_type=Path),
    help="A test file, or a folder of them; repeatable "
    "(default: skyframe.tests.yaml beside skyframe.yaml).",
)
@click.option(
    "-k",
    "--filter",
    "filters",
    multiple=True,
    metavar="TEXT",
    help="Only the cases whose name contains TEXT (any case); repeatable.",
)
def pipeline_tests(
    config_file: Path, test_paths: tuple[Path, ...], filters: tuple[str, ...]
) -> None:
    """Run the pipeline tests written for CONFIG: each puts a file in a temporary source folder
    and checks what the rules and processes make of it; nothing is sent. One line per case,
    what differed under each failure; exit 1 when any fails, 2 for a config or test file error."""
    from skyframe.pipeline import load_project
    from skyframe.pipetest import CaseResult, find_test_files, load_tests, report, run_tests, select

    project = load_project(config_file)
    files = find_test_files(config_file, test_paths)
    cases = [case for file in files for case in load_tests(file, project.pipelines)]
    chosen = select(cases, filters)
    where = ", ".join(escape(str(f)) for f in files)
    if not chosen:
        click.echo(
            f"test: no case of {len(cases)} matches {' or '.join(filters)!r} ({where})", err=True
        )
        sys.exit(1)

    def show(result: CaseResult) -> None:
        for line in report(result):
            click.echo(line)

    results = run_tests(chosen, project.pipelines, on_result=show)
    failed = sum(not r.passed for r in results)
    deselected = f", {len(cases) - len(chosen)} deselected" if len(chosen) < len(cases) else ""
    click.echo(
        f"test: {len(results) - failed} passed, {failed} failed{deselected} ({where})", err=True
    )
    if failed:
        sys.exit(1)


def _duration(ctx: click.Context, param: click.Parameter, value: str) -> float:
    from skyframe.units import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _positive_duration(ctx: click.Context, param: click.Parameter, value: str) -> float:
    seconds = _duration(ctx, param, value)
    if seconds <= 0:
        raise click.BadParameter(f"must be longer than 0, not {value!r}")
    return seconds


@cli.command()
@config_argument
@click.option(
    "--older-than",
    default="24h",
    show_default=True,
    callback=_duration,
    help="Only uploads whose progress stopped at least this long ago.",
)
@click.option("--dry-run", is_flag=True, help="Say what would be cancelled; change nothing.")
def cleanup(config_file: Path, older_than: float, dry_run: bool) -> None:
    """Cancel interrupted uploads left on the sinks of CONFIG: S3 multipart uploads, GCS
    resumable sessions and SFTP temporary files that skyframe started and whose progress
    stopped long ago. One line each; exit 1 if any could not be cancelled."""
    from skyframe.cleanup import cleanup as cancel_stale
    from skyframe.cleanup import span
    from skyframe.journal import UploadJournal
    from skyframe.pipeline import load_project

    project = load_project(config_file)
    folder = project.config.state_path / "uploads"
    if not folder.is_dir():
        click.echo("no uploads journaled yet: nothing to clean up")
        return
    sinks = {s.key: s for p in project.pipelines for s in p.sinks}
    journal = UploadJournal(folder)
    try:
        cleaned = cancel_stale(
            journal, sinks, older_than, dry_run=dry_run, protocols=project.registry.protocols
        )
        left = len(journal.entries())
    finally:
        journal.close()
        for sink in sinks.values():
            sink.close()
    for item in cleaned:
        status = "ok  " if item.ok else "FAIL"
        click.echo(
            f"{status}  {item.key.sink} -> {item.key.remote}: {item.done} (idle {span(item.idle)})"
        )
    if not cleaned:
        click.echo(f"nothing idle for {span(older_than)} ({left} upload(s) journaled)")
    if any(not item.ok for item in cleaned):
        sys.exit(1)


@cli.command()
@config_argument
@click.option("--json", "as_json", is_flag=True, help="Print the raw status document.")
def status(config_file: Path, as_json: bool) -> None:
    """Show what the daemon of CONFIG is doing: queue per pipeline, sinks, files in flight
    with their progress, throughput and the latest errors. Exit 1 when no daemon runs."""
    import json

    from skyframe.client import DaemonClient, status_lines
    from skyframe.config import load_config

    answer = DaemonClient(load_config(config_file)).request("GET", "/api/status")
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    for line in status_lines(answer):
        click.echo(line)


def _check_pipeline(config: Any, config_file: Path, pipeline: str | None) -> None:
    """A usage error (exit 2) when ``--pipeline`` names none of the config's pipelines."""
    names = [p.name for p in config.pipelines]
    if pipeline is not None and pipeline not in names:
        raise click.BadParameter(
            f"no pipeline named {pipeline!r} in {config_file} (there are: {', '.join(names)})",
            param_hint="--pipeline",
        )


def _switch(config_file: Path, pipeline: str | None, paused: bool) -> None:
    from skyframe.client import DaemonClient, NoDaemonError
    from skyframe.config import load_config
    from skyframe.control import Control
    from skyframe.errors import StateError
    from skyframe.state import StateLock

    config = load_config(config_file)
    _check_pipeline(config, config_file, pipeline)
    names = [p.name for p in config.pipelines]
    what = pipeline or "everything"
    verb = "paused" if paused else "resumed"
    try:
        state = DaemonClient(config).request(
            "POST",
            "/api/pause" if paused else "/api/resume",
            ({"pipeline": pipeline} if pipeline else {}),
        )
    except NoDaemonError as exc:
        # Nothing to tell: switch the saved state, which the next start obeys; under the
        # state lock, so that a daemon without API does not overwrite it later.
        lock = StateLock(config.state_path)
        try:
            lock.acquire()
        except StateError as busy:
            raise StateError(
                f"{busy}, but without an API that answers (api.enabled is false, or its "
                f"address was taken): it cannot be {verb} from here"
            ) from None
        try:
            Control(config.state_path, names).set(paused, pipeline)
        finally:
            lock.release()
        click.echo(f"{verb} {what}: {exc}; the next start is {verb}")
        return
    held = [name for name, on in state["pipelines"].items() if on or state["paused"]]
    click.echo(f"{verb} {what}; held now: {', '.join(held) if held else 'nothing'}")


def _utf8(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Text given on the command line that is not UTF-8 names nothing skyframe records (it
    keeps only UTF-8 names), and could not even be printed back."""
    from skyframe.display import is_utf8

    if value is not None and not is_utf8(value):
        shown = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        raise click.BadParameter(f"{shown!r} is not valid UTF-8 text")
    return value


pipeline_option = click.option(
    "-p",
    "--pipeline",
    metavar="NAME",
    callback=_utf8,
    help="Only this pipeline (default: the whole daemon).",
)


@cli.command()
@config_argument
@pipeline_option
def pause(config_file: Path, pipeline: str | None) -> None:
    """Pause uploads of the daemon of CONFIG (or of one pipeline): no new transfer starts and
    running ones halt before their next piece. Kept across restarts. With no daemon running,
    the next start is paused."""
    _switch(config_file, pipeline, paused=True)


@cli.command()
@config_argument
@pipeline_option
def resume(config_file: Path, pipeline: str | None) -> None:
    """Resume what `skyframe pause` held (the whole daemon resumes every pipeline)."""
    _switch(config_file, pipeline, paused=False)


def _since(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    from skyframe.units import parse_since

    if value is None:
        return None
    try:
        return parse_since(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command()
@click.argument("path", required=False, callback=_utf8)
@config_option
@click.option("--failed", is_flag=True, help="Only failed and dead-lettered events.")
@click.option(
    "--since", callback=_since, metavar="WHEN", help="A duration back (2h, 7d) or a date."
)
@pipeline_option
@click.option(
    "-n",
    "--limit",
    type=click.IntRange(1, 1_000_000),
    default=100,
    show_default=True,
    help="The most events shown (the latest).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line.")
def history(  # noqa: PLR0917 (click passes every option)
    path: str | None,
    config_file: Path,
    failed: bool,
    since: float | None,
    pipeline: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List what happened to each file (or to PATH, relative to its source folder), oldest
    first: queued, delivered, failed, moved, paused... Works with or without a daemon."""
    import json

    from skyframe.client import history_line
    from skyframe.config import load_config
    from skyframe.history import HISTORY_FILE, History

    config = load_config(config_file)
    if not (config.state_path / HISTORY_FILE).is_file():
        click.echo(f"no history yet in {config.state_path} (nothing has run)")
        return
    store = History(config.state_path, writer=False)
    try:
        events = store.query(
            failed=failed, since=since, pipeline=pipeline, relpath=path, limit=limit
        )
    finally:
        store.close()
    if not events:  # a pipeline the config no longer has may still have its events
        _check_pipeline(config, config_file, pipeline)
    for event in reversed(events):
        click.echo(json.dumps(event) if as_json else history_line(event))
    if not events:
        click.echo("no events match", err=True)


@cli.command()
@click.argument(
    "config_file",
    metavar="[CONFIG]",
    required=False,
    type=click.Path(dir_okay=False, path_type=Path),
)
@click.pass_obj
def plugins(obj: dict[str, Console], config_file: Path | None) -> None:
    """List every rule and process with its options, summary and origin, and every storage
    protocol with its URL schemes.

    With CONFIG (or ./skyframe.yaml when present), its plugins and project files are included.
    """
    from skyframe.config import load_config
    from skyframe.plugin_manager import get_plugin_manager
    from skyframe.protocols import ANY_FSSPEC
    from skyframe.registry import Registry

    if config_file is None and Path(DEFAULT_CONFIG_NAME).is_file():
        config_file = Path(DEFAULT_CONFIG_NAME)
    if config_file is not None:
        config = load_config(config_file)
        pm = get_plugin_manager(
            [config.resolve_path(p) for p in config.plugins], project_dir=config.base_dir
        )
    else:
        pm = get_plugin_manager()
    registry = Registry.from_plugin_manager(pm)
    out = obj["stdout"]
    steps = [
        (kind, specs[name])
        for kind, specs in (("rule", registry.rules), ("process", registry.processes))
        for name in sorted(specs)
    ]
    if out.is_terminal:
        table = Table()
        for column in ("kind", "name", "options", "description", "from"):
            table.add_column(column, overflow="fold")
        for kind, spec in steps:
            cells = (kind, spec.name, "\n".join(spec.describe_options()), spec.summary, spec.origin)
            table.add_row(*(Text(cell) for cell in cells))
        out.print(table)
    else:
        for kind, spec in steps:
            click.echo(f"{kind} {spec.name}  [{spec.origin}]")
            click.echo(f"    {spec.summary}")
            for option in spec.describe_options():
                click.echo(f"    - {option}")
    protocols: dict[str, list[str]] = {}
    for scheme, protocol in sorted(registry.protocols.by_scheme.items()):
        protocols.setdefault(f"{protocol.name}  [{protocol.origin}]", []).append(scheme)
    for described, schemes in protocols.items():
        listed = ", ".join("any fsspec URL" if s == ANY_FSSPEC else f"{s}://" for s in schemes)
        out.print(f"protocol {described}: {listed}", highlight=False, markup=False)
    for broken in getattr(pm, "broken", []):
        out.print(
            f"broken plugin {broken.name} ({broken.value}): {broken.error}",
            highlight=False,
            markup=False,
        )


@cli.group()
def queue() -> None:
    """Show and repair what is waiting: list, retry, purge."""


def _open_queue(config_file: Path) -> Any:
    from skyframe.config import load_config
    from skyframe.queue import JobQueue

    config = load_config(config_file)
    folder = config.state_path / "queue"
    if not folder.is_dir():
        raise click.ClickException(f"no queue yet in {config.state_path} (nothing has run)")
    # Never recover leases here: a running daemon may hold them.
    return JobQueue(folder, recover=False)


@queue.command("list")
@config_option
@click.option(
    "--state",
    type=click.Choice(["pending", "leased", "waiting", "dead"]),
    help="Only jobs in this state.",
)
@click.pass_obj
def queue_list(obj: dict[str, Console], config_file: Path, state: str | None) -> None:
    """List queued, in-flight, waiting and dead-lettered jobs."""
    import time as _time

    q = _open_queue(config_file)
    try:
        records = q.records(state)
    finally:
        q.close()
    out = obj["stdout"]
    counts: dict[str, int] = {}
    rows = []
    for r in records:
        counts[r.state] = counts.get(r.state, 0) + 1
        when = ""
        if r.not_before is not None:
            when = f"in {max(r.not_before - _time.time(), 0):.0f}s"
        error = r.errors[-1] if r.errors else ""
        rows.append((r.state, r.pipeline, r.relpath, r.kind or "?", str(r.attempts), when, error))
    if out.is_terminal:
        table = Table()
        for column in ("state", "pipeline", "path", "action", "attempts", "next try", "last error"):
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*(Text(escape(cell)) for cell in row))
        out.print(table)
    else:
        for row in rows:  # one line per job, whatever its file's name holds
            click.echo("\t".join(escape(cell) for cell in row))
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "empty"
    click.echo(f"queue: {summary}", err=True)


@queue.command("retry")
@config_option
@click.argument("paths", nargs=-1)
@click.option("--all", "retry_all", is_flag=True, help="Every dead-lettered job.")
@click.option("--pipeline", callback=_utf8, help="Only jobs of this pipeline.")
def queue_retry(
    config_file: Path, paths: tuple[str, ...], retry_all: bool, pipeline: str | None
) -> None:
    """Move dead-lettered jobs (by relative PATH, or --all) back into the queue."""
    if not paths and not retry_all:
        raise click.UsageError("name one or more relative paths, or use --all")
    q = _open_queue(config_file)
    try:
        if retry_all:
            moved = q.requeue_dead(pipeline)
        else:
            moved = 0
            for path in paths:
                found = q.requeue_dead(pipeline, path)
                if not found:
                    click.echo(f"skyframe: no dead-lettered job for {path}", err=True)
                moved += found
    finally:
        q.close()
    if not moved and pipeline is not None:  # one the config no longer has may still have jobs
        from skyframe.config import load_config

        _check_pipeline(load_config(config_file), config_file, pipeline)
    click.echo(f"{moved} job(s) back in the queue")
    if paths and moved < len(paths):
        sys.exit(1)


@queue.command("purge")
@config_option
@click.option("--dead", is_flag=True, required=True, help="Forget every dead-lettered job.")
def queue_purge(config_file: Path, dead: bool) -> None:
    """Forget dead-lettered jobs (their files stay where they are)."""
    q = _open_queue(config_file)
    try:
        removed = q.purge_dead()
    finally:
        q.close()
    click.echo(f"{removed} dead-lettered job(s) forgotten")


#: glibc's mallopt() parameters: the size from which malloc() maps memory of its own, and the
#: free memory at the top of a heap above which it is given back.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: S3 parts (8 MiB by default) and GCS chunks (16 MiB) are above it: their memory goes back to
#: the system as soon as a part is sent, instead of piling up in the heaps of the many upload
#: threads (glibc raises its own threshold to the largest block freed, and then keeps them).
#: SFTP's 4 MiB chunks are below it, and stay in the heap, reused.
MMAP_THRESHOLD = 6 * 1024 * 1024
#: Fixing the mmap threshold also fixes the trim threshold at its 128 KiB start; the heaps would
#: then shrink and grow again around every SFTP packet asyncssh builds (some 250,000 more page
#: faults per gigabyte). 16 MiB keeps them as few as with glibc's own rules.
TRIM_THRESHOLD = 16 * 1024 * 1024
_MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def tune_malloc() -> bool:
    """Fix glibc's mmap and trim thresholds (unless the user set either in the environment);
    True when done.

    glibc otherwise keeps freed upload parts in the threads' heaps, and the peak memory of a
    large upload wanders (figures in CHANGELOG.md). Elsewhere (musl, macOS) nothing changes.
    """
    if any(name in os.environ for name in _MALLOC_VARIABLES):
        return False
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


@cli.command()
@config_argument
@click.option(
    "--interval",
    default="2s",
    show_default=True,
    metavar="DURATION",
    callback=_positive_duration,
    help="How often to ask the daemon.",
)
def tray(config_file: Path, interval: float) -> None:
    """Show the daemon of CONFIG in the desktop's notification area: its state, pause and
    resume, the dashboard (needs the tray extra: pip install 'skyframe[tray]')."""
    from skyframe.config import load_config
    from skyframe.tray import TrayApp

    TrayApp(load_config(config_file), interval).run()


# --- skyframe service ---------------------------------------------------------------------------


@cli.group("service", cls=SkyframeGroup)
def service_group() -> None:
    """Run CONFIG's daemon as a service that starts with the machine: a systemd unit (Linux),
    a launchd job (macOS), a scheduled task (Windows). See docs/service.md."""


def _service_options(command: Callable[..., None]) -> Callable[..., None]:
    command = click.option(
        "--name", metavar="NAME", help="The service's name (default: the config's folder)."
    )(command)
    command = click.option(
        "--system", is_flag=True, help="A system service (started at boot), not the user's."
    )(command)
    return config_argument(command)


def _service_spec(config_file: Path, name: str | None, system: bool) -> Any:
    import getpass

    from skyframe.config import load_config
    from skyframe.service import ENV_FILE, ServiceSpec, service_name
    from skyframe.units import expand_home

    try:
        path = expand_home(config_file).absolute()
    except ValueError as exc:
        raise ConfigError(f"config file {exc}") from None
    # The service reads its secrets from skyframe.env (systemd) or its account's environment:
    # the config is checked with both, so a missing variable shows now, not at the next boot.
    environ = {**_env_file(path.parent / ENV_FILE), **os.environ}
    config = load_config(config_file, environ=environ)
    user = None
    if system and sys.platform.startswith("linux"):
        user = os.environ.get("SUDO_USER") or getpass.getuser()
        user = None if user == "root" else user
    return ServiceSpec(
        name=service_name(config.file, name),
        config=config.file,
        python=Path(sys.executable).absolute(),
        system=system,
        stop_timeout=config.shutdown_grace + 30,
        user=user,
    ), config


def _env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines of an environment file (systemd's EnvironmentFile, simply read)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().removeprefix("export ").partition("=")
        if sep and key and not key.startswith("#"):
            found[key.strip()] = value.strip().strip("'\"")
    return found


@service_group.command("install")
@_service_options
@click.option("--no-start", is_flag=True, help="Register it only: it starts at the next boot.")
@click.option("--print", "show", is_flag=True, help="Print the service's file; install nothing.")
@click.option(
    "--for",
    "platform",
    type=click.Choice(["linux", "macos", "windows"]),
    help="With --print: the file for this platform (default: this machine's).",
)
def service_install(  # noqa: PLR0917 (click passes every option)
    config_file: Path,
    system: bool,
    name: str | None,
    no_start: bool,
    show: bool,
    platform: str | None,
) -> None:
    """Install CONFIG's daemon as a service, and start it."""
    from skyframe.service import current_platform, manager_for

    spec, config = _service_spec(config_file, name, system)
    if platform is not None and not show:
        raise click.UsageError("--for goes with --print: a service installs on this machine only")
    manager = manager_for(platform or current_platform(), state_dir=config.state_path)
    if show:
        click.echo(manager.render(spec).decode("utf-16" if platform == "windows" else "utf-8"))
        return
    for line in manager.install(spec, start=not no_start):
        click.echo(line)


@service_group.command("uninstall")
@_service_options
def service_uninstall(config_file: Path, system: bool, name: str | None) -> None:
    """Stop CONFIG's service and remove it (the config, state and logs stay)."""
    from skyframe.service import current_platform, manager_for

    spec, config = _service_spec(config_file, name, system)
    for line in manager_for(current_platform(), state_dir=config.state_path).uninstall(spec):
        click.echo(line)


@service_group.command("status")
@_service_options
def service_status(config_file: Path, system: bool, name: str | None) -> None:
    """Whether CONFIG's service is installed and running, as the service manager says."""
    from skyframe.service import current_platform, manager_for

    spec, config = _service_spec(config_file, name, system)
    for line in manager_for(current_platform(), state_dir=config.state_path).status(spec):
        click.echo(line)


from skyframe.hub.cli import hub_group  # noqa: E402 (the hub's commands, in its package)

cli.add_command(hub_group)


def main() -> None:
    """Run the command line (the console script is :func:`skyframe.launch.main`, which loads
    this module). The cyclic garbage collector is paused meanwhile: see
    :class:`~skyframe.launch.StartupGC`."""
    tune_malloc()
    StartupGC.pause()
    try:
        cli(prog_name="skyframe")
    finally:
        StartupGC.settle()
