"""What each entry point imports: start-up is downtime after a crash, and a client command
should cost what a client costs (issue 13).

Each probe runs in a fresh interpreter (``sys.executable -c``), since this process has long
imported everything; it prints the names in ``sys.modules`` once its code has run. The time
itself is guarded by the benchmark suite (``python -m bench startup``), not here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

# What only the server needs; a client command loading any of it pays for a server it is not.
SERVER = ("fastapi", "starlette", "uvicorn", "sse_starlette", "sqlalchemy", "alembic", "mcp", "mcp_types", "acp",
          "openai", "anthropic", "corral.api", "corral.store", "corral.kernel", "corral.services", "corral.loop",
          "corral.drivers", "corral.providers", "corral.tools")
# A closed port on loopback: every client command fails at once with "error: ..." and exit 1.
NOBODY = "http://127.0.0.1:9"


def loaded_by(code: str) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def among(modules: Iterable[str], packages: Iterable[str], allowed: Iterable[str] = ()) -> list[str]:
    """The modules that are one of ``packages`` or inside one, except those named in ``allowed``."""
    return sorted(name for name in set(modules) - set(allowed)
                  if any(name == package or name.startswith(package + ".") for package in packages))


def test_a_pure_kernel_module_loads_no_framework_sdk_or_database() -> None:
    modules = loaded_by("import corral.kernel.lane")
    assert among(modules, ("fastapi", "starlette", "sqlalchemy", "mcp", "acp")) == []


def test_logging_needs_no_web_framework() -> None:
    assert among(loaded_by("import corral.logs"), ("starlette", "fastapi", "uvicorn")) == []


def test_the_settings_load_no_service_kernel_or_store() -> None:
    modules = loaded_by("import corral.settings")
    # Plain-data modules (the packages around them load their names lazily, or have none).
    light = ("corral.kernel", "corral.kernel.config", "corral.tools", "corral.tools.config", "corral.services",
             "corral.services.limits")
    assert among(modules, SERVER, allowed=light) == []


CLIENT_COMMANDS = [
    ["runs", "--url", NOBODY],
    ["runs", "--json", "--session", "ses_x", "--url", NOBODY],
    ["send", "a-key", "hello", "--wait", "--url", NOBODY],
    ["agents", "--url", NOBODY],
    ["jobs", "list", "--url", NOBODY],
    ["jobs", "add", "hi", "--every", "60", "--url", NOBODY],
    ["jobs", "rm", "job_x", "--url", NOBODY],
]


@pytest.mark.parametrize("argv", CLIENT_COMMANDS, ids=lambda argv: " ".join(argv[:2]))
def test_a_client_command_loads_no_server_code(argv: list[str]) -> None:
    # The command really runs (and fails to connect, exit 1), so its lazy imports happen too.
    code = f"""
from corral.cli.main import app
try:
    app({argv!r})
except SystemExit as exc:
    assert exc.code == 1, exc.code
else:
    raise AssertionError("the command did not exit")
"""
    assert among(loaded_by(code), SERVER) == []


def test_the_chat_client_loads_no_server_code() -> None:
    assert among(loaded_by("import corral.cli.main, corral.cli.chat"), SERVER) == []


def test_the_default_tools_load_neither_the_mcp_sdk_nor_httpx_until_used() -> None:
    code = """
from corral.tools import default_registry
from corral.tools.mcp import McpSupervisor
default_registry()
"""
    assert among(loaded_by(code), ("mcp", "mcp_types", "httpx", "jsonschema")) == []


def test_providers_load_an_sdk_only_when_a_provider_of_its_kind_is_made() -> None:
    demo = """
from corral.providers import create_provider
from corral.specs import AgentSpec
create_provider(AgentSpec(name="a", provider="demo"))
"""
    assert among(loaded_by(demo), ("openai", "anthropic")) == []
    remote = """
from corral.providers import create_provider
from corral.specs import AgentSpec
create_provider(AgentSpec(name="a", provider="openai", model="m", provider_options={"api_key": "k"}))
"""
    modules = loaded_by(remote)
    assert "openai" in modules and among(modules, ("anthropic",)) == []


def test_the_head_revision_read_from_the_files_is_alembics() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from corral.store.migrations import SCRIPT_LOCATION, head_revision

    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    assert [head_revision()] == ScriptDirectory.from_config(config).get_heads()


def test_a_database_already_migrated_is_opened_without_alembic(db_url: str) -> None:
    migrate = f"""
import asyncio
from corral.store import Store

async def main() -> None:
    store = Store({db_url!r})
    try:
        await store.migrate()
    finally:
        await store.aclose()

asyncio.run(main())
"""
    assert "alembic" in loaded_by(migrate), "a new database is migrated by alembic"
    assert among(loaded_by(migrate), ("alembic",)) == [], "at the newest revision, nothing is due"


def test_serve_loads_the_server_with_the_collector_off_and_turns_it_back_on() -> None:
    # What `corral serve` does (cli/main.py, then cli/serve.py once the app is built).
    probe = """
import gc
gc.disable()
from corral.cli.serve import freeze_loaded_modules
import corral.api
freeze_loaded_modules()
assert gc.isenabled()
assert gc.get_freeze_count() > 50_000, gc.get_freeze_count()  # what the imports made, never walked again
"""
    loaded_by(probe)
