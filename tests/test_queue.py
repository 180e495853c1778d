"""The durable queue: coalescing, leases that survive a crash, backoff and dead letters."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from skyframe.events import FileEvent
from skyframe.jobs import HIGH, LOW, NORMAL, Delete, Move, Upload, job_from_json
from skyframe.queue import FAIR_SHARE, JobQueue


def job(relpath: str, version: object = 0, *, path: str = "", priority: int = NORMAL) -> Upload:
    """An upload of ``relpath``; ``version`` tells two states of the file apart."""
    event = FileEvent("p", Path(path or f"/src/{version}/{relpath}"), relpath, 0, 0)
    return Upload(event=event, priority=priority)


@pytest.fixture
def queue(tmp_path: Path) -> JobQueue:
    q = JobQueue(tmp_path / "queue")
    yield q
    q.close()


def test_put_then_claim_in_order(queue: JobQueue) -> None:
    for name in ("a", "b", "c"):
        assert queue.put("p", job(name, name)) is True
    claims = [queue.claim() for _ in range(3)]
    assert [c.relpath for c in claims if c] == ["a", "b", "c"]
    assert queue.claim() is None


def test_latest_state_wins_while_pending(queue: JobQueue) -> None:
    queue.put("p", job("a", 1))
    queue.put("p", job("b", 1))
    assert queue.put("p", job("a", 2)) is True  # no version given: the latest always wins
    first = queue.claim()
    assert first is not None
    assert (first.relpath, first.job) == ("a", job("a", 2))
    assert queue.claim().relpath == "b"  # type: ignore[union-attr]
    assert queue.claim() is None


def test_same_path_in_two_pipelines_is_two_jobs(queue: JobQueue) -> None:
    queue.put("p1", job("a"))
    queue.put("p2", job("a"))
    assert {queue.claim().pipeline, queue.claim().pipeline} == {"p1", "p2"}  # type: ignore[union-attr]


def test_update_while_leased_runs_after(queue: JobQueue) -> None:
    queue.put("p", job("a", 1))
    claim = queue.claim()
    assert claim is not None
    queue.put("p", job("a", 2))
    assert queue.claim() is None  # never two versions of one path at once
    queue.complete(claim)
    again = queue.claim()
    assert again is not None
    assert again.job == job("a", 2)
    queue.complete(again)
    assert queue.counts() == {"pending": 0, "leased": 0, "waiting": 0, "dead": 0}


def test_leases_return_after_a_crash(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "queue")
    q.put("p", job("a", 1))
    q.put("p", job("b", 1))
    assert q.claim() is not None  # leased, then the process "dies" without completing
    q.close()
    reopened = JobQueue(tmp_path / "queue")
    relpaths = sorted(c.relpath for c in (reopened.claim(), reopened.claim()) if c)
    assert relpaths == ["a", "b"]
    assert reopened.claim() is None
    reopened.close()


def test_retry_waits_then_comes_back(queue: JobQueue) -> None:
    queue.put("p", job("a"))
    claim = queue.claim()
    assert claim is not None
    queue.retry(claim, "connection reset", delay=0.2)
    assert queue.claim() is None
    due = queue.next_due()
    assert due is not None
    assert due > time.time()
    time.sleep(0.25)
    again = queue.claim()
    assert again is not None
    assert again.attempts == 1


def test_waiting_jobs_survive_restart(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "queue")
    q.put("p", job("a"))
    claim = q.claim()
    assert claim is not None
    q.retry(claim, "boom", delay=0.1)
    q.close()
    reopened = JobQueue(tmp_path / "queue")
    assert reopened.next_due() is not None
    time.sleep(0.15)
    again = reopened.claim()
    assert again is not None
    assert again.attempts == 1
    reopened.close()


def test_dead_letters_visible_and_requeueable(queue: JobQueue) -> None:
    queue.put("p", job("a", 1))
    claim = queue.claim()
    assert claim is not None
    queue.dead(claim, "permission denied")
    (record,) = queue.records("dead")
    assert record.relpath == "a"
    assert record.errors == ("permission denied",)
    assert queue.claim() is None
    assert queue.requeue_dead() == 1
    again = queue.claim()
    assert again is not None
    assert again.attempts == 0
    queue.dead(again, "still denied")
    assert queue.purge_dead() == 1
    assert queue.records() == []


def test_new_version_revives_a_dead_job(queue: JobQueue) -> None:
    queue.put("p", job("a", 1))
    claim = queue.claim()
    assert claim is not None
    queue.dead(claim, "bad")
    queue.put("p", job("a", 2))
    again = queue.claim()
    assert again is not None
    assert again.job == job("a", 2)


def test_stored_as_json_not_pickle(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "queue")
    q.put("p", job("a", "ü"))
    q.close()
    db = sqlite3.connect(tmp_path / "queue" / "cache.db")
    rows = db.execute("SELECT key, raw, value FROM Cache").fetchall()
    db.close()
    assert len(rows) == 2  # the job record and its place in the ready list
    for key, raw, value in rows:
        assert isinstance(key, str)
        assert raw == 1
        json.loads(value)  # JSON text, never a pickle


def test_same_version_keeps_backoff_and_dead_letters(queue: JobQueue) -> None:
    queue.put("p", job("a", 1), version="10:1")
    claim = queue.claim()
    assert claim is not None
    queue.retry(claim, "link down", delay=60)
    # A rescan offers the same version: the job keeps waiting, with its attempt counted.
    assert queue.put("p", job("a", 1), version="10:1") is False
    assert queue.claim() is None
    (record,) = queue.records("waiting")
    assert record.attempts == 1
    # A new version of the file starts afresh at once.
    queue.put("p", job("a", 2), version="12:2")
    again = queue.claim()
    assert again is not None
    assert (again.job, again.attempts) == (job(again.relpath, 2), 0)
    queue.dead(again, "bad")
    queue.put("p", job("a", 2), version="12:2")
    assert queue.claim() is None
    assert [r.state for r in queue.records()] == ["dead"]


def upload_seen(inode: int) -> Upload:
    """The same file, as the watcher (``os.stat``) or a scan (``os.scandir``) sees it."""
    return Upload(event=FileEvent("p", Path("/in/a.jpg"), "a.jpg", 10, 5, "scanned", inode))


def test_where_scans_see_no_inode_a_scan_does_not_restart_a_watched_files_retries(
    queue: JobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Windows: os.scandir's entries report inode 0, os.stat the file's ID. A rescan then
    # offered a waiting (or dead-lettered) file as a new version: attempts back to 0.
    monkeypatch.setattr("skyframe.jobs.SCANS_SEE_INODES", False)
    watched = upload_seen(inode=918273)
    queue.put("p", watched, version=watched.version)
    claim = queue.claim()
    assert claim is not None
    queue.retry(claim, "link down", delay=60)
    scanned = upload_seen(inode=0)
    assert queue.put("p", scanned, version=scanned.version) is False
    (record,) = queue.records("waiting")
    assert record.attempts == 1


def test_where_scans_see_inodes_a_new_inode_is_a_new_version() -> None:
    # Linux, macOS: a file replaced by another of the same size and time is sent again.
    assert upload_seen(inode=1).version != upload_seen(inode=2).version


def test_same_version_while_leased_does_not_run_twice(queue: JobQueue) -> None:
    queue.put("p", job("a", 1), version="1")
    claim = queue.claim()
    assert claim is not None
    queue.put("p", job("a", 1), version="1")
    queue.complete(claim)
    assert queue.claim() is None
    queue.put("p", job("a", 2), version="2")
    follow = queue.claim()
    assert follow is not None
    queue.put("p", job("a", 3), version="3")
    queue.complete(follow)
    last = queue.claim()
    assert last is not None
    assert last.job == job("a", 3)
    queue.complete(last)
    queue.put("p", job("a", 3), version="3")  # the delivered version, offered again
    assert queue.claim() is not None  # the queue does not know deliveries; the manifest does


def test_claims_skip_held_pipelines_and_take_turns(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "q")
    for i in range(3):
        q.put("busy", job(f"b{i}", i))
    q.put("quiet", job("q0", 0))
    assert [c.relpath for c in q.claim_many(10, skip={"busy"})] == ["q0"]
    assert q.claim_many(10, skip={"busy"}) == []
    assert [c.relpath for c in q.claim_many(10)] == ["b0", "b1", "b2"]
    for i in range(2):
        q.put("busy", job(f"b{i + 3}"))
        q.put("quiet", job(f"q{i + 1}"))
    # one of each in turn, in each pipeline's own order
    assert [c.relpath for c in q.claim_many(4)] in (
        ["b3", "q1", "b4", "q2"],
        ["q1", "b3", "q2", "b4"],
    )
    q.close()


def test_counts_by_pipeline(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "q")
    for i in range(4):
        q.put("a", job(f"f{i}", i))
    q.put("b", job("g", path="/" + "x" * 100_000))  # stored in a file of its own by diskcache
    claim = q.claim(skip={"b"})
    assert claim is not None
    q.dead(claim, "boom")
    q.claim(skip={"b"})
    assert q.counts_by_pipeline() == {
        "a": {"pending": 2, "leased": 1, "waiting": 0, "dead": 1},
        "b": {"pending": 1, "leased": 0, "waiting": 0, "dead": 0},
    }
    assert q.counts() == {"pending": 3, "leased": 1, "waiting": 0, "dead": 1}
    q.close()


def test_jobs_in_the_shared_ready_list_of_earlier_versions_are_still_claimed(
    tmp_path: Path,
) -> None:
    q = JobQueue(tmp_path / "q")
    q.put("a", job("f0"))
    q.put("b", job("g0"))
    # Move both references to the single ready list older versions used.
    cache = q._cache
    for lane in ("lane\x00a\x00", "lane\x00b\x00"):
        _key, value = cache.pull(prefix=lane)
        cache.push(value, prefix="ready")
    q.close()
    reopened = JobQueue(tmp_path / "q")
    # A held pipeline's job moves to its own list; the other is claimed.
    assert [c.relpath for c in reopened.claim_many(5, skip={"a"})] == ["g0"]
    assert [c.relpath for c in reopened.claim_many(5)] == ["f0"]
    reopened.close()


def test_a_held_pipeline_named_like_another_plus_a_suffix_stays_held(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "q")
    q.put("cam", job("a"))
    q.put("cam-2", job("b"))
    q.put("cam-2", job("c"))
    assert [c.relpath for c in q.claim_many(10, skip={"cam-2"})] == ["a"]
    assert [c.relpath for c in q.claim_many(10, skip={"cam"})] == ["b", "c"]
    q.close()


def test_records_of_one_state_oldest_first_with_a_limit(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "q")
    for name in ("a", "b", "c", "d"):
        q.put("p", job(name))
        time.sleep(0.002)
    for _ in range(3):
        claim = q.claim()
        assert claim is not None
        q.dead(claim, "boom")
    assert [r.relpath for r in q.records("dead")] == ["a", "b", "c"]
    assert [r.relpath for r in q.records("dead", limit=2)] == ["a", "b"]
    assert [r.relpath for r in q.records("pending")] == ["d"]
    assert [r.relpath for r in q.records(limit=3)] == ["a", "b", "c"]
    q.close()


def test_file_event_json_round_trips_every_field(tmp_path: Path) -> None:
    from dataclasses import fields

    from skyframe.events import FileEvent

    event = FileEvent("cam", tmp_path / "a b.jpg", "a b.jpg", 12, 34, "moved", 56)
    data = event.to_json()
    assert set(data) == {f.name for f in fields(FileEvent)}
    assert json.loads(json.dumps(data)) == data
    assert FileEvent.from_json(data) == event


# --- volatile jobs: handed out without a record, written only when they need one ----------


NO_JOBS = {"pending": 0, "leased": 0, "waiting": 0, "dead": 0}


def test_a_volatile_job_done_leaves_no_record(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "queue")
    claim = queue.volatile("p", job("a.jpg", 1), "1:1")
    assert claim is not None
    assert (claim.volatile, claim.attempts, claim.version) == (True, 0, "1:1")
    assert queue.counts() == {**NO_JOBS, "leased": 1}  # handed out, in this process
    assert queue.claim() is None  # it is in no ready list
    assert queue.volatile("p", job("a.jpg", 1), "1:1") is None  # one job per path
    queue.complete_many([claim])
    assert queue.counts() == NO_JOBS
    queue.close()
    rows = sqlite3.connect(tmp_path / "queue" / "cache.db").execute("SELECT count(*) FROM Cache")
    assert rows.fetchone() == (0,)  # nothing was ever written


def test_a_path_with_a_record_gets_no_volatile_job(queue: JobQueue) -> None:
    queue.put("p", job("a.jpg", 1), "1")
    assert queue.volatile("p", job("a.jpg", 2), "2") is None
    assert queue.volatile("other", job("a.jpg", 2), "2") is not None  # another pipeline's


def test_a_volatile_job_that_fails_gets_its_record_then(queue: JobQueue) -> None:
    claim = queue.volatile("p", job("a.jpg", 1), "1")
    assert claim is not None
    queue.retry(claim, "link down", delay=0.0)
    time.sleep(0.01)
    again = queue.claim()
    assert again is not None
    assert (again.relpath, again.job, again.attempts, again.volatile) == (
        "a.jpg",
        job("a.jpg", 1),
        1,
        False,
    )
    assert queue.put("p", job("a.jpg", 1), "1") is False  # its version was kept
    queue.dead(again, "refused")
    (record,) = queue.records("dead")
    assert (record.attempts, record.errors) == (2, ("link down", "refused"))


def test_a_volatile_job_released_waits_in_the_queue(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "queue")
    claim = queue.volatile("p", job("a.jpg", 1), "1")
    assert claim is not None
    queue.release(claim)
    queue.close()
    reopened = JobQueue(tmp_path / "queue")  # a later run finds it pending, no attempt counted
    again = reopened.claim()
    assert again is not None
    assert (again.relpath, again.job, again.attempts) == ("a.jpg", job("a.jpg", 1), 0)
    reopened.close()


def test_a_new_version_of_a_volatile_job_runs_after_it(queue: JobQueue) -> None:
    claim = queue.volatile("p", job("a.jpg", 1), "1")
    assert claim is not None
    assert queue.put("p", job("a.jpg", 2), "2") is True
    assert queue.claim() is None  # never two versions of one path at once
    assert queue.discard("p", "b.jpg") is False
    queue.complete(claim)
    again = queue.claim()
    assert again is not None
    assert (again.job, again.attempts) == (job(again.relpath, 2), 0)
    queue.complete(again)
    assert queue.counts() == NO_JOBS


def test_a_volatile_job_is_not_discarded_under_its_worker(queue: JobQueue) -> None:
    claim = queue.volatile("p", job("a.jpg", 1), "1")
    assert claim is not None
    assert queue.discard("p", "a.jpg") is False
    queue.complete(claim)
    assert queue.counts() == NO_JOBS


def test_each_kind_of_job_comes_back_as_it_went_in(queue: JobQueue) -> None:
    event = FileEvent("p", Path("/src/b/DJI_0001.JPG"), "b/DJI_0001.JPG", 7, 42, "created", 9)
    sent = [
        Upload(event=event, accepted=True),
        Move(event=FileEvent("p", Path("/src/c.jpg"), "c.jpg", 1, 2), moved_from="old/c.jpg"),
        Delete(relpath="gone.jpg"),
    ]
    for one in sent:
        assert queue.put("p", one, one.version)
        assert queue.put("p", one, one.version) is False  # the same version: nothing new
    claims = queue.claim_many(3)
    assert [c.job for c in claims] == sent
    assert [c.job.kind for c in claims] == ["upload", "move", "delete"]
    for claim in claims:
        queue.dead(claim, "no")
    assert [r.kind for r in queue.records("dead")] == ["upload", "move", "delete"]


def test_jobs_queued_by_earlier_versions_are_read() -> None:
    event = {"pipeline": "p", "path": "/s/a.jpg", "relpath": "a.jpg", "size": 1, "mtime_ns": 2}
    event |= {"kind": "scanned", "inode": 3}
    # An earlier version wrote a move as an upload with "moved_from".
    old_move = {"action": "upload", "event": event, "accepted": True, "moved_from": "b.jpg"}
    assert job_from_json(old_move) == Move(
        event=FileEvent.from_json(event), accepted=True, moved_from="b.jpg"
    )
    assert job_from_json({"event": event}) == Upload(event=FileEvent.from_json(event))
    assert job_from_json({"action": "delete", "relpath": "a.jpg"}) == Delete(relpath="a.jpg")
    for one in (Upload(event=FileEvent.from_json(event)), job_from_json(old_move)):
        assert job_from_json(json.loads(json.dumps(one.to_json()))) == one
    with pytest.raises(ValueError, match="unknown queued job 'copy'"):
        job_from_json({"action": "copy"})
    with pytest.raises(ValueError, match="lacks 'relpath'"):
        job_from_json({"action": "delete"})


def test_a_record_no_job_can_be_read_from_is_dead_lettered(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "queue")
    q.put("p", job("a"))
    q.put("p", job("b"))
    key = JobQueue._key("p", "a")
    with q.batch():  # as a newer version (or a hand) might have written it
        record = q._cache.get(key)
        q._cache.set(key, {**record, "payload": {"action": "teleport"}})
    claim = q.claim()
    assert claim is not None
    assert claim.relpath == "b"  # the other jobs go on
    (dead,) = q.records("dead")
    assert (dead.relpath, dead.kind) == ("a", None)
    assert dead.errors == ("cannot read the queued job: unknown queued job 'teleport'",)
    q.close()


# --- priority ---------------------------------------------------------------------------------


def test_higher_priority_jobs_are_claimed_first(queue: JobQueue) -> None:
    queue.put("p", job("video1.mp4"))
    queue.put("p", job("raw.dng", priority=LOW))
    queue.put("p", job("video2.mp4"))
    queue.put("p", job("photo1.jpg", priority=HIGH))
    queue.put("p", job("photo2.jpg", priority=HIGH))
    claims = [queue.claim() for _ in range(FAIR_SHARE - 1)]
    assert [(c.relpath, c.priority) for c in claims if c] == [
        ("photo1.jpg", HIGH),
        ("photo2.jpg", HIGH),
        ("video1.mp4", NORMAL),
    ]
    rest = queue.claim_many(5)
    # The fourth claim is the lowest level's turn.
    assert [c.relpath for c in rest] == ["raw.dng", "video2.mp4"]


def test_a_stream_of_high_jobs_does_not_starve_the_others(queue: JobQueue) -> None:
    queue.put("p", job("video.mp4"))
    for n in range(3 * FAIR_SHARE):
        queue.put("p", job(f"photo{n}.jpg", priority=HIGH))
    claimed = [c.relpath for c in queue.claim_many(FAIR_SHARE)]
    assert "video.mp4" in claimed  # within one round, however many photos wait
    assert len(claimed) == FAIR_SHARE


def test_min_priority_claims_only_urgent_jobs(queue: JobQueue) -> None:
    queue.put("p", job("video.mp4"))
    queue.put("q", job("photo.jpg", priority=HIGH))
    queue.put("p", job("log.txt", priority=HIGH))
    for _ in range(FAIR_SHARE):  # the fair share never applies to an urgent-only claim
        urgent = queue.claim_many(10, min_priority=HIGH)
        assert sorted(c.relpath for c in urgent) in ([], ["log.txt", "photo.jpg"])
    assert queue.claim_many(10, min_priority=HIGH) == []
    assert [c.relpath for c in queue.claim_many(10)] == ["video.mp4"]


def test_held_pipelines_stay_held_at_every_level(queue: JobQueue) -> None:
    queue.put("cam", job("a.jpg", priority=HIGH))
    queue.put("cam-2", job("b.jpg", priority=HIGH))
    queue.put("cam-2", job("c.mp4", priority=LOW))
    assert [c.relpath for c in queue.claim_many(10, skip={"cam-2"})] == ["a.jpg"]
    assert [c.relpath for c in queue.claim_many(10, skip={"cam"})] == ["b.jpg", "c.mp4"]


def test_priority_is_kept_through_retries_releases_and_a_crash(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "q")
    q.put("p", job("video.mp4"))
    q.put("p", job("photo.jpg", priority=HIGH))
    claim = q.claim()
    assert claim is not None
    assert claim.relpath == "photo.jpg"
    q.retry(claim, "link down", delay=0.0)
    q.release(q.claim())  # type: ignore[arg-type]
    again = q.claim()
    assert again is not None
    assert (again.relpath, again.priority) == ("photo.jpg", HIGH)
    q.close()  # "killed" while the photo is leased
    reopened = JobQueue(tmp_path / "q")
    first = reopened.claim()
    assert first is not None
    assert (first.relpath, first.priority) == ("photo.jpg", HIGH)
    reopened.close()


def test_a_volatile_claim_carries_its_priority(queue: JobQueue) -> None:
    claim = queue.volatile("p", job("photo.jpg", priority=HIGH), "v1")
    assert claim is not None
    assert claim.priority == HIGH
    queue.release(claim)  # it gets its record, in the high list
    queue.put("p", job("video.mp4"))
    assert [c.relpath for c in queue.claim_many(2)] == ["photo.jpg", "video.mp4"]


def test_a_queue_of_an_earlier_version_reads_as_normal_priority(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "q")
    q.put("p", job("old.jpg"))
    key = JobQueue._key("p", "old.jpg")
    record = q._cache.get(key)
    assert "priority" not in record["payload"]  # normal is not written: the shape stays
    assert "priority" not in record
    q.close()
    reopened = JobQueue(tmp_path / "q")
    reopened.put("p", job("new.jpg", priority=HIGH))
    claims = reopened.claim_many(5)
    assert [(c.relpath, c.priority) for c in claims] == [("new.jpg", HIGH), ("old.jpg", NORMAL)]
    reopened.close()


def test_priority_in_job_json() -> None:
    event = FileEvent("p", Path("/s/a.jpg"), "a.jpg", 1, 2)
    high = Upload(event=event, priority=HIGH)
    assert high.to_json()["priority"] == HIGH
    assert job_from_json(high.to_json()) == high
    move = Move(event=event, priority=LOW, moved_from="b.jpg")
    assert job_from_json(json.loads(json.dumps(move.to_json()))) == move
    plain = Upload(event=event).to_json()
    assert "priority" not in plain
    for odd in ("urgent", None, True, 1.5):  # written by hand, or by a newer version
        assert job_from_json({**plain, "priority": odd}).priority == NORMAL
    assert job_from_json({**plain, "priority": 7}).priority == HIGH  # clamped to the levels
    assert Delete(relpath="a.jpg").priority == NORMAL


def test_a_new_version_of_another_level_moves_to_its_list(queue: JobQueue) -> None:
    queue.put("p", job("grows.jpg", 1, priority=HIGH), version="1")
    queue.put("p", job("grows.jpg", 2, priority=NORMAL), version="2")  # now past small_first
    assert queue.claim(min_priority=HIGH) is None  # not an urgent job any more
    claim = queue.claim()
    assert claim is not None
    assert (claim.relpath, claim.priority) == ("grows.jpg", NORMAL)
    queue.complete(claim)
    assert queue.claim() is None
