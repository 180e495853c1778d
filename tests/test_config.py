"""Config loading: positions in every error, env interpolation, options checked before a run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import WriteConfig

from skyframe.config import interpolate, load_config
from skyframe.errors import ConfigError
from skyframe.pipeline import load_project

GOOD = """\
state_dir: .state
pipelines:
  - name: survey
    source: {path: incoming, settle: 2s}
    rules:
      - ignore: {patterns: ["*.bak"]}
      - size: {min: 1B, max: 100GB}
    processes:
      - checksum: {algo: sha256}
    sinks:
      - url: outbox
"""


def test_good_config_loads(write_config: WriteConfig) -> None:
    project = load_project(write_config(GOOD))
    config = project.config
    assert config.state_path == config.base_dir / ".state"
    pipeline = project.pipelines[0]
    assert [r.name for r in pipeline.rules] == ["ignore", "size"]
    assert pipeline.rules[1].options == {"min": 1, "max": 100 * 1000**3}
    assert config.pipelines[0].source.settle == 2.0
    assert pipeline.sinks[0].root == str(config.base_dir / "outbox")


def test_default_ignore_rule_is_added(write_config: WriteConfig) -> None:
    project = load_project(
        write_config(GOOD.replace('      - ignore: {patterns: ["*.bak"]}\n', ""))
    )
    assert [r.name for r in project.pipelines[0].rules] == ["ignore", "size"]


# Each case: the YAML, then (line, column) and a regex the message must match. The key named in
# the message is part of the regex.
BAD_CONFIGS = [
    pytest.param(
        GOOD.replace("state_dir: .state", "state_dri: .state"),
        (1, 1),
        r"state_dri: unknown key 'state_dri': did you mean 'state_dir'\? "
        r"\(expected one of: state_dir, plugins",
        id="unknown-top-key",
    ),
    pytest.param(
        GOOD.replace("settle: 2s", "settle: 2 weeks"),
        (4, 30),
        r"pipelines\[0\]\.source\.settle: invalid duration '2 weeks'",
        id="bad-duration",
    ),
    pytest.param(
        GOOD.replace("      - url: outbox", "      - {url: outbox, bwlimit: 2MB}"),
        (11, 23),
        r"pipelines\[0\]\.sinks\[0\]\.bwlimit: invalid rate '2MB': use a size per second",
        id="rate-without-per-second",
    ),
    pytest.param(
        GOOD.replace("      - url: outbox", "      - {url: outbox, bwlimit: 10Mb/s}"),
        (11, 23),
        r"bwlimit: invalid rate '10Mb/s'",
        id="ambiguous-rate",
    ),
    pytest.param(
        GOOD.replace("max: 100GB", "max: 100XB"),
        (7, 25),
        r"pipelines\[0\]\.rules\[1\]\.size\.max: rule 'size' "
        r"\(skyframe\.builtin\.rules:rule_size\): option 'max': invalid size '100XB'",
        id="bad-size-option",
    ),
    pytest.param(
        GOOD.replace("min: 1B", "mn: 1B"),
        (7, 16),
        r"pipelines\[0\]\.rules\[1\]\.size\.mn: .*unknown option 'mn' \(accepted: min, max\)",
        id="unknown-option",
    ),
    pytest.param(
        GOOD.replace("algo: sha256", "algo: crc32"),
        (9, 20),
        r"processes\[0\]\.checksum\.algo: process 'checksum' .*"
        r"option 'algo': Input should be 'sha256'",
        id="bad-literal-option",
    ),
    pytest.param(
        GOOD.replace("- size: {min: 1B, max: 100GB}", "- sise"),
        (7, 9),
        r"pipelines\[0\]\.rules\[1\]: unknown rule 'sise' \(did you mean 'size'\?\)",
        id="unknown-rule",
    ),
    pytest.param(
        GOOD.replace("- checksum: {algo: sha256}", "- rename"),
        (9, 9),
        r"processes\[0\]\.rename: process 'rename' .*missing required option 'template'",
        id="missing-option",
    ),
    pytest.param(
        GOOD.replace("      - url: outbox\n", ""),
        (10, 5),
        r"pipelines\[0\]\.sinks: Input should be a valid list",
        id="no-sinks",
    ),
    pytest.param(
        GOOD.replace("      - url: outbox\n", "      []\n").replace(
            "sinks:\n      []", "sinks: []"
        ),
        (10, 5),
        r"pipelines\[0\]\.sinks: List should have at least 1 item",
        id="empty-sinks",
    ),
    pytest.param(
        GOOD.replace("    sinks:\n      - url: outbox\n", ""),
        (3, 5),
        r"pipelines\[0\]: missing required key 'sinks'",
        id="missing-sinks",
    ),
    pytest.param(
        GOOD.replace("source: {path: incoming, settle: 2s}", "source: {path: nowhere}"),
        (4, 14),
        r"pipelines\[0\]\.source\.path: source folder .*nowhere does not exist",
        id="missing-source",
    ),
    pytest.param(
        GOOD.replace("url: outbox", "url: incoming/out"),
        (11, 9),
        r"sinks\[0\]\.url: sink folder .* is inside the source folder",
        id="sink-in-source",
    ),
    pytest.param(
        GOOD.replace("url: outbox", "url: nosuchproto://bucket/x"),
        (11, 9),
        r"sinks\[0\]\.url: no protocol for nosuchproto://: install a skyframe protocol plugin",
        id="unknown-protocol",
    ),
    pytest.param(
        GOOD.replace("url: outbox", "url: ${SKYFRAME_TEST_UNSET_VAR}"),
        (11, 9),
        r"sinks\[0\]\.url: environment variable SKYFRAME_TEST_UNSET_VAR is not set",
        id="unset-env",
    ),
    pytest.param(
        GOOD.replace("url: outbox", "url: ${SKYFRAME_TEST_UNSET_VAR:?set it to the bucket}"),
        (11, 9),
        r"SKYFRAME_TEST_UNSET_VAR is not set: set it to the bucket",
        id="unset-env-message",
    ),
    pytest.param(
        GOOD.replace("  - name: survey", "  - name: survey\n    name: again"),
        (4, 5),
        r"pipelines\[0\]\.name: duplicate key",
        id="duplicate-key",
    ),
    pytest.param(
        GOOD.replace("rules:", "rules: [oops"),
        (6, 15),
        r"invalid YAML: while parsing a flow sequence",
        id="yaml-syntax",
    ),
    pytest.param(
        GOOD + "  - name: survey\n    source: {path: incoming}\n    sinks: [{url: x}]\n",
        (1, 1),
        r"two pipelines are named 'survey'",
        id="duplicate-pipeline",
    ),
    pytest.param(
        GOOD.replace('- ignore: {patterns: ["*.bak"]}', '- ignore: {patterns: "*.bak"}'),
        (6, 18),
        r"rules\[0\]\.ignore\.patterns: .*Input should be a valid list",
        id="wrong-option-type",
    ),
    pytest.param(
        GOOD.replace('- ignore: {patterns: ["*.bak"]}', "- {ignore: {}, size: {}}"),
        (6, 9),
        r"rules\[0\]: expected a name, or a one-key mapping",
        id="two-key-step",
    ),
    pytest.param("- just a list\n", (1, 1), r"the config must be a mapping", id="not-a-mapping"),
    pytest.param("", (1, 1), r"the config file is empty", id="empty"),
    pytest.param(
        GOOD.replace("path: incoming,", 'path: "incoming\\0x",'),
        (4, 14),
        r"pipelines\[0\]\.source\.path: contains a NUL character \(\\0\)$",
        id="nul-in-path",
    ),
    pytest.param(
        GOOD.replace("url: outbox", 'url: "out\\0box"'),
        (11, 9),
        r"pipelines\[0\]\.sinks\[0\]\.url: contains a NUL character",
        id="nul-in-url",
    ),
    pytest.param(
        GOOD.replace("state_dir: .state", 'state_dir: "\\0"'),
        (1, 1),
        r"state_dir: contains a NUL character",
        id="nul-in-state-dir",
    ),
    pytest.param(
        GOOD.replace("name: survey", "name: ../escape"),
        (3, 5),
        r"pipelines\[0\]\.name: String should match pattern",
        id="bad-pipeline-name",
    ),
]


@pytest.mark.parametrize(("yaml_text", "position", "pattern"), BAD_CONFIGS)
def test_bad_config_is_located(
    write_config: WriteConfig, yaml_text: str, position: tuple[int, int], pattern: str
) -> None:
    path = write_config(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_project(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{position[0]}:{position[1]}: "), message
    assert re.search(pattern, message), message


def test_env_interpolation(write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKYFRAME_TEST_STATE", "custom-state")
    monkeypatch.delenv("SKYFRAME_TEST_MISSING", raising=False)
    path = write_config(
        GOOD.replace("state_dir: .state", "state_dir: ${SKYFRAME_TEST_STATE}").replace(
            "url: outbox", "url: ${SKYFRAME_TEST_MISSING:-out}box"
        )
    )
    config = load_config(path)
    assert config.state_dir == "custom-state"
    assert config.pipelines[0].sinks[0].url == "outbox"


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${A}", {"A": "x"}, "x"),
        ("pre-${A}-post", {"A": "x"}, "pre-x-post"),
        ("${A:-dflt}", {}, "dflt"),
        ("${A:-dflt}", {"A": ""}, "dflt"),
        ("${A:-}", {}, ""),
        ("$${A}", {"A": "x"}, "${A}"),
        ("cost $5", {}, "cost $5"),
        ("${A}", {"A": ""}, ""),
    ],
)
def test_interpolate(text: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(text, env) == expected


def test_interpolation_error_never_shows_other_values() -> None:
    with pytest.raises(ValueError, match="B is not set") as info:
        interpolate("${A}:${B}", {"A": "s3cr3t"})
    assert "s3cr3t" not in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_tags_are_not_executed(write_config: WriteConfig) -> None:
    path = write_config("state_dir: !!python/object/apply:os.system ['true']\n" + GOOD[17:])
    with pytest.raises(ConfigError, match=r"invalid YAML: .*could not determine a constructor"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # PyYAML refuses these characters as it starts reading: no line of its own to show
        ("state_dir: x\nname: a\x01b\n", "2:8: invalid YAML: special characters are not allowed"),
        ("state_dir: x\x7f\n", "1:13: invalid YAML: special characters are not allowed: #x007f"),
        # a tagged value its constructor cannot make raises ValueError, not a YAML error
        ("workers: 4\nretry:\n  max: !!int 'zz'\n", "3:8: invalid YAML: invalid literal for int()"),
        ("state_dir: !!float 'zz'\n", "1:12: invalid YAML: could not convert string to float"),
        ("state_dir: !!timestamp '2020-99-99'\n", "1:12: invalid YAML: month must be in 1..12"),
    ],
)
def test_yaml_the_reader_refuses_is_one_line_with_its_place(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "skyframe.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:{expected}")
    assert "\n" not in str(info.value)


def test_a_config_file_that_is_not_utf8_says_so(tmp_path: Path) -> None:
    path = tmp_path / "skyframe.yaml"
    path.write_bytes(b"state_dir: \xff\xfe\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"cannot read config file {path}: 'utf-8' codec can't decode byte 0xff in position 11: "
        "invalid start byte"
    )


def test_every_problem_is_reported_in_order_typos_first(tmp_path: Path) -> None:
    path = tmp_path / "skyframe.yaml"
    path.write_text(
        "pipelines:\n"
        "  - name: survey\n"
        "    sorce: {path: incoming}\n"
        "    sinks:\n"
        "      - url: outbox\n"
        "        optons: {}\n"
        "  - name: b\n"
        "    source: {path: incoming, setle: 3s}\n"
        "    sinks: []\n"
    )
    with pytest.raises(ConfigError) as info:
        load_project(path)
    lines = [line.removeprefix(f"{path}:") for line in info.value.lines()]
    assert [line.split(": ", 2)[:2] for line in lines] == [
        ["3:5", "pipelines[0].sorce"],
        ["2:5", "pipelines[0]"],  # the missing key the typo caused, right after it
        ["6:9", "pipelines[0].sinks[0].optons"],
        ["8:30", "pipelines[1].source.setle"],
        ["9:5", "pipelines[1].sinks"],
    ]
    assert "unknown key 'sorce': did you mean 'source'?" in lines[0]
    assert lines[1].endswith("missing required key 'source'")
    assert "did you mean 'options'?" in lines[2]
    assert "did you mean 'settle'?" in lines[3]


def test_past_twenty_problems_the_rest_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "skyframe.yaml"
    keys = "".join(f"    extra{i}: 1\n" for i in range(25))
    path.write_text(f"pipelines:\n  - name: survey\n    source: {{path: incoming}}\n{keys}")
    with pytest.raises(ConfigError) as info:
        load_project(path)
    lines = info.value.lines()
    assert len(lines) == 20
    assert lines[-1].endswith("(and 6 more errors)")  # 25 unknown keys and the missing sinks
