"""Shared fixtures: the real Omniglot zips from ../shared, cached in a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from metashot.data.omniglot import Omniglot

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"
ZIPS = ("images_background.zip", "images_evaluation.zip")


@pytest.fixture(scope="session")
def omniglot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with links to the real zips, so that the cache is built there, not in ../shared."""
    if not all((SHARED / z).exists() for z in ZIPS):
        pytest.fail(f"the Omniglot zips are expected in {SHARED}")
    root = tmp_path_factory.mktemp("omniglot")
    for z in ZIPS:
        (root / z).symlink_to(SHARED / z)
    return root


@pytest.fixture(scope="session")
def omniglot(omniglot_dir: Path) -> Omniglot:
    return Omniglot.load(omniglot_dir, image_size=28)
