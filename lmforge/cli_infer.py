"""CLI commands for chat, serve and generation benchmarks, registered on the main app."""

from lmforge.cli import app  # noqa: F401
