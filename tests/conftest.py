"""Shared fixtures. Omniglot is found as the library finds it: ``$METASHOT_DATA``, else the user cache
(``~/.cache/metashot``), else downloaded there with its checksum. With no copy and no network, the tests
that need it skip and say how to get it; the others run.

Two sets: ``omniglot_dir``/``omniglot`` are all 1623 characters (the papers' splits), whose first decode
takes a while, so every test that asks for them is marked slow here; ``omniglot_small_dir`` and
``omniglot_small`` are a few whole alphabets of the real zips, decoded for each session in seconds."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from metashot.data import omniglot as omniglot_module
from metashot.data.omniglot import ZIPS, Omniglot, OmniglotError, default_root, download, user_cache_dir

FULL_SET_FIXTURES = frozenset({"omniglot_dir", "omniglot"})
# two alphabets of each zip: 50 background and 45 evaluation characters, 1,900 images
SMALL_ALPHABETS = {"images_background": ("Greek", "Latin"), "images_evaluation": ("Angelic", "Tengwar")}
SMALL_CHARACTERS = 95


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark slow every test on the full Omniglot: on a fresh clone its fixtures decode all of it. Skip
    the tests marked ``cuda`` where torch sees no CUDA device."""
    no_cuda = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False here")
    for item in items:
        if FULL_SET_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
            item.add_marker(no_cuda)


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


def _write_small_zips(source: Path, target: Path) -> None:
    """Copy the members of ``SMALL_ALPHABETS`` from the official zips in ``source`` to zips of the same
    names and layout in ``target``."""
    for stem, alphabets in SMALL_ALPHABETS.items():
        with zipfile.ZipFile(source / f"{stem}.zip") as src, \
                zipfile.ZipFile(target / f"{stem}.zip", "w") as dst:
            for info in src.infolist():
                parts = info.filename.split("/")
                if parts[1] in ("", *alphabets):  # the top folder, or inside a chosen alphabet
                    dst.writestr(info, src.read(info))


@pytest.fixture
def small_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let ``Omniglot.load`` build caches of the small set: it checks for all 1623 characters."""
    monkeypatch.setattr(omniglot_module, "NUM_CHARACTERS", SMALL_CHARACTERS)


@pytest.fixture(scope="session")
def omniglot_small_dir(omniglot_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of the small set's two zips and their caches at 20 and 28 px (the tasks' sizes)."""
    root = tmp_path_factory.mktemp("omniglot-small")
    _write_small_zips(omniglot_source, root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(omniglot_module, "NUM_CHARACTERS", SMALL_CHARACTERS)
        for size in (20, 28):
            Omniglot.load(root, image_size=size)
    return root


@pytest.fixture(scope="session")
def omniglot_small(omniglot_small_dir: Path) -> Omniglot:
    return Omniglot.load(omniglot_small_dir, image_size=28)


@pytest.fixture(scope="session")
def patterns(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 20 classes of 8 random 28 x 28 patterns, each class a noisy copy of its own pattern."""
    import torch
    from PIL import Image

    root = tmp_path_factory.mktemp("patterns")
    g = torch.Generator().manual_seed(0)
    for c in range(20):
        (root / f"c{c:02d}").mkdir()
        base = torch.rand(28, 28, generator=g)
        for i in range(8):
            image = (base + 0.3 * torch.rand(28, 28, generator=g)).clamp(0, 1).mul(255).byte().numpy()
            Image.fromarray(image).save(root / f"c{c:02d}" / f"{i}.png")
    return root
