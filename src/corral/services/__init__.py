"""Work that happens when nobody is typing: the scheduler (and, later, subagents and the reflector)."""
