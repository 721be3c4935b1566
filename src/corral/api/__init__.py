"""The HTTP face: REST, SSE and (later) the OpenAI-compatible endpoint and the web page."""

from corral.api.app import create_app

__all__ = ["create_app"]
