"""Config hardening: alias bombs, sinks that would overwrite the config, values that make no
sense, header injection, weak API tokens and secrets in error messages."""

from __future__ import annotations

import os
import re
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import WriteConfig

from skyframe import config as config_module
from skyframe.cli import cli
from skyframe.config import MAX_VALUES, MIN_TOKEN_LENGTH, load_config
from skyframe.errors import ConfigError
from skyframe.pipeline import load_project
from skyframe.units import parse_duration, parse_rate, parse_size

GOOD = """\
state_dir: .state
pipelines:
  - name: survey
    source: {path: incoming, settle: 2s}
    sinks:
      - url: outbox
"""

SECRET = "hunter2-Secret-Value"


def refused(path: Path, position: tuple[int, int], key: str, pattern: str) -> ConfigError:
    """load_project refuses the config with one line naming file, line, column and key."""
    with pytest.raises(ConfigError) as info:
        load_project(path)
    error = info.value
    message = str(error)
    assert error.exit_code == 2
    assert "\n" not in message, message
    assert "\r" not in message, message
    assert message.startswith(f"{path}:{position[0]}:{position[1]}: {key}: "), message
    assert re.search(pattern, error.message), message
    return error


# --- 1. alias bombs --------------------------------------------------------------------------


def laughs(levels: int, fanout: int = 9) -> str:
    """The classic "billion laughs": each level a list of `fanout` aliases of the one above."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * fanout)}]"]
    for n in range(1, levels):
        lines.append(f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * fanout)}]")
    return "\n".join(lines) + "\n"


def test_billion_laughs_is_refused_fast_and_small(write_config: WriteConfig) -> None:
    text = laughs(9)  # 9 ** 9 = 387 million values once expanded, in about 550 bytes
    assert len(text) < 600
    path = write_config(text)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ConfigError) as info:
            load_config(path)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 5 * 1024 * 1024, f"{peak} bytes allocated"
    # a0..a4 come to 74,732 values; the first *a4 in a5 (66,430 more) crosses 100,000.
    message = str(info.value)
    assert message.startswith(f"{path}:6:10: a5[0]: alias *a4 makes the config hold more than ")
    assert f"{MAX_VALUES:,} values" in message
    assert "\n" not in message


def test_billion_laughs_exits_2_from_validate(write_config: WriteConfig) -> None:
    path = write_config(laughs(9))
    started = time.perf_counter()
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert time.perf_counter() - started < 2.0
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert re.match(
        rf"skyframe: error: {re.escape(str(path))}:6:10: a5\[0\]: alias \*a4 ", lines[0]
    )


BOMBS = [
    pytest.param(
        # block-style mappings whose values are aliases of the mapping above
        "m0: &m0 x\n"
        + "".join(
            f"m{n}: &m{n}\n" + "".join(f"  k{i}: *m{n - 1}\n" for i in range(10))
            for n in range(1, 8)
        ),
        r"m5\.k\d",
        r"\*m4",
        id="mapping-values",
    ),
    pytest.param(
        # merge keys: every level merges the one above and adds aliases of it
        "l0: &l0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8}\n"
        + "".join(
            f"l{n}: &l{n} {{<<: *l{n - 1}, "
            + ", ".join(f"x{i}: *l{n - 1}" for i in range(8))
            + "}\n"
            for n in range(1, 9)
        ),
        r"l\d\.(<<|x\d)",
        r"\*l\d",
        id="merge-key",
    ),
    pytest.param(
        # merge keys given lists of aliases only: the loaded data stays small (merging the same
        # keys again adds nothing), but walking the document for positions would not
        "m0: &m0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8, i: 9, j: 10}\n"
        + "".join(f"m{n}: &m{n} {{<<: [{', '.join([f'*m{n - 1}'] * 10)}]}}\n" for n in range(1, 8)),
        r"m\d\.<<\[\d\]",
        r"\*m\d",
        id="merge-key-list",
    ),
    pytest.param(
        # hidden where pydantic takes anything: a sink's options
        "pipelines:\n  - name: p\n    source: {path: incoming}\n    sinks:\n"
        "      - url: out\n        options:\n"
        + "".join(f"          {line}\n" for line in laughs(8).splitlines()),
        r"pipelines\[0\]\.sinks\[0\]\.options\.a5\[0\]",
        r"\*a4",
        id="inside-options",
    ),
]


@pytest.mark.parametrize(("text", "key", "alias"), BOMBS)
def test_alias_bomb_variants_are_refused(
    write_config: WriteConfig, text: str, key: str, alias: str
) -> None:
    path = write_config(text)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ConfigError) as info:
            load_config(path)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 5 * 1024 * 1024, f"{peak} bytes allocated"
    message = str(info.value)
    assert re.match(
        rf"{re.escape(str(path))}:\d+:\d+: {key}: alias {alias} makes the config hold more than",
        message,
    ), message


def test_recursive_alias_is_refused(write_config: WriteConfig) -> None:
    path = write_config("state_dir: x\nloop: &l [a, *l]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}:2:14: loop[1]: alias *l refers to a value that contains it: "
        "a config cannot contain itself"
    )


def test_recursive_merge_key_is_refused(write_config: WriteConfig) -> None:
    path = write_config("state_dir: x\nloop: &l {a: 1, <<: *l}\n")
    with pytest.raises(ConfigError, match=r":2:21: loop\.<<: alias \*l refers to a value"):
        load_config(path)


def test_deep_nesting_is_a_config_error(write_config: WriteConfig) -> None:
    path = write_config("state_dir: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"invalid YAML: nested too deeply") as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:1:")


def test_too_many_plain_values_are_refused(
    write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config_module, "MAX_VALUES", 50)  # 100,000 scalars take seconds to parse
    items = ", ".join(["1"] * 60)
    path = write_config(f"state_dir: x\nplugins: [{items}]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    # root, 2 keys, state_dir's value and the list make 5: the 46th item is the 51st value.
    assert str(info.value) == (
        f"{path}:2:{11 + 3 * 45}: plugins[45]: the config holds more than 50 values: "
        "refusing to load it"
    )


def test_ordinary_aliases_and_merge_keys_still_work(write_config: WriteConfig) -> None:
    path = write_config(
        """\
        retry: &retry {max_attempts: 3, initial: 2s, max: 1m}
        pipelines:
          - name: one
            source: &src {path: incoming, settle: 3s, recursive: false}
            sinks: [{url: outbox}]
            retry: *retry
          - name: two
            source: {<<: *src, settle: 1s}
            sinks: [{url: outbox2}]
        """
    )
    config = load_project(path).config
    assert config.pipelines[0].retry == config.retry
    assert config.pipelines[1].source.recursive is False
    assert config.pipelines[1].source.settle == 1.0


def test_an_expansion_just_under_the_limit_loads(write_config: WriteConfig) -> None:
    # The anchored list is 1,001 values; 98 aliases of it bring the config to about 99,200.
    items = ", ".join(["1"] * 1000)
    aliases = ", ".join(["*big"] * 98)
    path = write_config(GOOD + f"        options: {{big: &big [{items}], more: [{aliases}]}}\n")
    config = load_config(path)
    assert len(config.pipelines[0].sinks[0].options["more"]) == 98
    path.write_text(path.read_text().replace("*big]", "*big, *big]"))
    with pytest.raises(ConfigError, match=r"alias \*big makes the config hold more than"):
        load_config(path)


# --- 2. sinks that would write over the config, its plugins or its state ---------------------


def sink(url: str, extra: str = "") -> str:
    return extra + GOOD.replace("url: outbox", f'url: "{url}"')


@pytest.mark.parametrize(
    ("url", "pattern"),
    [
        (".", r"sink folder \S+ is the folder of the config file: .*rules\.py"),
        ("./", r"is the folder of the config file"),
        ("outbox/..", r"is the folder of the config file"),
        ("..", r"contains the folder of the config file \(\S+\)"),
        ("/", r"sink folder / contains the folder of the config file"),
        ("file://{dir}", r"is the folder of the config file"),
        ("{dir}", r"is the folder of the config file"),
    ],
)
def test_sink_on_the_config_folder_is_refused(
    write_config: WriteConfig, tmp_path: Path, url: str, pattern: str
) -> None:
    path = write_config(sink(url.format(dir=tmp_path)))
    refused(path, (6, 9), "pipelines[0].sinks[0].url", pattern)


def test_sink_symlinked_to_the_config_folder_is_refused(
    write_config: WriteConfig, tmp_path: Path
) -> None:
    (tmp_path / "alias").symlink_to(tmp_path)
    refused(write_config(sink("alias")), (6, 9), "pipelines[0].sinks[0].url", r"is the folder")


@pytest.mark.parametrize("url", ["", " ", "${SKYFRAME_TEST_EMPTY}", "file://"])
def test_empty_sink_url_is_its_own_error(
    write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("SKYFRAME_TEST_EMPTY", "")
    path = write_config(sink(url))
    if url == "file://":  # not empty as text, but it names the config folder
        refused(path, (6, 9), "pipelines[0].sinks[0].url", r"is the folder of the config file")
    else:
        refused(path, (6, 9), "pipelines[0].sinks[0].url", r"^the sink url is empty")


@pytest.mark.parametrize(
    ("plugins", "url", "pattern"),
    [
        (
            "[lib/plugins]",
            "lib/plugins",
            r"is the plugin folder \S+/lib/plugins: .*could run as a plugin",
        ),
        ("[lib/plugins]", "lib/plugins/out", r"is inside the plugin folder"),
        ("[lib/plugins]", "lib", r"contains the plugin folder"),
        ("[extra/one.py]", "extra", r"contains the plugin file \S+/extra/one\.py"),
    ],
)
def test_sink_near_a_plugin_is_refused(
    write_config: WriteConfig, tmp_path: Path, plugins: str, url: str, pattern: str
) -> None:
    (tmp_path / "lib" / "plugins").mkdir(parents=True)
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "one.py").write_text("")
    path = write_config(sink(url, f"plugins: {plugins}\n"))
    refused(path, (7, 9), "pipelines[0].sinks[0].url", pattern)


def test_sink_beside_a_plugin_file_is_allowed(write_config: WriteConfig, tmp_path: Path) -> None:
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "one.py").write_text("")
    load_project(write_config(sink("extra/out", "plugins: [extra/one.py]\n")))


@pytest.mark.parametrize(
    ("state_dir", "url", "relation"),
    [
        (".state", ".state", "is"),
        (".state", ".state/out", "is inside"),
        ("outbox/.state", "outbox", "contains"),
    ],
)
def test_sink_near_the_state_directory_is_refused(
    write_config: WriteConfig, state_dir: str, url: str, relation: str
) -> None:
    path = write_config(sink(url).replace("state_dir: .state", f"state_dir: {state_dir}"))
    refused(
        path,
        (6, 9),
        "pipelines[0].sinks[0].url",
        rf"^sink folder \S+ {relation} the state directory \S+: .*queue",
    )


def test_sinks_inside_the_config_folder_stay_allowed(
    write_config: WriteConfig, tmp_path: Path
) -> None:
    project = load_project(write_config(sink("outbox/sub")))
    assert project.pipelines[0].sinks[0].root == str(tmp_path.resolve() / "outbox" / "sub")


def test_validate_refuses_before_running_a_delivered_rules_py(
    write_config: WriteConfig, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    (tmp_path / "rules.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    path = write_config(sink("."))
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"skyframe: error: {path}:6:9: pipelines[0].sinks[0].url: sink folder "
        f"{tmp_path.resolve()} is the folder of the config file: a delivered file could "
        "replace skyframe.yaml, rules.py or processes.py, and run at the next start"
    )
    assert not marker.exists()


# --- 3. values that are accepted but make no sense -------------------------------------------

SOURCE = "source: {path: incoming, settle: 2s}"


NONSENSE = [
    (
        SOURCE,
        "source: {path: incoming, poll_interval: 0}",
        "4:30: pipelines[0].source.poll_interval",
        r"^must be longer than 0",
    ),
    (
        SOURCE,
        "source: {path: incoming, rescan: 0s}",
        "4:30: pipelines[0].source.rescan",
        r"^must be longer than 0",
    ),
    (
        SOURCE,
        "source: {path: incoming, settle: .nan}",
        "4:30: pipelines[0].source.settle",
        r"^invalid duration nan: not a finite number",
    ),
    (
        SOURCE,
        "source: {path: incoming, settle: .inf}",
        "4:30: pipelines[0].source.settle",
        r"^invalid duration inf: not a finite number",
    ),
    (
        SOURCE,
        "source: {path: incoming, settle: -.inf}",
        "4:30: pipelines[0].source.settle",
        r"^a duration cannot be negative",
    ),
    (
        SOURCE,
        "source: {path: incoming, settle: -1}",
        "4:30: pipelines[0].source.settle",
        r"^a duration cannot be negative",
    ),
    (
        SOURCE,
        f"source: {{path: incoming, settle: '{'9' * 400}s'}}",
        "4:30: pipelines[0].source.settle",
        r"not a finite number",
    ),
    (
        SOURCE,
        "source: {path: incoming, settle: 1000000000000}",
        "4:30: pipelines[0].source.settle",
        r"longer than 100 years",
    ),
    (
        "state_dir: .state",
        "state_dir: .state\nworkers: true",
        "2:1: workers",
        r"^expected a whole number, not true",
    ),
    (
        "url: outbox",
        "{url: outbox, concurrency: true}",
        "6:23: pipelines[0].sinks[0].concurrency",
        r"^expected a whole number, not true",
    ),
    (
        "state_dir: .state",
        "state_dir: .state\nretry: {max_attempts: false}",
        "2:9: retry.max_attempts",
        r"^expected a whole number, not false",
    ),
    (
        "state_dir: .state",
        "state_dir: .state\nretry: {initial: 0}",
        "2:9: retry.initial",
        r"^must be longer than 0",
    ),
    (
        "state_dir: .state",
        "state_dir: .state\nretry: {initial: 1h, max: 1s}",  # every delay would be 1 s
        "2:1: retry",
        r"^initial \(3600 s\) is longer than max \(1 s\), the longest delay",
    ),
    (
        "state_dir: .state",
        # a client given it failed every call, then held the run's exit for a minute
        "state_dir: .state\nexecutors: {x: {dask: nope}}",
        "2:17: executors.x.dask",
        r"^'nope' is not a scheduler's address: expected tcp://HOST:PORT",
    ),
    (
        "state_dir: .state",
        "state_dir: .state\nexecutors: {x: {dask: 'tcp://10.0.0.5'}}",
        "2:17: executors.x.dask",
        r"^'tcp://10.0.0.5' is not a scheduler's address",
    ),
    (
        "state_dir: .state",
        "state_dir: .state\nhistory: {retention: 0}",
        "2:11: history.retention",
        r"^must be longer than 0",
    ),
    (
        "state_dir: .state",
        "state_dir: .state\nhistory: {max_events: true}",
        "2:11: history.max_events",
        r"^expected a whole number",
    ),
    # A URL without its "//" would be a local folder of that name: the files would stay here.
    (
        "url: outbox",
        "url: 's3:survey-raw/site-7'",
        "6:9: pipelines[0].sinks[0].url",
        r"^'s3:survey-raw/site-7' would be a local folder of that name; a URL of s3 is "
        r"s3://survey-raw/site-7$",
    ),
    ("url: outbox", "url: 's3:'", "6:9: pipelines[0].sinks[0].url", r"s3://BUCKET/PATH$"),
    ("url: outbox", "url: 'sftp:/data'", "6:9: pipelines[0].sinks[0].url", r"is sftp://data$"),
    (
        "url: outbox",
        "url: 's3//raw/site-7'",
        "6:9: pipelines[0].sinks[0].url",
        r"is s3://raw/site-7$",
    ),
    ("url: outbox", "url: gs//raw", "6:9: pipelines[0].sinks[0].url", r"a URL of gs is gs://raw$"),
    # Rules whose options together let no file through.
    (
        SOURCE,
        SOURCE + "\n    rules: [{size: {min: 10MB, max: 1MB}}]",
        "5:14: pipelines[0].rules[0].size",
        r"^rule 'size' \(skyframe.builtin.rules:rule_size\): min \(10.0 MB\) is above max "
        r"\(1.0 MB\): no file would pass$",
    ),
    (
        SOURCE,
        SOURCE + "\n    rules: [{age: {min: 1d, max: 1h}}]",
        "5:14: pipelines[0].rules[0].age",
        r"^rule 'age' .*: min \(86400s\) is above max \(3600s\): no file would pass$",
    ),
    (
        SOURCE,
        SOURCE + "\n    rules: [{type: {}}]",
        "5:14: pipelines[0].rules[0].type",
        r"^rule 'type' .*: needs extensions or mime",
    ),
    (
        SOURCE,
        SOURCE + "\n    rules: [{include: {patterns: []}}]",
        "5:14: pipelines[0].rules[0].include",
        r"^rule 'include' .*: patterns is empty: no file would pass$",
    ),
    (
        SOURCE,
        SOURCE + "\n    rules: [{age: {max: 0}}]",
        "5:14: pipelines[0].rules[0].age",
        r"max must be longer than 0: no file is modified less than 0s ago$",
    ),
    (
        SOURCE,
        SOURCE + "\n    rules: [{include: {patterns: ['*.jpg', '']}}]",
        "5:14: pipelines[0].rules[0].include",
        r"an empty pattern \(or only /\) matches no file",
    ),
    (
        SOURCE,
        SOURCE + "\n    rules: [{type: {extensions: ['*.jpg']}}]",
        "5:14: pipelines[0].rules[0].type",
        r"extension '\*.jpg' matches no file: write it as jpg or .jpg, no glob$",
    ),
    (
        SOURCE,
        SOURCE + "\n    rules: [{type: {extensions: [tar.gz]}}]",
        "5:14: pipelines[0].rules[0].type",
        r"only the last one is compared \(write gz\)$",
    ),
    (
        SOURCE,
        SOURCE + "\n    rules: [{type: {mime: [image]}}]",
        "5:14: pipelines[0].rules[0].type",
        r"MIME type 'image' is type/subtype: image/jpeg, image/\*$",
    ),
    (
        SOURCE,
        SOURCE + "\n    processes: [{rename: {template: '../{name}'}}]",
        "5:27: pipelines[0].processes[0].rename.template",
        r"template '../{name}' gives no name a sink takes \(remote name '../x' contains '..'\)",
    ),
    (
        SOURCE,
        SOURCE + "\n    processes: [{rename: {template: '/{name}'}}]",
        "5:27: pipelines[0].processes[0].rename.template",
        r"template '/{name}' gives no name a sink takes \(remote name '/x' is absolute\)",
    ),
    (
        SOURCE,
        SOURCE + "\n    processes: [{sidecar: {suffix: /.}}]",
        "5:28: pipelines[0].processes[0].sidecar.suffix",
        r"suffix '/.' is added to the file's name",
    ),
    (
        "state_dir: .state",
        "state_dir: .state\nnotify: [{webhook: {url: 'http:///events'}}]",
        "2:11: notify[0].webhook",
        r"^a webhook URL is http:// or https://, a host and a path",
    ),
    (
        "state_dir: .state",
        "state_dir: .state\nnotify: [{webhook: {url: 'http://h:99999/x'}}]",
        "2:11: notify[0].webhook",
        r"^a webhook URL is http:// or https://, a host and a path",
    ),
    (
        "state_dir: .state",
        "state_dir: .state\nnotify: [{webhook: {url: 'https://h/x', events: []}}]",
        "2:11: notify[0].webhook",
        r"^events is empty: nothing would be sent",
    ),
    (
        "state_dir: .state",
        "state_dir: .state\nhistory: {max_events: 9223372036854775808}",
        "2:11: history.max_events",
        r"less than or equal to 1000000000",
    ),
    (
        "url: outbox",
        'url: outbox\n        name: "nas \\ud800"',
        "7:9: pipelines[0].sinks[0].name",
        r"^is not valid Unicode: a lone \\uD800-\\uDFFF escape",
    ),
    (
        SOURCE,
        SOURCE + "\n    rules: [inside]",
        "5:13: pipelines[0].rules[0].inside",
        r"^rule 'inside' \(skyframe.builtin.drone:rule_inside\): needs an area \(GeoJSON\) or "
        r"a box",
    ),
]


@pytest.mark.parametrize(("old", "new", "where", "pattern"), NONSENSE)
def test_nonsense_values_are_refused(
    write_config: WriteConfig, old: str, new: str, where: str, pattern: str
) -> None:
    path = write_config(GOOD.replace(old, new))
    match = re.fullmatch(r"(\d+):(\d+): (.*)", where)
    assert match
    line, column, key = match.groups()
    refused(path, (int(line), int(column)), key, pattern)


@pytest.mark.parametrize(
    ("key", "value"),
    [("flush_interval", "0"), ("timeout", "0s"), ("batch_size", "true"), ("buffer", "false")],
)
def test_nonsense_webhook_values_are_refused(
    write_config: WriteConfig, key: str, value: str
) -> None:
    path = write_config(f"notify:\n  - webhook: {{url: 'http://h/x', {key}: {value}}}\n" + GOOD)
    error = refused(path, (2, 34), f"notify[0].webhook.{key}", r"longer than 0|whole number")
    assert error.location is not None


def test_zero_where_zero_means_something_and_numbers_from_variables_still_load(
    write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SKYFRAME_TEST_WORKERS", "8")
    path = write_config(
        GOOD.replace("settle: 2s", "settle: 0").replace(
            "state_dir: .state",
            "state_dir: .state\nshutdown_grace: 0\nworkers: ${SKYFRAME_TEST_WORKERS}",
        )
    )
    config = load_project(path).config
    assert (config.workers, config.shutdown_grace, config.pipelines[0].source.settle) == (8, 0, 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 10**400, "9" * 400, "9" * 400 + "d"])
def test_parse_duration_refuses_what_is_not_a_finite_duration(bad: object) -> None:
    with pytest.raises(ValueError, match=r"^invalid duration .*(finite|100 years)"):
        parse_duration(bad)


@pytest.mark.parametrize("bad", ["9" * 400, "9" * 400 + "GB", float("nan"), float("inf")])
def test_parse_size_refuses_overflowing_sizes_with_a_value_error(bad: object) -> None:
    with pytest.raises(ValueError, match=r"^invalid size"):
        parse_size(bad)


@pytest.mark.parametrize(
    "bad", [10**400, -(10**400), float("nan"), float("-inf"), "9" * 400 + "MB/s"]
)
def test_parse_rate_refuses_overflowing_rates_with_a_value_error(bad: object) -> None:
    with pytest.raises(ValueError, match=r"rate"):
        parse_rate(bad)


# --- 4. webhook headers ----------------------------------------------------------------------


def webhook(headers: str) -> str:
    return (
        f"notify:\n  - webhook:\n      url: http://127.0.0.1:9/hook\n      headers: {headers}\n"
        + GOOD
    )


@pytest.mark.parametrize(
    ("headers", "key", "pattern"),
    [
        ('{X-Token: "abc\\r\\nX-Evil: 1"}', "X-Token", r"^the header value contains a control"),
        ('{X-Token: "abc\\ndef"}', "X-Token", r"control character"),
        ('{X-Token: "abc\\0def"}', "X-Token", r"^contains a NUL character"),
        ('{X-Token: "abc\\x1bdef"}', "X-Token", r"control character"),
        ('{"X Token": abc}', "X Token", r"^invalid header name 'X Token': use letters"),
        ('{"X-Token:": abc}', "X-Token:", r"^invalid header name"),
        ('{"": abc}', "", r"^invalid header name ''"),
    ],
)
def test_bad_webhook_headers_are_refused(
    write_config: WriteConfig, headers: str, key: str, pattern: str
) -> None:
    path = write_config(webhook(headers))
    full_key = "notify[0].webhook.headers" + (f".{key}" if key else "['']")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert "\r" not in message
    assert message.startswith(f"{path}:4:"), message
    assert f": {full_key}: " in message, message
    assert re.search(pattern, info.value.message), message
    assert "abc" not in info.value.message  # the value may be a secret


def test_header_with_a_newline_from_the_environment_names_the_key_not_the_value(
    write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SKYFRAME_TEST_HOOK_TOKEN", SECRET + "\n")
    path = write_config(webhook('{Authorization: "Bearer ${SKYFRAME_TEST_HOOK_TOKEN}"}'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}:4:17: notify[0].webhook.headers.Authorization: the header value contains a "
        "control character (CR, LF, NUL...): no request could carry it"
    )


def test_a_key_with_a_newline_stays_on_one_line(write_config: WriteConfig) -> None:
    path = write_config(webhook('{"X-\\nBad": abc}'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "\n" not in str(info.value)
    assert "headers['X-\\nBad']: invalid header name" in str(info.value)


def test_good_headers_load(write_config: WriteConfig) -> None:
    config = load_config(write_config(webhook('{X-Api-Key: "a\\tb c", Authorization: Bearer x}')))
    assert config.notify[0].webhook.headers == {"X-Api-Key": "a\tb c", "Authorization": "Bearer x"}


# --- 5. API tokens off loopback --------------------------------------------------------------


def api(listen: str, token: str | None) -> str:
    inner = f"listen: '{listen}'" + (f", token: '{token}'" if token is not None else "")
    return f"api: {{{inner}}}\n" + GOOD


@pytest.mark.parametrize("listen", ["0.0.0.0:8765", "[::]:8765", "192.168.1.10:0"])
def test_a_short_token_off_loopback_is_refused(write_config: WriteConfig, listen: str) -> None:
    token = "a" * (MIN_TOKEN_LENGTH - 1)
    path = write_config(api(listen, token))
    error = refused(
        path,
        (1, api(listen, token).index("token") + 1),
        "api.token",
        rf"needs a token of at least {MIN_TOKEN_LENGTH} characters, this one has 15",
    )
    assert token not in str(error)


def test_no_token_off_loopback_is_refused_at_the_api_key(write_config: WriteConfig) -> None:
    refused(write_config(api("0.0.0.0:8765", None)), (1, 1), "api.token", r"needs a token: set")


def test_tokens_that_are_accepted(write_config: WriteConfig) -> None:
    strong = "x" * MIN_TOKEN_LENGTH
    assert load_config(write_config(api("0.0.0.0:8765", strong))).api.token == strong
    assert load_config(write_config(api("127.0.0.1:8765", "a"))).api.token == "a"
    text = "api: {enabled: false, listen: '0.0.0.0:8765'}\n" + GOOD
    assert load_config(write_config(text)).api.token is None


def test_a_bad_listen_address_is_located_at_listen(write_config: WriteConfig) -> None:
    refused(write_config(api("nowhere", None)), (1, 7), "api.listen", r"listen must be host:port")


@pytest.mark.parametrize("listen", ["[::1:8765", "::1:8765", "[nowhere]:80", "[::1]x:80", "h:٨٠"])
def test_a_listen_address_that_is_not_host_port_is_refused(
    write_config: WriteConfig, listen: str
) -> None:
    # "[::1:5" listened on ::1 port 5; "::1:8765" read as host "::1"; Arabic-Indic digits
    # passed as a port.
    refused(write_config(api(listen, None)), (1, 7), "api.listen", r"listen must be host:port")


@pytest.mark.parametrize(
    ("listen", "address"),
    [("[::1]:8765", ("::1", 8765)), ("localhost:0", ("localhost", 0)), ("[::]:80", ("::", 80))],
)
def test_listen_addresses_that_are_accepted(
    write_config: WriteConfig, listen: str, address: tuple[str, int]
) -> None:
    token = "x" * MIN_TOKEN_LENGTH
    assert load_config(write_config(api(listen, token))).api.address == address


# --- 6. secrets in error messages -------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("settle: 2s", "settle: '${SKYFRAME_TEST_SECRET}'", "pipelines[0].source.settle"),
        ("state_dir: .state", "state_dir: .state\nbwlimit: ${SKYFRAME_TEST_SECRET}", "bwlimit"),
        (
            "state_dir: .state",
            "state_dir: .state\napi: {listen: '${SKYFRAME_TEST_SECRET}'}",
            "api.listen",
        ),
        (
            "state_dir: .state",
            "state_dir: .state\nnotify: [{webhook: {url: 'http://h/', "
            "events: ['${SKYFRAME_TEST_SECRET}']}}]",
            "notify[0].webhook",
        ),
        (
            "state_dir: .state",
            "state_dir: .state\nnotify: [{webhook: {url: '${SKYFRAME_TEST_SECRET}'}}]",
            "notify[0].webhook",
        ),
        (
            "    sinks:",
            "    rules: [{size: {min: '${SKYFRAME_TEST_SECRET}'}}]\n    sinks:",
            "pipelines[0].rules[0].size.min",
        ),
        ("url: outbox", "url: 'outbox'\n        name: [oops, '${SKYFRAME_TEST_SECRET}']", ""),
    ],
)
def test_a_secret_in_the_wrong_key_is_never_echoed(
    write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch, old: str, new: str, key: str
) -> None:
    monkeypatch.setenv("SKYFRAME_TEST_SECRET", SECRET)
    path = write_config(GOOD.replace(old, new))
    with pytest.raises(ConfigError) as info:
        load_project(path)
    message = str(info.value)
    assert SECRET not in message
    assert message.startswith(f"{path}:"), message
    assert f": {key}" in message, message


def test_a_short_secret_quoted_in_a_message_is_hidden_too(
    write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SKYFRAME_TEST_SECRET", "x9z")
    path = write_config(GOOD.replace("settle: 2s", "settle: '${SKYFRAME_TEST_SECRET}'"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}:4:30: pipelines[0].source.settle: invalid duration '***': "
        "use seconds or units, e.g. 500ms, 2s, 10m, 1h30m"
    )


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (
            "notify: [{webhook: {url: 'ftp://pilot:PASSWORD@files.example/x'}}]\n" + GOOD,
            "notify[0].webhook",
        ),
        (
            GOOD.replace("url: outbox", "url: 'sftp://pilot:PASSWORD@/data'"),
            "pipelines[0].sinks[0].url",
        ),
        (
            GOOD.replace("url: outbox", "url: 'nosuchproto://pilot:PASSWORD@host/x'"),
            "pipelines[0].sinks[0].url",
        ),
    ],
)
def test_url_passwords_are_redacted_in_errors(
    write_config: WriteConfig, text: str, key: str
) -> None:
    path = write_config(text)
    with pytest.raises(ConfigError) as info:
        load_project(path)
    message = str(info.value)
    assert "PASSWORD" not in message
    assert f": {key}: " in message
    if "ftp://" in text or "sftp://" in text:
        assert "pilot:***@" in message, message


def test_url_password_from_the_environment_is_redacted(
    write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SKYFRAME_TEST_HOOK", f"ftp://pilot:{SECRET}@files.example/x")
    path = write_config("notify: [{webhook: {url: '${SKYFRAME_TEST_HOOK}'}}]\n" + GOOD)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert SECRET not in str(info.value)
    assert str(info.value).startswith(f"{path}:1:11: notify[0].webhook: a webhook URL is http")


# --- 7. paths that cannot be looked at, and files that are not configs ----------------------


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        ("{path: incoming, settle: 2s}", "{path: loop}", "4:14: pipelines[0].source.path"),
        ("url: outbox", "url: loop", "6:9: pipelines[0].sinks[0].url"),
        ("state_dir: .state", "state_dir: loop", "1:1: state_dir"),
        ("state_dir: .state", "state_dir: .state\nplugins: [loop]", "2:11: plugins[0]"),
        (
            "state_dir: .state",
            "state_dir: .state\nlog_file: {path: ../loop/x}",
            "2:12: log_file.path",
        ),
    ],
)
def test_a_loop_of_symbolic_links_is_a_config_error(
    write_config: WriteConfig, tmp_path: Path, old: str, new: str, where: str
) -> None:
    (tmp_path / "loop").symlink_to("loop")
    line, column, key = re.fullmatch(r"(\d+):(\d+): (.*)", where).groups()  # type: ignore[union-attr]
    path = write_config(GOOD.replace(old, new))
    refused(path, (int(line), int(column)), key, r"/loop(/x)?: a loop of symbolic links$")


def test_a_name_too_long_is_a_config_error(write_config: WriteConfig) -> None:
    path = write_config(GOOD.replace("path: incoming,", f"path: {'x' * 300},"))
    refused(path, (4, 14), "pipelines[0].source.path", r"the name is too long for this system$")


def test_a_folder_that_may_not_be_entered_is_a_config_error(
    write_config: WriteConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As root (CI) permissions do not hold: the refusal the kernel would give is stood in for.
    locked = tmp_path / "locked"
    real_stat = os.stat

    def stat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        if str(path).startswith(str(locked)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(config_module.os, "stat", stat)
    path = write_config(GOOD.replace("url: outbox", "url: locked/outbox"))
    refused(path, (6, 9), "pipelines[0].sinks[0].url", r"permission denied \(a folder on the way")


@pytest.mark.parametrize("special", ["fifo", "/dev/zero", "/dev/null"])
def test_a_config_path_that_is_no_regular_file_is_refused_not_read(
    tmp_path: Path, special: str
) -> None:
    path = Path(special)
    if special == "fifo":
        path = tmp_path / "skyframe.yaml"
        os.mkfifo(path)  # reading it would wait for a writer for ever
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(load_config, path)
        try:
            error = loading.exception(timeout=20)
        except FuturesTimeout:
            with path.open("w"):  # a writer that closes at once: the read ends
                pass
            pytest.fail(f"load_config({path}) was still reading after 20 s")
    assert isinstance(error, ConfigError)
    assert str(error).startswith("config path is not a regular file: ")


def test_a_huge_config_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "skyframe.yaml"
    with path.open("wb") as f:
        f.truncate(config_module.MAX_CONFIG_BYTES + 1)
    with pytest.raises(ConfigError, match=r"is over 10 MB: is it the right file\?$"):
        load_config(path)


@pytest.mark.parametrize(
    ("log_path", "pattern"),
    [
        ("../skyframe.yaml", r"would write over .*skyframe.yaml$"),
        ("../rules.py", r"would write over .*rules.py$"),
        ("../incoming/skyframe.log", r"is inside the source folder .*incoming: it would be sent"),
        ("../outbox/skyframe.log", r"is inside the sink folder .*outbox, among delivered files$"),
    ],
)
def test_a_log_file_that_would_write_over_or_be_sent_is_refused(
    write_config: WriteConfig, log_path: str, pattern: str
) -> None:
    # The log lines went into the config (which then no longer loaded), or were delivered.
    path = write_config(
        GOOD.replace("state_dir: .state", f"state_dir: .state\nlog_file: {{path: {log_path}}}")
    )
    refused(path, (2, 12), "log_file.path", pattern)


def test_log_files_that_are_accepted(write_config: WriteConfig) -> None:
    for value in ("true", "{path: logs/skyframe.log}", "{path: ../skyframe-log.txt}"):
        path = write_config(
            GOOD.replace("state_dir: .state", f"state_dir: .state\nlog_file: {value}")
        )
        assert load_project(path).config.log_path is not None
