"""Command line: the Typer app, one request object, one orchestration path (single subject, batch), batch inputs."""
from .app import app, console_entry, main

__all__ = ["app", "console_entry", "main"]
