"""Shared fixtures. Omniglot is found as the library finds it: ``$METASHOT_DATA``, else the user cache
(``~/.cache/metashot``), else downloaded there with its checksum. With no copy and no network, the tests
that need it skip and say how to get it; the others run."""

from __future__ import annotations

from pathlib import Path

import pytest

from metashot.data.omniglot import ZIPS, Omniglot, OmniglotError, default_root, download, user_cache_dir


@pytest.fixture(scope="session")
def omniglot_source() -> Path:
    """The folder that holds the official zips (downloaded into the user cache when missing)."""
    root = default_root()
    try:
        download(root, progress=False)
    except OmniglotError as e:
        pytest.skip(f"no Omniglot: set METASHOT_DATA to a folder with {ZIPS[0]}.zip and {ZIPS[1]}.zip, "
                    f"or run once online ({str(e).splitlines()[0][:120]})")
    return root


@pytest.fixture(scope="session")
def omniglot_dir(omniglot_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable folder of links to the zips and to their existing decoded caches, so that tests build
    any new cache there, never in the user's data folder."""
    root = tmp_path_factory.mktemp("omniglot")
    for z in ZIPS:
        (root / f"{z}.zip").symlink_to((omniglot_source / f"{z}.zip").resolve())
    for size in (20, 28):  # the library's own cache lookup, so a read-only data folder still helps
        Omniglot.load(omniglot_source, image_size=size)
    for cache in [*omniglot_source.glob("omniglot-*px-*.npz"), *user_cache_dir().glob("omniglot-*px-*.npz")]:
        if not (root / cache.name).exists():
            (root / cache.name).symlink_to(cache.resolve())
    return root


@pytest.fixture(scope="session")
def omniglot(omniglot_dir: Path) -> Omniglot:
    return Omniglot.load(omniglot_dir, image_size=28)
