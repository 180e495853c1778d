"""Documentation keeps up with the code: every hook, stock rule, process and config key."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from skyframe import hookspecs
from skyframe.config import (
    ApiConfig,
    Config,
    HistoryConfig,
    PipelineConfig,
    PriorityConfig,
    RetryConfig,
    SinkConfig,
    SourceConfig,
    WebhookConfig,
)
from skyframe.plugin_manager import get_plugin_manager
from skyframe.registry import Registry

DOCS = Path(__file__).resolve().parent.parent / "docs"


def sections(page: str) -> dict[str, str]:
    """Level-3 headings of a docs page mapped to the text under them."""
    text = (DOCS / page).read_text(encoding="utf-8")
    parts = re.split(r"^### +(.+?) *$", text, flags=re.MULTILINE)
    return {parts[i].strip("` "): parts[i + 1] for i in range(1, len(parts), 2)}


HOOKS = sorted(
    name
    for name, obj in vars(hookspecs).items()
    if name.startswith("skyframe_") and inspect.isfunction(obj)
)
REGISTRY = Registry.from_plugin_manager(get_plugin_manager(load_entry_points=False))


def test_hookspecs_exist() -> None:
    assert "skyframe_transfer" in HOOKS
    assert "skyframe_event" in HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented(hook: str) -> None:
    documented = sections("hooks.md")
    assert hook in documented, f"docs/hooks.md has no '### {hook}' section"
    assert len(documented[hook].split()) >= 30, f"the section on {hook} is too thin"


@pytest.mark.parametrize(
    ("kind", "name"),
    [("rule", n) for n in sorted(REGISTRY.rules)]
    + [("process", n) for n in sorted(REGISTRY.processes)],
)
def test_every_builtin_rule_and_process_is_documented(kind: str, name: str) -> None:
    documented = sections("builtins.md")
    assert name in documented, f"docs/builtins.md has no '### {name}' section for the {kind}"
    body = documented[name]
    spec = (REGISTRY.rules if kind == "rule" else REGISTRY.processes)[name]
    for option in spec.options_model.model_fields:
        assert option in body, f"option {option!r} of {kind} {name!r} is not documented"


def _keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


@pytest.mark.parametrize(
    "key",
    sorted(
        {
            k
            for m in (
                Config,
                PipelineConfig,
                PriorityConfig,
                SourceConfig,
                SinkConfig,
                RetryConfig,
                ApiConfig,
                HistoryConfig,
                WebhookConfig,
            )
            for k in _keys(m)
        }
    ),
)
def test_every_config_key_is_documented(key: str) -> None:
    text = (DOCS / "config.md").read_text(encoding="utf-8")
    assert f"`{key}`" in text, f"docs/config.md does not mention `{key}`"


def test_readme_opens_with_setup_test_and_main_job() -> None:
    readme = (DOCS.parent / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```(?:sh|bash|console)?\n(.*?)```", readme, flags=re.DOTALL)
    assert blocks, "README has no command block"
    first = blocks[0]
    assert "bash .ci/setup" in first
    assert ".venv/bin/pytest" in first
    assert "skyframe run skyframe.yaml" in "".join(blocks[:2])


def _backend_options() -> list[tuple[str, str]]:
    from skyframe.protocols.gcs.backend import GCSOptions
    from skyframe.protocols.s3.backend import S3Options
    from skyframe.protocols.sftp.backend import SFTPOptions

    models = {"s3": S3Options, "gcs": GCSOptions, "sftp": SFTPOptions}
    return [(name, option) for name, model in models.items() for option in model.model_fields]


@pytest.mark.parametrize(("backend", "option"), _backend_options())
def test_every_backend_option_is_documented(backend: str, option: str) -> None:
    body = sections("storage.md").get(backend, "")
    assert f"| `{option}` |" in body, f"docs/storage.md, ### {backend}: no row for `{option}`"
