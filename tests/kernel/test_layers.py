"""The kernel's layer holds: it imports no web framework, no SQL, no SDK, and neither the
step loop nor the drivers that implement its ``Runner`` port (issue 13)."""

from __future__ import annotations

import pytest

from tests.test_import_weight import among, loaded_by

BELOW_OR_BESIDE = ("fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "mcp", "acp", "openai", "anthropic",
                   "corral.api", "corral.store", "corral.loop", "corral.drivers", "corral.services")


@pytest.mark.parametrize("module", ["corral.kernel.kernel", "corral.kernel.intake", "corral.kernel.drive",
                                    "corral.kernel.ending", "corral.kernel.control", "corral.kernel.recovery"])
def test_the_kernel_imports_nothing_of_the_layers_around_it(module: str) -> None:
    assert among(loaded_by(f"import {module}"), BELOW_OR_BESIDE) == []
