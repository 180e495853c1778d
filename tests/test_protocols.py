"""Storage protocols are plugins: registered through a hook, found by URL scheme."""

from __future__ import annotations

import re
from pathlib import Path

import fsspec
import pytest
from helpers import WriteConfig, make_file, write_plugin

from skyframe.engine import Engine
from skyframe.errors import ConfigError, PluginError
from skyframe.pipeline import load_project
from skyframe.protocols import ANY_FSSPEC, Protocol, Protocols, builtin_protocols

VAULT = """
    import fsspec
    from pydantic import BaseModel, ConfigDict

    from skyframe import hookimpl
    from skyframe.protocols import Protocol
    from skyframe.protocols.endpoint import Endpoint


    class VaultOptions(BaseModel):
        model_config = ConfigDict(extra="forbid")
        shelf: str = "main"


    def endpoint(url, options, base_dir):
        settings = VaultOptions.model_validate(options)
        box = url.split("://", 1)[1].strip("/")
        return Endpoint(
            "vault",
            f"/vault-{box}/{settings.shelf}",
            lambda: fsspec.filesystem("memory"),
            remote=False,
            settings=settings,
        )


    @hookimpl
    def skyframe_register_protocols(register):
        register(Protocol("vault", ("vault",), endpoint, VaultOptions, origin=__name__))
    """


def vault_project(write_config: WriteConfig, options: str) -> Path:
    config = write_config(
        f"""
        state_dir: state
        plugins: [plugins]
        pipelines:
          - name: p
            source: {{path: incoming, settle: 0}}
            sinks:
              - url: vault://box
                options: {options}
        """
    )
    write_plugin(config.parent / "plugins", "vault.py", VAULT)
    return config


def test_a_protocol_of_a_plugin_takes_its_urls_and_delivers(
    write_config: WriteConfig, memory_fs: fsspec.AbstractFileSystem
) -> None:
    config = vault_project(write_config, "{shelf: north}")
    make_file(config.parent / "incoming", "a.jpg", b"alpha")
    make_file(config.parent / "incoming", "f/b.jpg", b"beta")
    project = load_project(config)
    assert project.registry.protocols.by_scheme["vault"].name == "vault"
    engine = Engine(project.config, project.pm, project.pipelines)
    try:
        summary = engine.run_once()
    finally:
        engine.close()
    assert summary.delivered == 2
    assert memory_fs.cat_file("/vault-box/north/a.jpg") == b"alpha"
    assert memory_fs.cat_file("/vault-box/north/f/b.jpg") == b"beta"


def test_a_plugin_protocols_options_are_checked_with_a_fix(write_config: WriteConfig) -> None:
    config = vault_project(write_config, "{shlef: north}")
    with pytest.raises(ConfigError) as info:
        load_project(config)
    message = str(info.value)
    assert "sinks[0].options.shlef: unknown option 'shlef' (did you mean 'shelf'?" in message


def test_an_unknown_scheme_says_what_to_do() -> None:
    with pytest.raises(ValueError, match=r"no protocol for nosuch://: install a skyframe"):
        builtin_protocols().for_url("nosuch://x")


def test_schemes_fsspec_knows_take_the_generic_protocol() -> None:
    protocols = builtin_protocols()
    assert protocols.for_url("memory://x").name == "fsspec"
    assert protocols.for_url("outbox").name == "file"
    assert protocols.for_url("s3://b/p").name == "s3"
    assert protocols.for_url("gs://b").name == "gcs"
    assert protocols.for_url("ssh://u@h/x").name == "sftp"


def test_two_protocols_for_one_scheme_name_both() -> None:
    protocols = Protocols()
    protocols.add(Protocol("s3", ("s3",), lambda *a: None, origin="one"))  # type: ignore[arg-type,return-value]
    with pytest.raises(
        PluginError, match=r"two protocols for s3://: 's3' from one and 'x' from two"
    ):
        protocols.add(Protocol("x", ("s3",), lambda *a: None, origin="two"))  # type: ignore[arg-type,return-value]


def test_the_registry_is_read_only() -> None:
    with pytest.raises(TypeError):
        builtin_protocols().by_scheme["new"] = builtin_protocols().by_scheme[ANY_FSSPEC]  # type: ignore[index]


def test_core_modules_import_no_protocol() -> None:
    # The core reaches protocols through the registry only: it imports no protocol's package
    # (the plugin manager names the built-in plugins, as data). Only a protocol's own package
    # (skyframe/protocols/<name>/) imports from it.
    core = Path(__file__).resolve().parent.parent / "skyframe"
    pattern = re.compile(
        r"^\s*(from|import)\s+skyframe\.protocols"
        r"(\.(s3|gcs|sftp|generic)\b|\s+import\s+.*\b(s3|gcs|sftp|generic)\b)",
        re.MULTILINE,
    )
    offenders = []
    for module in core.rglob("*.py"):
        parts = module.relative_to(core).parts
        in_a_protocol = parts[0] == "protocols" and len(parts) > 2
        if not in_a_protocol and pattern.search(module.read_text(encoding="utf-8")):
            offenders.append(str(module.relative_to(core)))
    assert offenders == []


def test_skyframe_plugins_lists_the_protocols(write_config: WriteConfig) -> None:
    from test_cli import skyframe

    config = vault_project(write_config, "{}")
    done = skyframe(config.parent, "plugins", str(config))
    assert done.returncode == 0, done.stderr
    assert "protocol s3  [skyframe.protocols.s3.plugin]: s3://, s3a://" in done.stdout
    assert "protocol vault  [" in done.stdout
    assert "]: vault://" in done.stdout
