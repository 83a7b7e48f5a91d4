"""`metashot embed`, and `metashot evaluate --features`: a frozen backbone's features, cached once."""

from __future__ import annotations

import argparse
from collections.abc import Callable

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``embed``'s parser to the metashot command's sub-parsers."""


def add_evaluate_options(p: argparse.ArgumentParser) -> None:
    """Add ``--features`` and what goes with it to ``metashot evaluate``'s parser."""
    p.set_defaults(features=None)


def evaluate_features(args: argparse.Namespace) -> int:
    """``metashot evaluate --features CACHE``: episodes of the cached features scored by ``--head``."""
    raise NotImplementedError
