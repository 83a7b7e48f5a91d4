"""Omniglot on the real zips: counts, splits, cache, download and bad input.

The counts and splits are of the full set (slow on a fresh clone: see conftest); the cache tests use
the small set of a few alphabets."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from metashot.data import omniglot as omniglot_module
from metashot.data.omniglot import ZIPS as STEMS
from metashot.data.omniglot import Omniglot, OmniglotError, _read_zip, download

ZIPS = tuple(f"{z}.zip" for z in STEMS)


def test_counts_and_layout(omniglot: Omniglot) -> None:
    assert omniglot.images.shape == (1623, 20, 28, 28)
    assert omniglot.images.dtype == torch.uint8
    assert int(omniglot.background.sum()) == 964
    assert int((~omniglot.background).sum()) == 659
    assert len(set(omniglot.alphabets)) == 50
    # ink is bright on a dark background, every image has some ink
    assert omniglot.images.float().mean() < 60
    assert bool((omniglot.images.flatten(2).amax(-1) > 128).all())


@pytest.mark.parametrize(
    "split,sizes",
    [("random", (1028, 172, 423)), ("official", (964 - 172, 172, 659))],
)
def test_splits_are_disjoint_and_sized(omniglot: Omniglot, split: str, sizes: tuple[int, ...]) -> None:
    parts = [omniglot.classes(split, p, rotations=False) for p in ("train", "val", "test")]
    assert tuple(p.num_classes for p in parts) == sizes
    names = [set(p.class_names) for p in parts]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    assert all(p.examples_per_class == 20 for p in parts)


def test_alphabet_split_keeps_alphabets_whole(omniglot: Omniglot) -> None:
    train = omniglot.classes("alphabet", "trainval", rotations=False)
    test = omniglot.classes("alphabet", "test", rotations=False)
    alphabets = [{n.split("/")[0] for n in d.class_names} for d in (train, test)]
    assert not (alphabets[0] & alphabets[1])
    assert train.num_classes >= 1200 and train.num_classes + test.num_classes == 1623


def test_split_depends_on_seed_only(omniglot: Omniglot) -> None:
    a = omniglot.classes("random", "test", rotations=False, seed=3).class_names
    b = omniglot.classes("random", "test", rotations=False, seed=3).class_names
    c = omniglot.classes("random", "test", rotations=False, seed=4).class_names
    assert a == b and a != c


def test_rotations_are_new_classes(omniglot: Omniglot) -> None:
    plain = omniglot.classes("random", "test", rotations=False)
    rotated = omniglot.classes("random", "test", rotations=True)
    assert rotated.num_classes == 4 * plain.num_classes == 4 * 423
    n = plain.num_classes
    assert torch.equal(rotated.images[:n], plain.images)
    assert torch.equal(rotated.images[n], torch.rot90(plain.images[0], 1, dims=(2, 3)))


def test_a_few_alphabets_decode_to_their_layout(omniglot_small: Omniglot) -> None:
    """The small set the fast tests use: whole alphabets of the real zips, decoded as the full set is."""
    assert omniglot_small.images.shape == (95, 20, 28, 28)
    assert sorted(set(omniglot_small.alphabets)) == ["Angelic", "Greek", "Latin", "Tengwar"]
    assert int(omniglot_small.background.sum()) == 26 + 24
    assert omniglot_small.images.float().mean() < 60
    assert bool((omniglot_small.images.flatten(2).amax(-1) > 128).all())


def _no_build(*args: object) -> None:
    raise AssertionError("the cache was rebuilt")


def test_cache_is_reused(
    omniglot_small_dir: Path, omniglot_small: Omniglot, monkeypatch: pytest.MonkeyPatch
) -> None:
    caches = sorted(omniglot_small_dir.glob("omniglot-28px-*.npz"))
    assert len(caches) == 1
    mtime = caches[0].stat().st_mtime_ns
    monkeypatch.setattr(omniglot_module, "_build_cache", _no_build)
    again = Omniglot.load(omniglot_small_dir, image_size=28)
    assert caches[0].stat().st_mtime_ns == mtime
    assert torch.equal(again.images, omniglot_small.images)


def test_changed_zips_or_size_rebuild(tmp_path: Path, omniglot_small_dir: Path, small_builds: None) -> None:
    for z in ZIPS:
        shutil.copy(omniglot_small_dir / z, tmp_path / z)
    with zipfile.ZipFile(tmp_path / ZIPS[1], "a") as f:
        f.comment = b"changed"  # new bytes, same images
    small = Omniglot.load(tmp_path, image_size=14)
    assert small.images.shape == (95, 20, 14, 14)
    caches = list(tmp_path.glob("omniglot-*.npz"))
    assert [c.name.split("-")[1] for c in caches] == ["14px"]
    unchanged = {c.name.split("-")[2] for c in omniglot_small_dir.glob("*.npz")}
    assert caches[0].name.split("-")[2] not in unchanged
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_missing_zips_without_download(tmp_path: Path) -> None:
    with pytest.raises(OmniglotError, match="images_background.zip, images_evaluation.zip not found"):
        Omniglot.load(tmp_path, download_missing=False)


def test_truncated_zip_is_named_and_leaves_no_cache(tmp_path: Path) -> None:
    for stem in STEMS:
        _zip(tmp_path / f"{stem}.zip", _members(stem))
    data = (tmp_path / ZIPS[0]).read_bytes()
    (tmp_path / ZIPS[0]).write_bytes(data[: len(data) // 2])
    with pytest.raises(OmniglotError, match=r"images_background.zip: corrupt or truncated zip"):
        Omniglot.load(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] != [] and not list(tmp_path.glob("*.npz"))
    assert not list(tmp_path.glob(".*"))


def _members(stem: str) -> dict[str, bytes]:
    """A few characters in the official layout, as PNGs."""
    from PIL import Image

    members = {}
    for c in range(3):
        for d in range(1, 4):
            out = io.BytesIO()
            Image.new("L", (105, 105), 255 - 40 * c).save(out, "PNG")
            members[f"{stem}/Latin/character{c + 1:02d}/{c + 1:04d}_{d:02d}.png"] = out.getvalue()
    return members


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_wrong_layout_is_named(tmp_path: Path) -> None:
    path = _zip(tmp_path / "images_background.zip", {"images_background/Latin/a.png": b"x"})
    with pytest.raises(OmniglotError, match=r"unexpected member 'images_background/Latin/a.png'"):
        _read_zip(path, 28)


def test_undecodable_image_is_named(tmp_path: Path) -> None:
    name = "images_background/Latin/character01/0001_01.png"
    path = _zip(tmp_path / "images_background.zip", {name: b"not a png"})
    with pytest.raises(OmniglotError, match=r"Latin/character01 drawer 01 does not decode"):
        _read_zip(path, 28)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of two small zips in the official layout, to download."""
    folder = tmp_path_factory.mktemp("served")
    for stem in STEMS:
        _zip(folder / f"{stem}.zip", _members(stem))
    return folder


@pytest.fixture()
def server(served: Path) -> str:
    """An HTTP server on 127.0.0.1 serving ``served``."""
    handler = functools.partial(_Quiet, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_verifies_and_renames(tmp_path: Path, server: str, served: Path) -> None:
    sums = {z[:-4]: _sha256(served / z) for z in ZIPS}
    download(tmp_path, server, sums, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(ZIPS)
    assert all(_sha256(tmp_path / z) == sums[z[:-4]] for z in ZIPS)


def test_download_rejects_a_bad_checksum(tmp_path: Path, server: str) -> None:
    sums = {"images_background": "0" * 64}
    bad = r"images_background.*sha256 checksum is [0-9a-f]{64}, expected 0+"
    with pytest.raises(OmniglotError, match=bad):
        download(tmp_path, server, sums, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the zip nor a partial file


def test_offline_message_names_files_and_folder(tmp_path: Path, server: str) -> None:
    with pytest.raises(OmniglotError) as e:
        download(tmp_path, server + "missing/", {}, progress=False)
    msg = str(e.value)
    assert "images_background.zip" in msg and "images_evaluation.zip" in msg and str(tmp_path) in msg
    assert "METASHOT_DATA" in msg
    assert list(tmp_path.iterdir()) == []


def test_damaged_cache_is_named_and_rebuilt(
    tmp_path: Path, omniglot_small_dir: Path, omniglot_small: Omniglot, small_builds: None
) -> None:
    for z in ZIPS:
        (tmp_path / z).symlink_to((omniglot_small_dir / z).resolve())
    name = next(omniglot_small_dir.glob("omniglot-28px-*.npz")).name
    (tmp_path / name).write_bytes(b"PK\x03\x04 not a whole npz")
    with pytest.warns(UserWarning, match=rf"{name}: damaged Omniglot cache .*; rebuilding it"):
        again = Omniglot.load(tmp_path, image_size=28)
    assert torch.equal(again.images, omniglot_small.images)
    assert np.load(tmp_path / name)["images"].shape == (95, 20, 28, 28)
