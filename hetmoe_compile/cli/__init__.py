"""Stage cli: ``hetmoe-compile``'s argument parsing and printing (``app``), and Ctrl-C told apart from the errors
libraries turn it into (``interrupts``)."""

from .app import build_parser, main

__all__ = ["build_parser", "main"]
