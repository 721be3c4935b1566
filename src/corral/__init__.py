"""Corral: a runtime that hosts many LLM agents and conversations at once."""

__version__ = "0.1.0"

__all__ = ["__version__"]
