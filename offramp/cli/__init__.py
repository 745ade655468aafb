"""The command line and the demo, on top of every other layer: ``offramp SUBCOMMAND``."""
from offramp.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
