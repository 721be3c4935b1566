"""The agent step loop."""
