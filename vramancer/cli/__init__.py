"""The command line: `vramancer` and its subcommands (argparse)."""

from vramancer.cli.main import main

__all__ = ["main"]
