"""Limits and permissions of the built-in tools (the ``[tools]`` table of corral.toml)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ToolSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shell_timeout_s: float = Field(60.0, gt=0, description="default time limit of one shell call")
    shell_max_timeout_s: float = Field(600.0, gt=0, description="the most a shell call may ask for")
    max_output_bytes: int = Field(65_536, ge=1024, description="shell output kept; the rest is cut with a marker")
    file_max_bytes: int = Field(1_048_576, ge=1024, description="largest file read in full or written")
    http_timeout_s: float = Field(20.0, gt=0, description="whole http_fetch call, redirects included")
    http_max_bytes: int = Field(1_048_576, ge=1024, description="response body kept; the rest is cut with a marker")
    http_allow: list[str] = Field(default_factory=list, description="hosts or CIDRs fetchable although private")
    http_max_redirects: int = Field(5, ge=0, le=20)
