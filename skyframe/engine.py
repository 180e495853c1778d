"""The composition root: one locked state directory, its pipelines, and what runs them.

The engine opens the state (queue, manifest, journal, history, pause state), wires intake
(:mod:`skyframe.intake`: scans and watch events become jobs), dispatch
(:mod:`skyframe.dispatch`: jobs go to the runner) and delivery (:mod:`skyframe.delivery`),
and around them the notifiers, webhooks, bandwidth limits and the API, which sees the daemon
only through the control methods here (:class:`skyframe.api.DaemonControl`).

``run_once()`` scans every source, waits for recently written files to settle, delivers until
nothing is left, and returns. ``run_daemon()`` starts the watchers first (so nothing written
during the catch-up scan is missed), scans, then keeps delivering until ``stop()``.
"""

from __future__ import annotations

import logging
import os
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

import pluggy

from skyframe.bandwidth import Limiter, Schedule, TokenBucket
from skyframe.config import Config, upload_limit
from skyframe.control import Control
from skyframe.delivery import JobRunner
from skyframe.dispatch import Dispatcher
from skyframe.display import RepeatedLog
from skyframe.errors import ConfigError, PluginError, SkyframeError, StateError
from skyframe.events import LifecycleEvent, LifecycleKind
from skyframe.executors import RESULTS_KEPT, DaskExecutor, forget_results
from skyframe.groups import CHECK_INTERVAL, Groups, GroupStore
from skyframe.history import History
from skyframe.intake import Intake, Source
from skyframe.journal import UploadJournal
from skyframe.notifiers import Notifiers
from skyframe.pipeline import Pipeline, PipelineSet, load_project
from skyframe.queue import JobQueue, JobRecord
from skyframe.reload import ConfigWatch, ReloadPlan, plan_reload, project_files, stamp
from skyframe.sharing import RemoteOwners
from skyframe.state import Manifest, StateLock
from skyframe.status import StatusTracker
from skyframe.storage import Sink
from skyframe.summary import RunSummary
from skyframe.watcher import SourceWatcher

if TYPE_CHECKING:
    from skyframe.api import ApiServer
    from skyframe.hublink import HubLink
    from skyframe.webhook import WebhookNotifier

__all__ = ["Engine", "RunSummary"]

log = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL = 0.05  #: seconds between settle checks
WATCHER_CHECK_INTERVAL = 2.0  #: seconds between checks that the observers are alive
RESCAN_POLL_INTERVAL = 0.2  #: seconds between checks for due or requested rescans
NOTIFIERS_CLOSE = 10.0  #: seconds a stop gives the notifiers to catch up
FLUSH_CLOSE = 5.0  #: seconds a stop gives each webhook, and the hub, to send what it holds
STOP_MARGIN = 10.0  #: seconds beyond those for the rest of a stop (pools, databases)


def still_running(limit: int = 6) -> str:
    """Where the other threads are, for a stop that hangs: each thread's innermost frame
    outside the standard library ("name at folder/file.py:line in function"); threads that
    are only in the standard library (idle pool workers) are left out."""
    paths = sysconfig.get_paths()
    stdlib = os.path.normcase(paths["stdlib"])
    installed = tuple(os.path.normcase(paths[key]) for key in ("purelib", "platlib"))

    def standard(filename: str) -> bool:
        name = os.path.normcase(filename)
        return name.startswith(stdlib) and not name.startswith(installed)

    names = {thread.ident: thread.name for thread in threading.enumerate()}
    places = []
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident():
            continue
        current: Any = frame
        while current is not None and standard(current.f_code.co_filename):
            current = current.f_back
        if current is None:
            continue
        where = "/".join(current.f_code.co_filename.replace("\\", "/").split("/")[-2:])
        places.append(
            f"{names.get(ident, ident)} at {where}:{current.f_lineno} in {current.f_code.co_name}"
        )
    if not places:
        return "no thread outside the standard library"
    more = f"; {len(places) - limit} more" if len(places) > limit else ""
    return "; ".join(places[:limit]) + more


def _webhooks(config: Config) -> list[WebhookNotifier]:
    """The config's webhooks (``notify``); aiohttp is loaded only when there are some."""
    if not config.notify:
        return []
    from skyframe.webhook import WebhookNotifier

    return [
        WebhookNotifier(entry.webhook, name=f"webhook-{index + 1}")
        for index, entry in enumerate(config.notify)
    ]


class Engine:
    """Runs pipelines against the queue and manifest of a locked state directory."""

    def __init__(
        self,
        config: Config,
        pm: pluggy.PluginManager,
        pipelines: list[Pipeline],
        *,
        watch_config: bool = False,
    ) -> None:
        self.config = config
        self.pm = pm
        #: The configured pipelines, one mapping every part shares; a reload swaps its content.
        self.pipelines = PipelineSet({p.name: p for p in pipelines})
        #: run_daemon reloads when the config's files change (see skyframe.reload)
        self.watch_config = watch_config
        self._reload_lock = threading.Lock()
        self._reload_requested = threading.Event()
        self._reload_trigger = ""
        self._config_watch: ConfigWatch | None = None
        #: run_daemon watches the sources: a reload watches the new ones too
        self._watching = False
        #: threads a reload started (the groups' of a first pipeline with groups)
        self._late_threads: list[threading.Thread] = []
        self.state_dir = config.state_path
        self.summary = RunSummary()
        self._summary_lock = threading.Lock()
        self._lock = StateLock(self.state_dir)
        self._open_state()
        self.queue.add_lanes(list(self.pipelines))
        self.tracker = StatusTracker(
            self.pipelines,
            self.queue.counts_by_pipeline,
            lambda: {**self.control.state(), "metered": self.control.metered},
        )
        self.notifiers = Notifiers(pm)
        #: Called straight from emit(): they never block, and keep their own buffer.
        self.webhooks = _webhooks(config)
        #: the hub this station reports to (docs/hub.md), when the config names one
        self.hub: HubLink | None = None
        if config.hub is not None:
            from skyframe.hublink import HubLink  # aiohttp: only when configured

            self.hub = HubLink(
                config.hub, self.state_dir, status=self._hub_status, command=self._hub_command
            )
        self.api: ApiServer | None = None
        #: Told the API's address once it listens (the CLI prints it).
        self.on_api: Callable[[str], None] | None = None
        #: Called by ``run_once`` before the first job is handed out, while the scans run; what
        #: it raises ends the run (the CLI's check of the sinks, under way since start-up).
        self.gate: Callable[[], None] | None = None
        self._stop = threading.Event()
        self._cancel = threading.Event()
        #: run_once's scans are under way
        self._scanning = False
        self._scan_failure: BaseException | None = None
        #: what ended the run early (the state directory vanished), raised when it ends
        self._fatal: SkyframeError | None = None
        #: Called when a fatal stop still runs past ``stop_limit()`` (the CLI exits the
        #: process); None: the stop is only said to hang.
        self.on_stuck: Callable[[], None] | None = None
        #: set once ``close`` is done (not when it gave up, with jobs still running)
        self.closed = threading.Event()
        self._errors = RepeatedLog(log)  #: errors of steps retried every tick, said once
        #: Set once the watchers run and the first catch-up scan of every source is done.
        self.ready = threading.Event()
        self._shared_budget: TokenBucket | None = None
        #: the limit it keeps (``bwlimit``, or the schedule of ``bandwidth``)
        self._shared_limit: float | Schedule | None = None
        #: every shared budget made so far (a reload may replace it): told apart from a sink's own
        self._shared_budgets: list[TokenBucket] = []
        self._share_budget(config, [s for p in pipelines for s in p.sinks])
        self.dispatcher = Dispatcher(
            self.queue,
            self.control,
            stopping=self._stop,
            cancel=self._cancel,
            busy=lambda: self._scanning or bool(self.intake.settling()),
            configured=self.pipelines,
        )
        self.runner = JobRunner(
            pm=pm,
            queue=self.queue,
            manifest=self.manifest,
            pipelines=self.pipelines,
            state_dir=self.state_dir,
            journal=self.journal,
            workers=config.workers,
            emit=self.emit,
            on_finished=self.dispatcher.job_finished,
            cancelled=self._cancel,
            control=self.control,
            stopping=self._stop,
            owners=RemoteOwners((s for p in pipelines for s in p.sinks), self.manifest),
        )
        #: where processes marked ``executor: NAME`` run (connected on first use)
        self.executors: dict[str, DaskExecutor] = {
            name: DaskExecutor(name, settings, self.state_dir)
            for name, settings in config.executors.items()
        }
        self.runner.executors = self.executors
        self.dispatcher.runner = self.runner
        self.intake = Intake(
            self.pipelines,
            queue=self.queue,
            manifest=self.manifest,
            control=self.control,
            runner=self.runner,
            dispatcher=self.dispatcher,
            emit=self.emit,
            summary=self.summary,
            summary_lock=self._summary_lock,
            stopping=self._stop,
        )
        self.runner.job_ended = self.tracker.job_ended
        #: the groups (flights) of the pipelines that have some
        self.groups: Groups | None = None
        if self._group_store is not None:
            self._start_groups(self._group_store)

    def _start_groups(self, store: GroupStore) -> Groups:
        groups = Groups(
            store,
            self.pipelines,
            manifest=self.manifest,
            pm=self.pm,
            emit=self.emit,
            state_dir=self.state_dir,
            journal=self.journal,
        )
        self.groups = groups
        self.runner.arrived = groups.arrived
        self.intake.on_queued = groups.seen
        return groups

    def _share_budget(self, config: Config, sinks: list[Sink]) -> None:
        """Put ``bwlimit`` (or ``bandwidth.schedule``), one budget for every sink, on top of each
        sink's own (again after a reload: a sink it kept loses the budget it had, gets the
        current one once; an unchanged limit keeps its budget)."""
        limit = upload_limit(config)
        if limit is None:
            self._shared_budget = None
        elif self._shared_budget is None or self._shared_limit != limit:
            self._shared_budget = TokenBucket(limit, name="all sinks")
            self._shared_budgets.append(self._shared_budget)
        self._shared_limit = limit
        for sink in sinks:
            own = [
                bucket
                for bucket in sink.limiter.buckets
                if not any(bucket is shared for shared in self._shared_budgets)
            ]
            shared = [self._shared_budget] if self._shared_budget is not None else []
            sink.limiter = Limiter([*shared, *own])

    def _open_state(self) -> None:
        """Lock the state directory and open its databases (all, or none and unlocked)."""
        self._lock.acquire()
        opened: list[Any] = []
        try:
            self.queue = JobQueue(self.state_dir / "queue")
            opened.append(self.queue)
            self.manifest = Manifest(self.state_dir / "manifest")
            opened.append(self.manifest)
            self.manifest.index_remote_names()
            self.journal = UploadJournal(self.state_dir / "uploads")
            opened.append(self.journal)
            self.history = History(
                self.state_dir,
                retention=self.config.history.retention,
                max_events=self.config.history.max_events,
            )
            opened.append(self.history)
            self._group_store: GroupStore | None = None
            if any(p.groups for p in self.pipelines.values()):
                self._group_store = GroupStore(self.state_dir)
                opened.append(self._group_store)
            self.control = Control(self.state_dir, self.pipelines)
        except BaseException:
            for each in reversed(opened):
                each.close()
            self._lock.release()
            raise

    @property
    def abandoned(self) -> int:
        """Jobs still running after the shutdown deadline (their leases return at next start)."""
        return self.dispatcher.in_flight

    def close(self) -> None:
        """Stop the pools, close the databases and release the state directory.

        With jobs still running past the deadline, nothing is closed and the lock is kept: the
        process must exit (the queue is durable), so that no second instance can start while
        an old upload is still writing.
        """
        if self.abandoned:  # not closed: after a fatal stop, on_stuck ends the process
            return
        sinks = self.runner.sinks()  # with those of pipelines a reload replaced
        self.runner.shutdown()
        for sink in sinks:
            sink.close()
        for executor in self.executors.values():
            executor.close()
        self.queue.close()
        self.manifest.close()
        self.journal.close()
        self.history.close()
        if self.hub is not None:
            self.hub.close(timeout=0.0)  # closed already after a run; not when none ran
        if self._group_store is not None:
            self._group_store.close()
        self._lock.release()
        self.closed.set()

    # --- events ------------------------------------------------------------------------------

    def emit(self, event: LifecycleEvent) -> None:
        """Count the event, record it, and hand it to every notifier (each on its own thread:
        a slow or failing notifier never holds up the caller)."""
        with self._summary_lock:
            self.summary.count(event)
        api = self.api  # it may go away meanwhile (a stop while transfers still run)
        for consume in (
            self.tracker.observe,
            self.history.record,
            *((api.publish,) if api is not None else ()),  # its stream and metrics
            *(webhook.skyframe_event for webhook in self.webhooks),
            *((self.hub.skyframe_event,) if self.hub is not None else ()),
            self.notifiers.publish,
        ):
            try:
                consume(event)
            except Exception:  # monitoring must never fail a transfer
                log.exception("could not record a %s event", event.kind)

    # --- control (the API's: skyframe.api.DaemonControl) ------------------------------------------

    def status(self) -> dict[str, Any]:
        """The status document of ``GET /api/status`` (docs/api.md)."""
        document = self.tracker.snapshot()
        if self.executors:
            document["executors"] = [e.status() for e in self.executors.values()]
        return document

    def set_paused(
        self, paused: bool, pipeline: str | None = None, *, reason: str = ""
    ) -> dict[str, Any]:
        """Pause or resume everything or one pipeline (KeyError for an unknown one); the
        switch is saved at once. Returns the pause state after the change."""
        changed = self.control.set(paused, pipeline)
        kind: LifecycleKind = "paused" if paused else "resumed"
        for name in changed:
            log.log(logging.WARNING if paused else logging.INFO, "%s: %s %s", name, kind, reason)
            self.emit(LifecycleEvent(kind, name, "", reason=reason or None))
        self.dispatcher.notify()
        return self.control.state()

    def _hub_status(self) -> dict[str, Any]:
        """The heartbeat: the status document, and the latest groups (flights) with their
        progress when the pipelines have some (without the photos' positions: the request
        stays small)."""
        groups = [
            {key: value for key, value in group.items() if key != "positions"}
            for group in self.groups_overview()
        ]
        return {**self.status(), "groups": groups}

    def _hub_command(self, action: str, pipeline: str | None) -> str:
        """Carry out a pause or resume the hub sent; what was done, in a few words."""
        if pipeline is not None and pipeline not in self.pipelines:
            raise KeyError(f"no pipeline {pipeline!r} here")
        self.set_paused(action == "pause", pipeline, reason="from the hub")
        return f"{action}d {pipeline or 'every pipeline'}"

    def groups_overview(self) -> list[dict[str, Any]]:
        """The latest groups (flights), for ``GET /api/groups``; empty without groups."""
        return self.groups.overview() if self.groups is not None else []

    def pipeline_names(self) -> Collection[str]:
        """The configured pipelines."""
        return self.pipelines.keys()

    def jobs(self, state: str | None, limit: int | None) -> tuple[list[JobRecord], int]:
        """Queued jobs (of one state, at most ``limit``, oldest first) and how many there are."""
        records = self.queue.records(state, limit)
        counts = self.queue.counts()
        return records, counts[state] if state is not None else sum(counts.values())

    def retry_dead(self, pipeline: str | None = None, relpath: str | None = None) -> int:
        """Move dead-lettered jobs back into the queue; returns how many."""
        moved = self.queue.requeue_dead(pipeline, relpath)
        if moved:
            self.dispatcher.notify()
        return moved

    def history_query(self, **criteria: Any) -> list[dict[str, Any]]:
        """Recorded events, newest first (see :meth:`History.query`)."""
        self.history.flush()
        return self.history.query(**criteria)

    def alive(self) -> bool:
        """True while the engine runs and has not been asked to stop."""
        return not self._stop.is_set()

    def readiness(self) -> tuple[bool, list[dict[str, Any]]]:
        """Whether every sink answers, and each sink's health."""
        sinks = [
            {
                "pipeline": p.name,
                "sink": s.key,
                "health": s.health.state,
                "last_error": s.health.last_error or None,
            }
            for p in self.pipelines.values()
            for s in p.sinks
        ]
        ready = self.ready.is_set() and all(s["health"] in ("ok", "unknown") for s in sinks)
        return ready, sinks

    # --- reload (docs/cli.md, "Reloading the config") -----------------------------------------

    def request_reload(self, trigger: str) -> None:
        """Reload soon, in the daemon's reload thread (all a signal handler may do)."""
        self._reload_trigger = trigger
        self._reload_requested.set()

    def reload(self, trigger: str = "reload") -> ReloadPlan:
        """Load the config file again, as a start does, and run its pipelines from now on.

        Refused (the error raised and logged in one line, a ``reload-refused`` event sent)
        when the new config does not load, or changes the state directory: the running one
        goes on untouched. ``trigger`` says who asked, for the log.
        """
        with self._reload_lock:
            seen = stamp(project_files(self.config))
            try:
                try:
                    if self._stop.is_set():
                        raise StateError("skyframe is stopping")
                    project = load_project(self.config.file)
                    plan = plan_reload(self.config, self.pipelines, project)
                except SkyframeError:
                    raise
                except Exception as exc:  # a plugin's own error: said, never a traceback
                    raise PluginError(f"{type(exc).__name__}: {exc}") from exc
            except SkyframeError as exc:
                more = len(exc.more) if isinstance(exc, ConfigError) else 0
                also = f" (and {more} more problem(s))" if more else ""
                log.error(
                    "config not reloaded (%s): %s%s; the running config stays", trigger, exc, also
                )
                self.emit(LifecycleEvent("reload-refused", "", "", reason=f"{exc}{also}"))
                raise
            finally:
                if self._config_watch is not None:
                    self._config_watch.loaded(seen)
            self._apply(project.config, plan)
        waiting = self._waiting_for(plan.removed)
        log.info("config reloaded (%s): %s%s", trigger, plan.describe(), waiting)
        if plan.restart_needed:
            log.warning(
                "changed in the config, in force at the next start only: %s",
                ", ".join(plan.restart_needed),
            )
        self.emit(LifecycleEvent("reloaded", "", "", reason=plan.describe() + waiting))
        return plan

    def _apply(self, config: Config, plan: ReloadPlan) -> None:
        """Run the plan's pipelines: every part sees them at once; in-flight jobs end on the
        pipelines they began with."""
        self._share_budget(config, [s for p in plan.pipelines.values() for s in p.sinks])
        with self.intake.switching():  # no file is being judged meanwhile
            now = time.time()
            for pipeline in plan.new_rules:
                pipeline.accepted_since = now
            self.runner.switch(lambda: self.pipelines.replace(plan.pipelines))
            self.control.set_pipelines(plan.pipelines)
            self.queue.add_lanes(list(plan.pipelines))
            gone, fresh = self.intake.renew_sources()
        self.config = config
        self.runner.owners = RemoteOwners(
            (s for p in plan.pipelines.values() for s in p.sinks), self.manifest
        )
        if self.groups is None and any(p.groups for p in plan.pipelines.values()):
            self._group_store = GroupStore(self.state_dir)
            self._start_groups(self._group_store)
            if self._watching:
                thread = threading.Thread(
                    target=self._complete_groups, name="skyframe-groups", daemon=True
                )
                self._late_threads.append(thread)
                thread.start()
        for source in gone:
            if source.watcher is not None:
                source.watcher.stop()
        if self._watching:
            for source in fresh:
                self._watch(source)
        self.dispatcher.notify()

    def _waiting_for(self, removed: list[str]) -> str:
        """What the removed pipelines left in the queue, for the log line."""
        if not removed:
            return ""
        counts = self.queue.counts_by_pipeline()
        left = []
        for name in removed:
            c = counts.get(name, {})
            jobs = c.get("pending", 0) + c.get("leased", 0) + c.get("waiting", 0)
            if jobs:
                left.append(f"{name}: {jobs} job(s)")
        if not left:
            return ""
        return f" ({', '.join(left)} wait in the queue until configured again)"

    def _reloader(self) -> None:
        """Watch mode: carry out the reloads asked for (SIGHUP, the config watch)."""
        while not self._stop.is_set():
            if not self._reload_requested.wait(0.5):
                continue
            self._reload_requested.clear()
            if self._stop.is_set():
                return
            try:
                self.reload(self._reload_trigger)
            except SkyframeError:
                pass  # said by reload(); the running config goes on
            except Exception as exc:
                log.error("the reload failed: %s: %s", type(exc).__name__, exc)
                log.debug("the reload failed", exc_info=True)

    def _watch(self, source: Source) -> None:
        """Start watching a source; its catch-up scan follows at once (after the watch, so
        nothing written meanwhile is missed)."""
        spec = source.pipeline.source
        source.watcher = SourceWatcher(
            source.pipeline.source_root,
            self.intake.callbacks(source),
            recursive=source.pipeline.recursive,
            polling=spec.polling,
            poll_interval=spec.poll_interval,
        )
        source.watcher.start()
        source.next_rescan = 0.0

    # --- background steps -------------------------------------------------------------------

    def _housekeeping(self) -> None:
        """Hand settled files over, and revive dead watchers."""
        next_watch_check = time.monotonic() + WATCHER_CHECK_INTERVAL
        while not self._stop.wait(HOUSEKEEPING_INTERVAL):
            # Each step is guarded: one failure (a database error, a source folder that is
            # away) must not end settling, deletes or watcher restarts for the whole run.
            for source in self.intake.sources.values():
                self._guarded(source.settler.tick, "settling files")
            self._guarded(self.intake.expire_vanished, "mirroring deletes")
            if time.monotonic() >= next_watch_check:
                next_watch_check = time.monotonic() + WATCHER_CHECK_INTERVAL
                if self.executors:
                    self._guarded(self._forget_results, "forgetting old executor results")
                for source in self.intake.sources.values():
                    if source.watcher is not None:
                        self._guarded(source.watcher.check, "checking the watcher")

    def _forget_results(self) -> None:
        forget_results(self.state_dir, RESULTS_KEPT)

    def _guarded(self, step: Callable[[], None], what: str) -> None:
        try:
            step()
        except Exception as exc:
            self._errors.error(f"error while {what}; trying again shortly", exc)

    def _watch_state_dir(self) -> None:
        """Stop when the state directory was removed or replaced under the running daemon:
        its queue and manifest are gone, and another daemon could take the folder.

        A thread of its own, which no other step can hold up. The stop that follows is
        bounded too: a part that still runs when the stop's own limits are past (something
        waiting on a database that is gone) is named, and ``on_stuck`` ends the process.
        """
        while not self._stop.wait(WATCHER_CHECK_INTERVAL):
            if not self._lock.intact():
                break
        else:
            return  # stopped for another reason
        self._fatal = StateError(
            f"the state directory {self.state_dir} was removed or replaced while "
            "skyframe ran: stopping (start it again to begin with a fresh state)"
        )
        log.error("%s", self._fatal)
        self.stop()
        limit = self.stop_limit()
        if self.closed.wait(limit) or self.on_stuck is None:
            return
        log.error(
            "skyframe did not stop within %.0f s of its state directory going (%s): exiting now",
            limit,
            still_running(),
        )
        self.on_stuck()

    def stop_limit(self) -> float:
        """The longest a stop takes when nothing hangs: in-flight work's grace, then the
        notifiers' catching up and each webhook's and the hub's flush (see
        ``_stop_notifiers``), and a margin for the rest of ``close``."""
        flushes = len(self.webhooks) + (self.hub is not None)
        return self.config.shutdown_grace + NOTIFIERS_CLOSE + FLUSH_CLOSE * flushes + STOP_MARGIN

    def _rescanner(self) -> None:
        """Catch-up scans: at start, every ``rescan`` interval, and whenever events were lost."""
        while not self._stop.is_set():
            now = time.monotonic()
            for source in self.intake.sources.values():
                if source.rescan_requested.is_set() or now >= source.next_rescan:
                    source.rescan_requested.clear()
                    source.next_rescan = now + source.pipeline.source.rescan
                    self._safe_scan(source.pipeline)
            self.ready.set()
            self._stop.wait(RESCAN_POLL_INTERVAL)

    def _complete_groups(self) -> None:
        """Watch mode: complete the groups that became quiet (see skyframe.groups)."""
        groups = self.groups
        assert groups is not None

        def complete() -> None:
            groups.complete_due()

        while not self._stop.wait(CHECK_INTERVAL):
            self._guarded(complete, "completing groups")

    def _safe_scan(self, pipeline: Pipeline) -> None:
        try:
            self.intake.scan(pipeline)
        except Exception as exc:
            self._errors.error(f"{pipeline.name}: the catch-up scan failed; it runs again", exc)

    # --- entry points ------------------------------------------------------------------------

    def stop(self) -> None:
        """Take no new work; in-flight work finishes (or is cut after ``shutdown_grace``;
        at once when it is held by a pause)."""
        self._stop.set()
        self.control.wake()
        self.dispatcher.notify()

    def _startup_hooks(self) -> None:
        try:
            self.pm.hook.skyframe_startup(config=self.config)
        except SkyframeError:
            raise
        except Exception as exc:
            raise PluginError(
                f"a skyframe_startup hook failed: {type(exc).__name__}: {exc}"
            ) from exc

    def run_once(self) -> RunSummary:
        """Scan every source, then deliver until nothing is queued, waiting or settling."""
        housekeeping = threading.Thread(
            target=self._housekeeping, name="skyframe-housekeeping", daemon=True
        )
        # The scans run beside the gate (the sinks' check) and the first deliveries: what they
        # queue is handed out as it comes, and the run is idle only once they are done.
        scans = threading.Thread(target=self._scan_all, name="skyframe-scan", daemon=True)
        self._state_watch().start()
        try:
            self._start_notifiers()
            self._startup_hooks()
            self._warn_held()
            self._scanning = True
            self.dispatcher.volatile_open = True
            # Files the sinks hash before sending are hashed meanwhile (see Digests).
            self.intake.hashing_ahead = self.gate is not None
            scans.start()
            if self.gate is not None:
                try:
                    self.gate()
                finally:
                    self.intake.hashing_ahead = False
                    self.runner.digests.stop()
            housekeeping.start()
            self.dispatcher.run(until_idle=True)
            self.dispatcher.drain(self.config.shutdown_grace)
            scans.join()
            self.dispatcher.close_volatile()
            if self._scan_failure is not None:
                raise self._scan_failure
            per_pipeline = self.queue.counts_by_pipeline()
            counts = self.queue.totals(per_pipeline)
            held = self.control.held()
            if self.groups is not None and not self._stop.is_set():
                # The end of a one-shot run completes the groups of every pipeline that
                # delivered all it could (nothing left waiting, not paused).
                settled = [
                    name
                    for name in self.pipelines
                    if name not in held
                    and not any(per_pipeline.get(name, {}).get(s) for s in ("pending", "waiting"))
                ]
                self.groups.complete_due(final=True, only=settled)
            self.summary.held = sum(
                c["pending"] + c["waiting"] for name, c in per_pipeline.items() if name in held
            )
            left = counts["pending"] + counts["leased"] + counts["waiting"] - self.summary.held
            self.summary.interrupted = self._stop.is_set() and bool(
                left or self.intake.settling() or self.intake.scan_cut
            )
            self.summary.dead_letters = counts["dead"]
        finally:
            self._stop.set()
            for thread in (scans, housekeeping):
                if thread.is_alive():
                    thread.join()
            try:
                self.dispatcher.close_volatile()
            except Exception:  # keep the run's own error; the next scan finds these files
                log.exception("could not queue the files this run had not sent")
            self._stop_notifiers()
            self._shutdown_hooks()
        if self._fatal is not None:
            raise self._fatal
        return self.summary

    def _state_watch(self) -> threading.Thread:
        """The thread of :meth:`_watch_state_dir`: not joined, as it outlives a stuck stop."""
        return threading.Thread(
            target=self._watch_state_dir, name="skyframe-state-watch", daemon=True
        )

    def _scan_all(self) -> None:
        """Scan every source once (``run_once``); a failure stops the run and is raised there."""
        try:
            for pipeline in self.pipelines.values():
                self.intake.scan(pipeline)
        except BaseException as exc:
            self._scan_failure = exc
            self.stop()
        finally:
            self._scanning = False
            self.dispatcher.notify()

    def _watch_metered(self) -> None:
        """``bandwidth.metered: pause``: every upload held while the system says the link is
        metered, let go when it says it is not (or the setting goes in a reload)."""
        from skyframe.metered import MeteredProbe

        probe = MeteredProbe()
        said = ""
        while not self._stop.is_set():
            bandwidth = self.config.bandwidth
            metered = False
            if bandwidth is not None and bandwidth.metered == "pause":
                found = probe()
                if found is None and probe.problem != said:
                    log.warning(
                        "bandwidth.metered: cannot tell whether the link is metered (%s); "
                        "uploads go on",
                        probe.problem,
                    )
                said = probe.problem if found is None else ""
                metered = bool(found)
            if metered != self.control.metered:
                kind: LifecycleKind = "paused" if metered else "resumed"
                reason = "the link is metered" if metered else "the link is not metered"
                for name in self.control.set_metered(metered):
                    log.warning("%s: %s: %s", name, kind, reason)
                    self.emit(LifecycleEvent(kind, name, "", reason=reason))
                self.dispatcher.notify()
            self._stop.wait(bandwidth.check_every if bandwidth is not None else 60.0)

    def run_daemon(self) -> RunSummary:
        """Watch, catch up, and deliver until ``stop()`` is called."""
        threads = [
            threading.Thread(target=self._housekeeping, name="skyframe-housekeeping", daemon=True),
            threading.Thread(target=self._rescanner, name="skyframe-rescan", daemon=True),
        ]
        if self.groups is not None:
            threads.append(
                threading.Thread(target=self._complete_groups, name="skyframe-groups", daemon=True)
            )
        threads.append(threading.Thread(target=self._reloader, name="skyframe-reload", daemon=True))
        threads.append(
            threading.Thread(target=self._watch_metered, name="skyframe-metered", daemon=True)
        )
        self.runner.patient = True  # an unreachable sink keeps files waiting, uncounted
        self._state_watch().start()
        try:
            self._start_notifiers()
            self._startup_hooks()
            self._start_api()
            self._warn_held()
            self._warn_unconfigured()
            with self._reload_lock:  # a reload now watches its new sources itself
                self._watching = True
                for source in self.intake.sources.values():
                    self._watch(source)
            for thread in threads:
                thread.start()
            if self.watch_config:
                self._config_watch = ConfigWatch(
                    lambda: project_files(self.config),
                    lambda: self.request_reload("the config changed"),
                )
                self._config_watch.start()
            log.info("watching %d source folder(s)", len(self.intake.sources))
            self.dispatcher.run(until_idle=False)
            self.dispatcher.drain(self.config.shutdown_grace)
        finally:
            self._stop.set()
            if self._config_watch is not None:
                self._config_watch.stop()
            with self._reload_lock:  # no reload is half done
                self._watching = False
            for thread in [*threads, *self._late_threads]:
                if thread.is_alive():
                    thread.join()
            for source in self.intake.sources.values():
                if source.watcher is not None:
                    source.watcher.stop()
            if self.api is not None:
                self.api.stop()
                self.api = None
            self._stop_notifiers()
            self._shutdown_hooks()
        if self._fatal is not None:
            raise self._fatal
        return self.summary

    def _start_api(self) -> None:
        """Serve the API and dashboard; a port in use costs the API, never the uploads."""
        from skyframe.api import ApiServer

        settings = self.config.api
        if not settings.enabled:
            return
        server = ApiServer(self, settings, self.state_dir)
        try:
            server.start()
        except OSError as exc:
            log.error(
                "cannot serve the API on %s: %s; running without it "
                "(set api.listen to a free address)",
                settings.listen,
                exc.strerror or exc,
            )
            return
        self.api = server
        if self.on_api is not None:
            self.on_api(server.url)

    def _warn_unconfigured(self) -> None:
        """Say which jobs wait for a pipeline the config no longer has."""
        waiting = self._waiting_for(
            [name for name in self.queue.counts_by_pipeline() if name not in self.pipelines]
        )
        if waiting:
            log.warning("pipelines not in the config%s", waiting)

    def _warn_held(self) -> None:
        held = self.control.held()
        if held:
            log.warning(
                "paused: %s (skyframe resume to go on)",
                "everything" if self.control.paused else ", ".join(sorted(held)),
            )

    def _start_notifiers(self) -> None:
        for webhook in self.webhooks:
            webhook.start()
        if self.hub is not None:
            self.hub.start()

    def _stop_notifiers(self) -> None:
        """Let the notifiers catch up (a few seconds at most), then let the webhooks flush."""
        if not self.notifiers.close(timeout=NOTIFIERS_CLOSE):
            log.warning(
                "notifiers still busy after %.0f s: the rest of their events are dropped",
                NOTIFIERS_CLOSE,
            )
        for webhook in self.webhooks:
            webhook.close(timeout=FLUSH_CLOSE)
        if self.hub is not None:
            self.hub.close(timeout=FLUSH_CLOSE)  # what is not sent stays in the outbox
        for name, count in self.notifiers.dropped.items():
            log.warning("notifier %s lost %d event(s): it could not keep up", name, count)

    def _shutdown_hooks(self) -> None:
        try:
            self.pm.hook.skyframe_shutdown(config=self.config)
        except Exception:
            log.exception("a shutdown hook failed")
