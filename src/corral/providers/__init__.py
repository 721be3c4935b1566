"""Model clients. Each provider lives in its own module; optional SDKs load lazily."""

from corral.providers.base import ChatMessage, ModelRequest, Provider, ToolCall, ToolSpec
from corral.providers.registry import create_provider

__all__ = ["ChatMessage", "ModelRequest", "Provider", "ToolCall", "ToolSpec", "create_provider"]
