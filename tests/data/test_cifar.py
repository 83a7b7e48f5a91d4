"""CIFAR-FS and FC100 in each layout: the classes of each part, their pixels, the download, bad files."""

from __future__ import annotations

import functools
import hashlib
import http.server
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import metashot.data.tasks
from metashot.cli import main
from metashot.config import Config
from metashot.data import cifar
from metashot.data.cifar import CIFAR_FS_SPLIT, FC100_SPLIT, CifarFSSource, FC100Source
from metashot.data.splits import CIFAR100_FINE, CIFAR100_SUPERCLASS, CIFAR_FS, FC100_SUPERCLASSES
from metashot.errors import DataError
from tests.layouts.cifar import (
    image,
    official_images,
    official_members,
    write_archive,
    write_folder,
    write_pickles,
    write_r2d2,
)
from tests.layouts.mini import py2_pickle

COUNTS = {"cifar-fs": (64, 16, 20), "fc100": (60, 20, 20)}


def _source(cls: type, root: Path, **task_args: object) -> CifarFSSource | FC100Source:
    task_args.setdefault("download", False)
    return cls(Config(task=cls.name, data_dir=str(root), task_args=task_args))


def _pixels(source: CifarFSSource | FC100Source, part: str) -> np.ndarray:
    return source.dataset(part).flat.permute(0, 2, 3, 1).numpy()


def _check(source: CifarFSSource | FC100Source, split: dict[str, tuple[int, ...]], images: object) -> None:
    """Each part holds ``split``'s classes by fine name, in label order, with the pixels ``images(fine)``."""
    for part in ("train", "val", "test"):
        data = source.dataset(part)
        assert data.class_names == [CIFAR100_FINE[f] for f in split[part]]
        expected = np.concatenate([images(f) for f in split[part]])
        np.testing.assert_array_equal(_pixels(source, part), expected)


def test_shipped_splits_are_the_papers() -> None:
    assert {p: len(v) for p, v in CIFAR_FS.items()} == {"train": 64, "val": 16, "test": 20}
    assert sorted(n for v in CIFAR_FS.values() for n in v) == sorted(CIFAR100_FINE)
    assert CIFAR100_FINE[:3] == ("apple", "aquarium_fish", "baby") and len(set(CIFAR100_FINE)) == 100
    assert np.bincount(CIFAR100_SUPERCLASS).tolist() == [5] * 20
    assert FC100_SUPERCLASSES["test"] == (0, 7, 12, 14)
    assert {p: len(v) for p, v in FC100_SPLIT.items()} == {"train": 60, "val": 20, "test": 20}
    # FC100's test superclasses 0 (aquatic mammals) and 14 (people)
    assert {"beaver", "dolphin", "otter", "seal", "whale", "baby", "boy", "girl", "man", "woman"} <= {
        CIFAR100_FINE[f] for f in FC100_SPLIT["test"]}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_archive(tmp_path_factory.mktemp("official") / "cifar-100-python.tar.gz")


@pytest.mark.parametrize("cls,split", [(CifarFSSource, CIFAR_FS_SPLIT), (FC100Source, FC100_SPLIT)])
def test_official_archive(tmp_path: Path, archive: Path, cls: type, split: dict) -> None:
    (tmp_path / archive.name).symlink_to(archive)
    source = _source(cls, tmp_path)
    assert source.layout.name == "cifar-100-python" and source.image_size == 32
    _check(source, split, official_images)
    assert [p["classes"] for p in source.report()["parts"].values()] == list(COUNTS[cls.name])


def test_official_folder(tmp_path: Path) -> None:
    source = _source(CifarFSSource, write_folder(tmp_path))
    assert source.layout.sources(tmp_path, "val")[0] == tmp_path / "cifar-100-python" / "train"
    _check(source, CIFAR_FS_SPLIT, official_images)


def test_r2d2(tmp_path: Path) -> None:
    source = _source(CifarFSSource, write_r2d2(tmp_path))
    assert source.layout.name == "r2d2"
    _check(source, CIFAR_FS_SPLIT, lambda f: np.stack([image(f, 0), image(f, 1)]))
    # data_dir may be the cifar100 folder itself
    assert _source(CifarFSSource, tmp_path / "cifar100").layout.name == "r2d2"


@pytest.mark.parametrize("cls,prefix,split", [(CifarFSSource, "CIFAR_FS", CIFAR_FS_SPLIT),
                                              (FC100Source, "FC100", FC100_SPLIT)])
def test_pickles(tmp_path: Path, cls: type, prefix: str, split: dict) -> None:
    source = _source(cls, write_pickles(tmp_path, prefix, split, per_class=3))
    assert source.layout.name == "pickle"
    _check(source, split, lambda f: np.stack([image(f, k) for k in range(3)]))


def test_no_layout_without_download(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"^{tmp_path}: no cifar-fs layout found; it needs one of: "
                       "cifar-100-python: cifar-100-python.tar.gz or"):
        _source(CifarFSSource, tmp_path)


def test_pickle_of_the_other_split_is_named(tmp_path: Path) -> None:
    write_pickles(tmp_path, "CIFAR_FS", FC100_SPLIT)
    # FC100's train superclasses hold 20 classes CIFAR-FS tests or validates on, the first bed (5)
    with pytest.raises(DataError, match=r"CIFAR_FS_train.pickle: 'labels' hold 20 classes outside the "
                       r"train split, e.g. fine label 5 \('bed'\)"):
        _source(CifarFSSource, tmp_path).dataset("train")


def test_pickle_labels_out_of_range(tmp_path: Path) -> None:
    write_pickles(tmp_path, "FC100", FC100_SPLIT)
    obj = {"data": np.zeros((2, 32, 32, 3), np.uint8), "labels": [1, 100]}
    (tmp_path / "FC100_train.pickle").write_bytes(py2_pickle(obj))
    with pytest.raises(DataError, match=r"FC100_train.pickle: 'labels' must be 2 CIFAR-100 fine labels"):
        _source(FC100Source, tmp_path).dataset("train")


def test_r2d2_list_of_another_split(tmp_path: Path) -> None:
    write_r2d2(tmp_path, per_class=1)
    (tmp_path / "cifar100/splits/bertinetto/val.txt").write_text("apple\n" + "".join(
        f"{n}\n" for n in CIFAR_FS["val"][1:]))
    with pytest.raises(DataError, match=r"val.txt: lists 16 classes, not CIFAR-FS's val split of 16 "
                       r"\(e.g. 'apple' differs\)"):
        _source(CifarFSSource, tmp_path).dataset("val")


def test_r2d2_empty_class_folder(tmp_path: Path) -> None:
    write_r2d2(tmp_path, per_class=1)
    (tmp_path / "cifar100/data/whale/whale_s_000000.png").unlink()
    with pytest.raises(DataError, match=r"data/whale: no .png images of class 'whale'"):
        _source(CifarFSSource, tmp_path).dataset("test")


def test_archive_with_other_class_names(tmp_path: Path) -> None:
    meta = {"fine_label_names": ["airplane", *CIFAR100_FINE[1:]]}
    write_archive(tmp_path / "cifar-100-python.tar.gz", official_members(meta=meta))
    with pytest.raises(DataError, match=r"cifar-100-python.tar.gz/cifar-100-python/meta: 'fine_label_names' "
                       "are not CIFAR-100's 100 classes"):
        _source(FC100Source, tmp_path).dataset("train")


def test_archive_without_a_member(tmp_path: Path) -> None:
    members = official_members()
    del members["test"]
    write_archive(tmp_path / "cifar-100-python.tar.gz", members)
    with pytest.raises(DataError, match=r"cifar-100-python.tar.gz: no file cifar-100-python/test; expected "
                       "the official cifar-100-python.tar.gz"):
        _source(CifarFSSource, tmp_path).dataset("train")


def test_truncated_archive_via_cli(tmp_path: Path, archive: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    data = archive.read_bytes()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / archive.name).write_bytes(data[: len(data) // 2])
    monkeypatch.setitem(metashot.data.tasks.TASKS, "cifar-fs", CifarFSSource)
    code = main(["train", "protonet", "--task", "cifar-fs", "--data-dir", str(tmp_path / "data"),
                 "--steps", "1", "--run-dir", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"metashot: error: {tmp_path / 'data' / archive.name}: not a readable tar.gz (")
    assert err.rstrip().endswith("download it again")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def server(archive: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``archive`` served over HTTP on 127.0.0.1, as cifar.URL with its md5 as cifar.MD5."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            functools.partial(_Quiet, directory=str(archive.parent)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/{archive.name}"
    monkeypatch.setattr(cifar, "URL", url)
    monkeypatch.setattr(cifar, "MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    yield url
    httpd.shutdown()
    httpd.server_close()


def test_download(tmp_path: Path, archive: Path, server: str) -> None:
    source = _source(FC100Source, tmp_path / "new", download=True)
    assert (tmp_path / "new" / archive.name).read_bytes() == archive.read_bytes()
    _check(source, FC100_SPLIT, official_images)


def test_download_when_the_official_layout_is_asked_for(tmp_path: Path, archive: Path, server: str) -> None:
    write_pickles(tmp_path, "CIFAR_FS", CIFAR_FS_SPLIT)
    assert _source(CifarFSSource, tmp_path, download=True).layout.name == "pickle"
    assert not (tmp_path / archive.name).exists()
    source = _source(CifarFSSource, tmp_path, download=True, layout="cifar-100-python")
    assert source.layout.name == "cifar-100-python" and (tmp_path / archive.name).exists()
    with pytest.raises(DataError, match=f"^{tmp_path}/cifar100/splits/bertinetto/train.txt: not found "
                       r"\(r2d2 layout: cifar100/data/<class>/\*.png with"):
        _source(CifarFSSource, tmp_path, download=True, layout="r2d2")


def test_download_with_a_wrong_md5_saves_nothing(tmp_path: Path, server: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cifar, "MD5", "0" * 32)
    bad = f"^{re.escape(server)}: md5 checksum is [0-9a-f]{{32}}, expected 0{{32}}; not saved$"
    with pytest.raises(DataError, match=bad):
        _source(CifarFSSource, tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []


def test_download_offline_names_the_layouts(tmp_path: Path, server: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cifar, "URL", server + ".missing")
    with pytest.raises(DataError, match=r"could not download .*Offline\? Put cifar-100-python.tar.gz "
                       r"\(www.cs.toronto.edu/~kriz/cifar.html\) or one of the other layouts in "):
        _source(CifarFSSource, tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []
