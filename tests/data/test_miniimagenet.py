"""miniImageNet's four layouts on tiny copies in the real files' formats (tests/layouts/mini.py): each is
detected and read back class by class, pixel for pixel; each kind of damage is one line naming the file
(through the command line, exit status 2); a pickle that runs code is refused and runs nothing; the
decode-once cache is reused, rebuilt when a file changes, and never left half-written."""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from metashot.config import Config
from metashot.data import imagecache
from metashot.data.imageset import Part
from metashot.data.miniimagenet import CacheLayout, MiniImageNetSource
from metashot.errors import DataError
from tests.data.test_pickles import _RunsCode
from tests.layouts import cli_error, copy_without_cache, reads, write_each
from tests.layouts.mini import WNIDS, Written, write_cache, write_category_split, write_csv, write_folders

WRITERS: dict[str, Callable[[Path], Written]] = {
    "cache": write_cache, "category-split": write_category_split, "csv": write_csv, "folders": write_folders,
}
NEEDS = ("cache: mini-imagenet-cache-{train,val,test}.pkl (val may be named validation); category-split: "
         "miniImageNet_category_split_{train_phase_train,val,test}.pickle; csv: images/ with "
         "{train,val,test}.csv of filename,label (beside it or in split/, as FEAT's); folders: "
         "{train,val,test}/<class>/*.jpg")


@pytest.fixture(autouse=True)
def _user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing reaches the user's own cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Written]]:
    """A folder of each layout, with what it holds."""
    return write_each(tmp_path_factory, WRITERS)


def _source(root: Path, **task_args: object) -> MiniImageNetSource:
    return MiniImageNetSource(Config(task="miniimagenet", data_dir=str(root), task_args=task_args))


@pytest.mark.parametrize("layout", WRITERS)
def test_each_layout_is_detected_and_read_back(copies: dict[str, tuple[Path, Written]], layout: str) -> None:
    root, written = copies[layout]
    assert [len(c) for c in written.values()] == [64, 16, 20]
    source = _source(root)
    assert source.layout.name == layout
    reads(source, written)
    reads(_source(root, layout=layout), written)


def test_the_cache_layout_takes_learn2learns_validation_name(tmp_path: Path) -> None:
    written = write_cache(tmp_path, val_name="validation")
    assert not (tmp_path / "mini-imagenet-cache-val.pkl").exists()
    reads(_source(tmp_path), written)


def test_a_missing_file_names_what_each_layout_needs(
    copies: dict[str, tuple[Path, Written]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = copy_without_cache(copies["cache"][0], tmp_path / "mini", "miniimagenet")
    (root / "mini-imagenet-cache-test.pkl").unlink()
    assert cli_error(["data", str(root), "--task", "miniimagenet"], capsys) == (
        f"{root}: the cache layout (mini-imagenet-cache-{{train,val,test}}.pkl (val may be named "
        "validation)) lacks mini-imagenet-cache-test.pkl")
    (root / "mini-imagenet-cache-train.pkl").unlink()
    (root / "mini-imagenet-cache-val.pkl").unlink()
    assert cli_error(["data", str(root), "--task", "miniimagenet"], capsys) == (
        f"{root}: no miniimagenet layout found; it needs one of: {NEEDS}")
    assert cli_error(["data", str(root / "typo"), "--task", "miniimagenet"], capsys) == (
        f"{root / 'typo'}: no such folder (--data-dir: a folder with one of: {NEEDS})")
    with pytest.raises(DataError) as e:
        _source(root, layout="cache")
    assert str(e.value) == (f"{root / 'mini-imagenet-cache-train.pkl'}: not found (cache layout: "
                            "mini-imagenet-cache-{train,val,test}.pkl (val may be named validation))")


def _rewrite(path: Path, change: Callable[[dict], dict]) -> None:
    with open(path, "rb") as f:
        obj = pickle.load(f)  # the test's own file
    with open(path, "wb") as f:
        pickle.dump(change(obj), f, protocol=4)


def _drop_class(obj: dict) -> dict:
    first = sorted(obj["class_dict"])[0]
    keep = np.setdiff1d(np.arange(len(obj["image_data"])), obj["class_dict"][first])
    rows = {n: [int(np.searchsorted(keep, r)) for r in v] for n, v in obj["class_dict"].items() if n != first}
    return {"image_data": obj["image_data"][keep], "class_dict": rows}


TRAIN, VAL = "mini-imagenet-cache-train.pkl", "mini-imagenet-cache-val.pkl"
WNID0, WNID1 = WNIDS[:2]  # the first two training classes


def _edit(**changes: Callable[[dict], object]) -> Callable[[Path], None]:
    """A change of the pickle at a path: each key of ``changes`` set to its function of the old dict."""
    return lambda p: _rewrite(p, lambda o: {**o, **{k: f(o) for k, f in changes.items()}})


def _classes(**changes: Callable[[dict], list]) -> Callable[[Path], None]:
    """A change of the pickle's class_dict: each class of ``changes`` given its function of the old dict."""
    return _edit(class_dict=lambda o: {**o["class_dict"],
                                       **{k: f(o["class_dict"]) for k, f in changes.items()}})


DAMAGE: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "html": (TRAIN, lambda p: p.write_bytes(b"<!DOCTYPE html><html><head><title>Google Drive</title>"),
             "PATH: an HTML page, not a pickle (a failed Google Drive download?); download the file again"),
    "truncated": (TRAIN, lambda p: p.write_bytes(p.read_bytes()[:100_000]),
                  "PATH: truncated or corrupt pickle (UnpicklingError: pickle data was truncated)"),
    "empty": (TRAIN, lambda p: p.write_bytes(b""),
              "PATH: truncated or corrupt pickle (EOFError: Ran out of input)"),
    "keys": (TRAIN, lambda p: _rewrite(p, lambda o: {"images": o["image_data"], "class_dict": 0}),
             "PATH: expected a dict with keys ['image_data', 'class_dict'], found ['class_dict', 'images']"),
    "dtype": (TRAIN, _edit(image_data=lambda o: o["image_data"].astype(np.float32)),
              "PATH: 'image_data' is float32 (129, 84, 84, 3), expected uint8 (N, 84, 84, 3)"),
    "shape": (TRAIN, _edit(image_data=lambda o: o["image_data"][:, :80, :80]),
              "PATH: 'image_data' is uint8 (129, 80, 80, 3), expected uint8 (N, 84, 84, 3)"),
    "not an array": (TRAIN, _edit(image_data=lambda o: list(o["image_data"])),
                     "PATH: 'image_data' is list, expected uint8 (N, 84, 84, 3)"),
    "rows": (TRAIN, _classes(**{WNID0: lambda d: [0, 129]}),
             f"PATH: class_dict['{WNID0}'] holds rows outside 0..128"),
    "unclassed": (TRAIN, _classes(**{WNID0: lambda d: []}),
                  "PATH: 3 rows of image_data are in no class_dict class"),
    "two classes": (TRAIN, _classes(**{WNID1: lambda d: d[WNID1] + d[WNID0][:1]}),
                    f"PATH: class_dict['{WNID1}'] holds rows of another class"),
    "class_dict": (TRAIN, _edit(class_dict=lambda o: list(o["class_dict"].items())),
                   "PATH: 'class_dict' is list, expected a dict of {class: [rows]}"),
    "classes": (VAL, lambda p: _rewrite(p, _drop_class),
                "ROOT (cache layout): val has 15 classes, miniimagenet's val split has 16"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_files_are_one_line_errors(
    copies: dict[str, tuple[Path, Written]], tmp_path: Path, capsys: pytest.CaptureFixture, damage: str
) -> None:
    name, change, message = DAMAGE[damage]
    root = copy_without_cache(copies["cache"][0], tmp_path / "mini", "miniimagenet")
    change(root / name)
    expected = message.replace("PATH", str(root / name)).replace("ROOT", str(root))
    assert cli_error(["data", str(root), "--task", "miniimagenet"], capsys) == expected
    if name == TRAIN:  # nothing cached from a file that cannot be read
        assert not list(root.glob("miniimagenet-*"))


def test_an_image_in_train_and_test_is_refused(
    copies: dict[str, tuple[Path, Written]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = copy_without_cache(copies["cache"][0], tmp_path / "mini", "miniimagenet")
    with open(root / TRAIN, "rb") as f:
        image = pickle.load(f)["image_data"][7]
    _rewrite(root / "mini-imagenet-cache-test.pkl", lambda o: {**o, "image_data": np.concatenate(
        [o["image_data"][:5], image[None], o["image_data"][6:]])})
    argv = ["train", "protonet", "--task", "miniimagenet", "--data-dir", str(root), "--steps", "2",
            "--run-dir", str(tmp_path / "run"), "--no-progress"]
    assert cli_error(argv, capsys) == (
        f"{root} (cache layout): 1 images of train are also in test; the parts must not share images "
        '(task_args {"duplicates": "warn"} lets them)')
    assert not (tmp_path / "run").exists()


def test_a_csv_naming_a_missing_image(
    copies: dict[str, tuple[Path, Written]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = copy_without_cache(copies["csv"][0], tmp_path / "mini", "miniimagenet")
    missing = root / "images" / f"{WNID0}00000002.jpg"
    missing.unlink()
    assert cli_error(["data", str(root), "--task", "miniimagenet"], capsys) == (
        f"{missing}: not found (1 of the files train.csv names are missing)")


@pytest.mark.parametrize(("text", "message"), [
    ("name,class\n", "expected the header 'filename,label', found ['name', 'class']"),
    ("filename,label\n\nn01440764.jpg\n", "line 3 is ['n01440764.jpg'], expected filename,label"),
])
def test_a_csv_of_another_form(
    copies: dict[str, tuple[Path, Written]], tmp_path: Path, capsys: pytest.CaptureFixture, text: str,
    message: str,
) -> None:
    root = copy_without_cache(copies["csv"][0], tmp_path / "mini", "miniimagenet")
    (root / "train.csv").write_text(text)
    error = cli_error(["data", str(root), "--task", "miniimagenet"], capsys)
    assert error == f"{root / 'train.csv'}: {message}"


def test_a_part_without_images(copies: dict[str, tuple[Path, Written]], tmp_path: Path,
                               capsys: pytest.CaptureFixture) -> None:
    root = copy_without_cache(copies["csv"][0], tmp_path / "mini", "miniimagenet")
    (root / "test.csv").write_text("filename,label\n")
    err = cli_error(["data", str(root), "--task", "miniimagenet"], capsys)
    assert err == f"{root} (csv layout), test: no images"
    assert not list(root.glob("miniimagenet-test-*"))


def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(
    copies: dict[str, tuple[Path, Written]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_RunsCode(control)))  # what an ordinary unpickler does with it
    assert control.read_text() == "ran"
    root = copy_without_cache(copies["cache"][0], tmp_path / "mini", "miniimagenet")
    marker = tmp_path / "marker"
    _rewrite(root / TRAIN, lambda o: {**o, "class_dict": _RunsCode(marker)})
    assert cli_error(["data", str(root), "--task", "miniimagenet"], capsys) == (
        f"{root / TRAIN}: refused to load: the pickle calls builtins.exec, and metashot unpickles only numpy "
        "arrays and plain builtins (a pickle can run any code)")
    assert not marker.exists()


def test_a_second_load_reads_the_cache_and_a_changed_file_is_read_again(
    copies: dict[str, tuple[Path, Written]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = copy_without_cache(copies["cache"][0], tmp_path / "mini", "miniimagenet")
    written = copies["cache"][1]
    calls: list[str] = []
    read = CacheLayout.read

    def counted(self: CacheLayout, root: Path, part: str, image_size: int) -> Part:
        calls.append(part)
        return read(self, root, part, image_size)

    monkeypatch.setattr(CacheLayout, "read", counted)
    reads(_source(root), written)
    assert calls == ["train", "val", "test"] and len(list(root.glob("miniimagenet-*.npy"))) == 3
    reads(_source(root), written)
    assert calls == ["train", "val", "test"]
    # new images in a file of the same size: the new modification time makes a new cache
    new = write_cache(tmp_path / "new", seed=1)
    path = root / TRAIN
    before = path.stat()
    shutil.copyfile(tmp_path / "new" / TRAIN, path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert path.stat().st_size == before.st_size
    reads(_source(root), {**written, "train": new["train"]})
    assert calls == ["train", "val", "test", "train"]


def test_an_interrupted_cache_build_leaves_nothing(
    copies: dict[str, tuple[Path, Written]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = copy_without_cache(copies["cache"][0], tmp_path / "mini", "miniimagenet")
    files = sorted(os.listdir(root))
    monkeypatch.setattr(imagecache, "CHUNK", 16)
    read = CacheLayout.read

    def interrupted(self: CacheLayout, root: Path, part: str, image_size: int) -> Part:
        part_ = read(self, root, part, image_size)
        chunks: list[int] = []

        def images(rows: np.ndarray) -> np.ndarray:
            chunks.append(len(rows))
            if len(chunks) == 3:
                raise KeyboardInterrupt
            return part_.images(rows)

        return Part(part_.labels, part_.names, images)

    monkeypatch.setattr(CacheLayout, "read", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _source(root).dataset("train")
    assert sorted(os.listdir(root)) == files
    monkeypatch.setattr(CacheLayout, "read", read)
    reads(_source(root), copies["cache"][1])
