"""`metashot fit` and `metashot predict`: a few-shot classifier of one's own images, by class name."""

from __future__ import annotations

import argparse
from collections.abc import Callable

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``fit``'s and ``predict``'s parsers to the metashot command's sub-parsers."""
