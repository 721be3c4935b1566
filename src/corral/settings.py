"""Service settings: command-line flags > ``CORRAL_*`` environment > ``corral.toml`` > defaults."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from corral.kernel.config import KernelConfig
from corral.principals import Principal, TokenTable
from corral.services.limits import SubagentLimits
from corral.specs import AgentSpec
from corral.tools.config import ToolSettings

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def default_agent() -> AgentSpec:
    return AgentSpec(name="assistant", provider="demo", system_prompt="You are a helpful assistant.")


class PrincipalToken(BaseModel):
    """One API token and the principal it authenticates."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    token: SecretStr = Field(min_length=16)
    admin: bool = False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CORRAL_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8787, ge=0, le=65535)
    data_dir: Path = Path(".corral")
    database_url: str | None = Field(None, description="default: a SQLite file in data_dir")
    api_token: SecretStr | None = Field(None, description="the admin principal's token")
    principals: list[PrincipalToken] = Field(default_factory=list, description="more tokens, one per principal")
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed to call the API from a browser")
    max_pending_inputs: int = Field(1000, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    interrupt_grace_s: float = Field(2.0, ge=0)
    shutdown_grace_s: float = Field(5.0, ge=0)
    requeue_interrupted: bool = True
    max_tool_processes: int = Field(8, ge=1)
    conversation_cache_sessions: int = Field(
        1000, ge=0, description="sessions whose conversation stays in memory between runs; 0: none")
    tools: ToolSettings = Field(default_factory=ToolSettings, description="limits of the built-in tools")
    workspace_root: Path | None = Field(None, description="default: data_dir/workspaces; one directory per agent")
    subagent_max_depth: int = Field(3, ge=1, le=20)
    subagent_max_children: int = Field(10, ge=1, description="per session")
    subagent_max_total: int = Field(100, ge=1, description="subagents at work at once, in the whole service")
    subagent_cascade_cancel: bool = Field(True, description="cancelling a run cancels the subagents it spawned")
    reflector_max_concurrent: int = Field(2, ge=1, description="background reflections (titles, summaries) at once")
    reflector_summary_every: int = Field(5, ge=0, description="turns between rolling summaries; 0: none")
    misfire_grace_s: float = Field(60.0, ge=0, description="a job fire later than this counts as missed")
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "human"] = Field("auto", description="auto: human on a terminal, else JSON")
    otel: bool = Field(False, description="OpenTelemetry spans (needs corral[otel]); OTEL_* variables turn them on too")
    agents: list[AgentSpec] = Field(default_factory=list, description="extra agents to create at start")

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'corral.db').resolve()}"

    def kernel_config(self) -> KernelConfig:
        return KernelConfig(
            max_pending_inputs=self.max_pending_inputs,
            interrupt_grace_s=self.interrupt_grace_s,
            shutdown_grace_s=self.shutdown_grace_s,
            requeue_interrupted=self.requeue_interrupted,
            max_tool_processes=self.max_tool_processes,
            conversation_cache_sessions=self.conversation_cache_sessions,
            workspace_root=(self.workspace_root or self.data_dir / "workspaces").resolve(),
        )

    def subagent_limits(self) -> SubagentLimits:
        return SubagentLimits(self.subagent_max_depth, self.subagent_max_children, self.subagent_max_total,
                              self.subagent_cascade_cancel)

    def initial_agents(self) -> tuple[AgentSpec, ...]:
        names = {agent.name for agent in self.agents}
        base = () if "assistant" in names else (default_agent(),)
        return base + tuple(self.agents)

    def token_table(self) -> TokenTable:
        entries = [(p.token.get_secret_value(), Principal(p.name, admin=p.admin)) for p in self.principals]
        if self.api_token is not None:
            entries.append((self.api_token.get_secret_value(), Principal("admin", admin=True)))
        return TokenTable(entries)

    @property
    def auth_enabled(self) -> bool:
        return self.api_token is not None or bool(self.principals)

    @property
    def is_loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS or self.host.startswith("127.")


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Settings from every source; ``overrides`` (CLI flags) that are None are ignored."""
    path = config or (Path(os.environ["CORRAL_CONFIG"]) if os.environ.get("CORRAL_CONFIG") else None)
    if path is None and Path("corral.toml").exists():
        path = Path("corral.toml")
    if path is not None and not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")

    class _FromFile(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
            if path is not None:
                sources += (TomlConfigSettingsSource(settings_cls, toml_file=path),)
            return sources

    return _FromFile(**{key: value for key, value in overrides.items() if value is not None})
