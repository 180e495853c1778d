"""``skyframe test``: pipeline tests in YAML run the real rules and processes, send nothing,
and show what differed."""

from __future__ import annotations

import hashlib
import tempfile
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from helpers import REPO, make_file, skyframe, tree_files, write_plugin

from skyframe.cli import cli

CONFIG = """
state_dir: state
pipelines:
  - name: photos
    source: {path: incoming}
    rules:
      - ignore: {patterns: ["*.bak"]}
      - no_drafts
      - size: {min: 1B, max: 1GB}
    processes:
      - checksum
      - stamp
      - sidecar
    sinks:
      - {url: outbox, name: nas}
      - {url: outbox2}
  - name: logs
    source: {path: logs}
    sinks: [{url: outbox-logs}]
"""

RULES = '''
from skyframe import FileEvent, rule


@rule
def rule_no_drafts(event: FileEvent) -> bool | str:
    """Refuse drafts."""
    return "draft" not in event.name or f"{event.name} is a draft"
'''

PROCESSES = '''
from skyframe import Job, ProcessError, process


@process
def process_stamp(job: Job) -> None:
    """Name files by modification date; record their size, time and a position."""
    if job.event.name.startswith("broken"):
        raise ProcessError("cannot read the flight number")
    job.meta["bytes"] = job.event.size
    job.meta["mtime"] = job.event.mtime.isoformat()
    job.meta["where"] = {"lat": 1 / 3, "lon": 2 / 3}
    job.remote_name = f"{job.event.mtime:%Y-%m-%d}/{job.relpath}"
'''

PASSING = f"""
tolerance: 1.0e-6
tests:
  - name: a photo is named by its modification date
    pipeline: photos
    file: {{path: f1/a.jpg, content: abc, mtime: 2024-05-17T10:15:02Z}}
    expect:
      accepted: true
      remote: 2024-05-17/f1/a.jpg
      derived: [2024-05-17/f1/a.jpg.json]
      meta:
        bytes: 3
        sha256: {hashlib.sha256(b"abc").hexdigest()}
        mtime: 2024-05-17T10:15:02Z    # a YAML time, against the text the process wrote
        where: {{lat: 0.333333, lon: 0.666667}}
        photo: null                    # absent
  - name: every sink gets the same name
    pipeline: photos
    file: {{path: b.jpg, size: 1KB, mtime: 2024-01-02}}
    expect:
      remote: {{nas: 2024-01-02/b.jpg, outbox2: 2024-01-02/b.jpg}}
      meta: {{bytes: 1000}}
  - name: a fixture is copied in
    pipeline: photos
    file: {{path: c.jpg, fixture: data/c.jpg, mtime: 1700000000}}
    expect: {{meta: {{bytes: 5}}, remote: 2023-11-14/c.jpg}}
  - name: drafts are refused
    pipeline: photos
    file: {{path: draft-1.jpg, content: x}}
    expect:
      accepted: false
      rejected_by: no_drafts
      reason: is a draft
      reason_matches: '^draft-1\\.jpg is a'
  - name: empty files are refused
    pipeline: photos
    file: {{path: empty.jpg}}
    expect: {{rejected_by: size, reason: below the minimum}}
  - name: a broken file fails in a process
    pipeline: photos
    file: {{path: broken.jpg, content: x}}
    expect: {{error: cannot read the flight number}}
  - name: logs go as they are
    pipeline: logs
    file: {{path: day1/log.txt, content: hello}}
    expect: {{remote: day1/log.txt, derived: [], meta: {{}}}}
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project of two pipelines with a rule and a process of its own; the current folder."""
    root = tmp_path / "project"
    write_plugin(root, "skyframe.yaml", CONFIG)
    write_plugin(root, "rules.py", RULES)
    write_plugin(root, "processes.py", PROCESSES)
    (root / "incoming").mkdir()
    (root / "logs").mkdir()
    make_file(root, "data/c.jpg", b"12345")
    monkeypatch.chdir(root)
    return root


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, ["test", "skyframe.yaml", *args])


def write_tests(project: Path, text: str, name: str = "skyframe.tests.yaml") -> Path:
    path = project / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def test_passing_cases_print_ok_and_exit_0(project: Path) -> None:
    write_tests(project, PASSING)
    result = run()
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "ok    a photo is named by its modification date",
        "ok    every sink gets the same name",
        "ok    a fixture is copied in",
        "ok    drafts are refused",
        "ok    empty files are refused",
        "ok    a broken file fails in a process",
        "ok    logs go as they are",
    ]
    assert result.stderr == "test: 7 passed, 0 failed (skyframe.tests.yaml)\n"


def test_the_example_project_passes_its_own_tests() -> None:
    """What CI proves: the repository's example ships tests of its rules and processes."""
    before = {name: (REPO / name).exists() for name in (".skyframe", "outbox")}
    result = skyframe(REPO, "test", "skyframe.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) >= 10
    assert all(line.startswith("ok    ") for line in lines), result.stdout
    assert f"test: {len(lines)} passed, 0 failed (skyframe.tests.yaml)" in result.stderr
    for name, existed in before.items():
        assert existed or not (REPO / name).exists(), f"skyframe test created {name}"


def test_nothing_is_written_to_the_state_dir_or_the_sinks(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_tests(project, PASSING)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    before = _project_files(project)

    assert run().exit_code == 0

    assert _project_files(project) == before
    for folder in ("state", "outbox", "outbox2", "outbox-logs"):
        assert not (project / folder).exists(), folder
    assert tree_files(project / "incoming") == {}  # the real source is not used either
    assert list(scratch.iterdir()) == []  # the temporary source folders are gone


def _project_files(root: Path) -> dict[str, bytes]:
    return {k: v for k, v in tree_files(root).items() if "__pycache__" not in k}


FAILURES = [
    pytest.param(
        "{path: a.jpg, content: x}",
        "{accepted: false}",
        ["accepted:", "- expected: rejected", '+ actual:   accepted -> "'],
        id="accepted-not-rejected",
    ),
    pytest.param(
        "{path: draft.jpg, content: x}",
        "{remote: draft.jpg}",
        ["accepted:", "- expected: accepted", '+ actual:   rejected by no_drafts: "draft.jpg is'],
        id="rejected-not-accepted",
    ),
    pytest.param(
        "{path: draft.jpg, content: x}",
        "{rejected_by: size}",
        ["rejected_by:", '- expected: "size"', '+ actual:   "no_drafts"'],
        id="rejected-by",
    ),
    pytest.param(
        "{path: draft.jpg, content: x}",
        "{reason: too small}",
        ["reason:", '- expected: containing "too small"', '+ actual:   "draft.jpg is a draft"'],
        id="reason",
    ),
    pytest.param(
        "{path: draft.jpg, content: x}",
        "{reason_matches: '^a draft'}",
        ["reason_matches:", "- expected: matching /^a draft/", '+ actual:   "draft.jpg is a'],
        id="reason-matches",
    ),
    pytest.param(
        "{path: a.jpg, content: x, mtime: 2024-05-17T00:00:00Z}",
        "{remote: 2024-05-18/a.jpg}",
        ["remote:", '- expected: "2024-05-18/a.jpg"', '+ actual:   "2024-05-17/a.jpg"'],
        id="remote",
    ),
    pytest.param(
        "{path: a.jpg, content: x, mtime: 2024-05-17T00:00:00Z}",
        "{remote: {nas: 2024-05-17/a.jpg, archive: 2024-05-17/a.jpg}}",
        [
            "remote[archive]:",
            '- expected: "2024-05-17/a.jpg"',
            "+ actual:   no sink named 'archive' (the pipeline has: nas, outbox2)",
        ],
        id="remote-unknown-sink",
    ),
    pytest.param(
        "{path: a.jpg, content: x, mtime: 2024-05-17T00:00:00Z}",
        "{derived: [2024-05-17/a.jpg.thumb.jpg]}",
        [
            "derived:",
            '- expected: ["2024-05-17/a.jpg.thumb.jpg"]',
            '+ actual:   ["2024-05-17/a.jpg.json"]',
        ],
        id="derived",
    ),
    pytest.param(
        "{path: a.jpg, content: x}",
        "{meta: {where: {lat: 0.3334}}}",
        [
            "meta.where.lat (tolerance 1e-09):",
            "- expected: 0.3334",
            "+ actual:   0.3333333333333333",
        ],
        id="meta-number",
    ),
    pytest.param(
        "{path: a.jpg, content: x}",
        "{meta: {bytes: 2, flight: f1}}",
        [
            "meta.bytes:",
            "- expected: 2",
            "+ actual:   1",
            "meta.flight:",
            '- expected: "f1"',
            "+ actual:   (missing)",
        ],
        id="meta-missing-key",
    ),
    pytest.param(
        "{path: a.jpg, content: x}",
        "{error: cannot read}",
        ["error:", '- expected: an error containing "cannot read"', "+ actual:   accepted -> "],
        id="error-expected",
    ),
    pytest.param(
        "{path: broken.jpg, content: x}",
        "{accepted: true}",
        ["accepted:", "- expected: accepted", "+ actual:   error: cannot read the flight number"],
        id="error-unexpected",
    ),
]


@pytest.mark.parametrize(("file", "expect", "diff"), FAILURES)
def test_each_kind_of_failure_shows_what_differed_and_exits_1(
    project: Path, file: str, expect: str, diff: list[str]
) -> None:
    write_tests(
        project,
        f"""
        tests:
          - name: passes
            pipeline: logs
            file: {{path: x.log, content: x}}
            expect: {{remote: x.log}}
          - name: the case
            pipeline: photos
            file: {file}
            expect: {expect}
        """,
    )
    result = run()
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "ok    passes"
    assert lines[1] == "FAIL  the case  (skyframe.tests.yaml:6, pipeline photos)"
    shown = [line.strip() for line in lines[2:]]
    for expected in diff:
        assert any(line.startswith(expected) for line in shown), (expected, shown)
    assert len(shown) == len(diff)
    assert result.stderr == "test: 1 passed, 1 failed (skyframe.tests.yaml)\n"


BAD_FILES = [
    pytest.param(
        "tests:\n  - name: a\n    file: {path: a.jpg, sise: 5}\n    expect: {}\n",
        "skyframe.tests.yaml:3:25: tests[0].file.sise: unknown key 'sise': did you mean 'size'?",
        id="unknown-key",
    ),
    pytest.param(
        "tests:\n  - name: a\n    file: {path: a.jpg}\n",
        "skyframe.tests.yaml:2:5: tests[0]: missing required key 'expect'",
        id="missing-key",
    ),
    pytest.param(
        "tests:\n  - name: a\n    file: {path: a.jpg, size: 5XB}\n    expect: {}\n",
        "skyframe.tests.yaml:3:25: tests[0].file.size: invalid size '5XB'",
        id="bad-size",
    ),
    pytest.param(
        "tests:\n  - name: a\n    file: {path: a.jpg, size: 1, content: x}\n    expect: {}\n",
        "skyframe.tests.yaml:3:5: tests[0].file: give one of size, content or fixture, "
        "not size and content",
        id="size-and-content",
    ),
    pytest.param(
        "tests:\n  - name: a\n    file: {path: a.jpg, mtime: yesterday}\n    expect: {}\n",
        "skyframe.tests.yaml:3:25: tests[0].file.mtime: expected a time such as",
        id="bad-mtime",
    ),
    pytest.param(
        "tests:\n  - name: a\n    file: {path: ../a.jpg}\n    expect: {}\n",
        "skyframe.tests.yaml:3:12: tests[0].file.path: '../a.jpg' is not a path relative",
        id="path-outside",
    ),
    pytest.param(
        "tests:\n  - name: a\n    pipeline: logs\n    file: {path: a.jpg, fixture: nope.jpg}\n"
        "    expect: {}\n",
        "skyframe.tests.yaml:4:25: tests[0].file.fixture: fixture nope.jpg not found",
        id="no-fixture",
    ),
    pytest.param(
        "tests:\n  - name: a\n    pipeline: foto\n    file: {path: a.jpg}\n    expect: {}\n",
        "skyframe.tests.yaml:3:5: tests[0].pipeline: no pipeline named 'foto'",
        id="unknown-pipeline",
    ),
    pytest.param(
        "tests:\n  - name: a\n    file: {path: a.jpg}\n    expect: {}\n",
        "skyframe.tests.yaml:2:5: tests[0]: which pipeline? add pipeline: (one of photos, logs)",
        id="which-pipeline",
    ),
    pytest.param(
        "tests:\n  - name: a\n    pipeline: logs\n    file: {path: a.jpg}\n"
        "    expect: {accepted: true, rejected_by: size}\n",
        "skyframe.tests.yaml:5:5: tests[0].expect: rejected_by says the file is rejected",
        id="contradiction",
    ),
    pytest.param(
        "tests:\n  - name: a\n    pipeline: logs\n    file: {path: a.jpg}\n"
        "    expect: {reason_matches: '('}\n",
        "skyframe.tests.yaml:5:14: tests[0].expect.reason_matches: invalid regular expression",
        id="bad-regex",
    ),
    pytest.param(
        "tests:\n  - name: a\n    pipeline: logs\n    file: {path: a.jpg}\n    expect: {}\n"
        "  - name: a\n    pipeline: logs\n    file: {path: b.jpg}\n    expect: {}\n",
        "skyframe.tests.yaml:6:5: tests[1]: two tests named 'a' (the other at line 2)",
        id="same-name",
    ),
    pytest.param(
        "tests:\n  - name: a\n    name: b\n",
        "skyframe.tests.yaml:3:5: tests[0].name: duplicate key",
        id="duplicate-key",
    ),
    pytest.param(
        "tests:\n  - name: a\n    file: {path: a.jpg\n",
        "skyframe.tests.yaml:4:1: invalid YAML:",
        id="bad-yaml",
    ),
    pytest.param("tests: []\n", "skyframe.tests.yaml:1:1: tests: the list of tests is empty"),
    pytest.param("- a\n", "skyframe.tests.yaml:1:1: the test file must be a mapping", id="list"),
    pytest.param("", "skyframe.tests.yaml:1:1: the test file is empty", id="empty"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_a_bad_test_file_is_one_line_naming_file_and_line(
    project: Path, text: str, message: str
) -> None:
    (project / "skyframe.tests.yaml").write_text(text, encoding="utf-8")
    result = run()
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith(f"skyframe: error: {message}"), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_several_problems_are_a_line_each(project: Path) -> None:
    write_tests(
        project,
        """
        tests:
          - name: a
            file: {path: /a.jpg}
            expect: {remote: 5}
        """,
    )
    result = run()
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "skyframe: error: skyframe.tests.yaml:3:12: tests[0].file.path: '/a.jpg' is not a path "
        "relative to the source folder (no leading /, no '..', no backslash or control "
        "character)",
        "skyframe: error: skyframe.tests.yaml:4:14: tests[0].expect.remote: expected a remote "
        "name, or a mapping of sink name to remote name",
    ]


def test_without_a_test_file_it_says_where_to_write_one(project: Path) -> None:
    result = run()
    assert result.exit_code == 2
    assert result.stderr == (
        "skyframe: error: no tests for skyframe.yaml: write them in skyframe.tests.yaml "
        "(see docs/testing.md), or name a file or folder with --tests\n"
    )


def test_a_config_error_comes_first(project: Path) -> None:
    write_tests(project, PASSING)
    (project / "skyframe.yaml").write_text("pipelines: []\n", encoding="utf-8")
    result = run()
    assert result.exit_code == 2
    assert result.stderr.startswith("skyframe: error: skyframe.yaml:1:1: pipelines: ")


def test_tests_from_a_folder_and_filtered_by_name(project: Path) -> None:
    write_tests(project, PASSING, "pipeline-tests/photos.yaml")
    make_file(project, "pipeline-tests/data/c.jpg", b"12345")  # fixtures: beside the test file
    write_tests(
        project,
        """
        tests:
          - name: a log with a draft in its name goes too
            pipeline: logs
            file: {path: draft.log, content: x}
            expect: {remote: draft.log}
        """,
        "pipeline-tests/more/logs.yml",
    )
    result = run("--tests", "pipeline-tests", "-k", "DRAFT")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "ok    a log with a draft in its name goes too",
        "ok    drafts are refused",
    ]
    assert result.stderr == (
        "test: 2 passed, 0 failed, 6 deselected "
        "(pipeline-tests/more/logs.yml, pipeline-tests/photos.yaml)\n"
    )

    none = run("-t", "pipeline-tests", "-k", "nothing like it")
    assert none.exit_code == 1
    assert none.stderr.startswith("test: no case of 8 matches 'nothing like it'")


def test_a_single_pipeline_needs_no_name_and_a_case_can_set_its_tolerance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_plugin(
        tmp_path, "site.yml", "pipelines: [{name: p, source: {path: in}, sinks: [{url: out}]}]"
    )
    write_plugin(
        tmp_path,
        "processes.py",
        '''
        from skyframe import Job, process


        @process
        def process_pi(job: Job) -> None:
            """Record pi."""
            job.meta["pi"] = 3.14159265
        ''',
    )
    (tmp_path / "in").mkdir()
    config = (tmp_path / "site.yml").read_text(encoding="utf-8")
    (tmp_path / "site.yml").write_text(
        config.replace("sinks:", "processes: [pi], sinks:"), encoding="utf-8"
    )
    write_tests(
        tmp_path,
        """
        tests:
          - name: close enough
            file: {path: a}
            expect: {meta: {pi: 3.14}, tolerance: 0.01}
          - name: not that close
            file: {path: a}
            expect: {meta: {pi: 3.14}}
        """,
        "site.tests.yml",
    )
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["test", "site.yml"])
    assert result.exit_code == 1, result.output
    assert result.stdout.splitlines() == [
        "ok    close enough",
        "FAIL  not that close  (site.tests.yml:5, pipeline p)",
        "      meta.pi (tolerance 1e-09):",
        "        - expected: 3.14",
        "        + actual:   3.14159265",
    ]
