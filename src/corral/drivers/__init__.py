"""Agents Corral drives that are not a model behind a provider: external ACP programs."""
