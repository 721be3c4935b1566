"""Service settings: command-line flags > ``CORRAL_*`` environment > ``corral.toml`` > defaults."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from corral.channels.config import ChannelSpec, unique_names
from corral.kernel.config import KernelConfig
from corral.principals import Principal, TokenTable
from corral.services.limits import SubagentLimits
from corral.specs import AgentSpec
from corral.tools.config import ToolSettings

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# Addresses that bind every interface: no other machine can reach a node at them.
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
MIN_SECRET_CHARS = 16


def default_agent() -> AgentSpec:
    return AgentSpec(name="assistant", provider="demo", system_prompt="You are a helpful assistant.")


class PrincipalToken(BaseModel):
    """One API token and the principal it authenticates."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    token: SecretStr = Field(min_length=16)
    admin: bool = False


class Settings(BaseSettings):
    # Errors never echo what was given: a rejected value may be a secret (a too short token).
    model_config = SettingsConfigDict(env_prefix="CORRAL_", extra="forbid", hide_input_in_errors=True)

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
    client_tools_timeout_s: float = Field(
        600.0, ge=0, description="a run waiting for an OpenAI client's tool results is cancelled after this; 0: never")
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
    # Chat channels (docs/channels.md): Telegram, Slack, Discord, a signed webhook; one runtime each.
    channels: list[ChannelSpec] = Field(default_factory=list, description="chat channels ([[channels]])")
    # The cluster (Postgres only). A SQLite database is served by one process (single_process.py).
    advertise_url: str | None = Field(
        None, description="the URL other nodes reach this one at; default: http://HOST:PORT")
    cluster_secret: SecretStr | None = Field(
        None, description="authenticates node-to-node calls; required beyond loopback on Postgres")
    lease_ttl_s: float = Field(10.0, gt=0, description="a node whose last heartbeat is older than this is dead")
    heartbeat_s: float = Field(2.0, gt=0, description="how often a node renews its lease; below lease_ttl_s / 2")
    workers: int = Field(1, ge=1, description="node processes on this machine sharing the port (Postgres only)")
    # Slow and numerous clients (api/http_protocol.py, docs/security.md).
    header_timeout_s: float = Field(
        10.0, gt=0, description="a request's headers must be in this long after its first byte (a new connection's "
        "first request: after the connection opens); else the connection is closed")
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request's whole body must be in this long after its headers; else 408")
    keep_alive_timeout_s: float = Field(
        5.0, gt=0, description="an idle connection between requests is closed after this")
    max_connections: int = Field(
        4096, ge=1, description="open HTTP connections (SSE streams included); beyond it a new connection gets 503")

    @field_validator("advertise_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme, sep, rest = value.partition("://")
        if scheme not in ("http", "https") or not sep or not rest.split("/", 1)[0]:
            raise ValueError(f"must be an http:// or https:// URL with a host, not {value!r}")
        return value.rstrip("/")

    @field_validator("channels")
    @classmethod
    def _unique_channels(cls, value: list[ChannelSpec]) -> list[ChannelSpec]:
        return unique_names(value)

    @field_validator("cluster_secret")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_SECRET_CHARS:
            raise ValueError(f"must be at least {MIN_SECRET_CHARS} characters")  # and never echoed
        return value

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> Settings:
        if self.heartbeat_s >= self.lease_ttl_s / 2:
            raise ValueError(
                f"heartbeat_s (CORRAL_HEARTBEAT_S) is {self.heartbeat_s:g} s but must be less than half of "
                f"lease_ttl_s (CORRAL_LEASE_TTL_S, {self.lease_ttl_s:g} s), so that one late heartbeat "
                "does not cost a live node its lease"
            )
        return self

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'corral.db').resolve()}"

    @property
    def database_backend(self) -> str:
        """``sqlite`` or ``postgresql`` (anything else is refused when the store opens it)."""
        scheme = self.resolved_database_url().partition(":")[0]
        return scheme.partition("+")[0].lower()

    @property
    def is_postgres(self) -> bool:
        """Whether the database is Postgres, where several nodes may share it (a cluster); SQLite is one process."""
        return self.database_backend == "postgresql"

    def resolved_advertise_url(self) -> str:
        """The URL other nodes reach this one at: ``advertise_url``, else ``http://HOST:PORT``.

        For a wildcard bind (``0.0.0.0``, ``::``) that default reaches nothing from another
        machine; ``corral serve`` refuses it on Postgres (cli/serve.py, ``check_exposure``).
        """
        if self.advertise_url is not None:
            return self.advertise_url
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def kernel_config(self) -> KernelConfig:
        return KernelConfig(
            max_pending_inputs=self.max_pending_inputs,
            interrupt_grace_s=self.interrupt_grace_s,
            shutdown_grace_s=self.shutdown_grace_s,
            requeue_interrupted=self.requeue_interrupted,
            max_tool_processes=self.max_tool_processes,
            conversation_cache_sessions=self.conversation_cache_sessions,
            workspace_root=(self.workspace_root or self.data_dir / "workspaces").resolve(),
            client_tools_timeout_s=self.client_tools_timeout_s,
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
