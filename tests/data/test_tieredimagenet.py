"""tieredImageNet's two layouts on tiny copies in the real files' formats (tests/layouts/tiered.py): each is
detected and read back class by class, pixel for pixel; the npz's channel order as the task_arg says; the
PNGs decoded only as the cache asks for them, the npz memory-mapped; each kind of damage one line naming
the file (through the command line, exit status 2)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from metashot import cli
from metashot.config import Config
from metashot.data import tasks, tieredimagenet
from metashot.data.pickles import load_pickle
from metashot.data.tieredimagenet import TieredImageNetSource, npz_images
from tests.layouts import cli_error, copy_without_cache, reads, write_each
from tests.layouts.mini import Written, py2_pickle
from tests.layouts.tiered import SPLIT, WNIDS, blocks, png, write_npz, write_png_pkl

WRITERS: dict[str, Callable[[Path], Written]] = {"png-pkl": write_png_pkl, "npz": write_npz}


@pytest.fixture(autouse=True)
def _registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The task registered for the command line, and nothing in the user's own cache folder."""
    monkeypatch.setitem(tasks.TASKS, "tieredimagenet", TieredImageNetSource)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Written]]:
    """A folder of each layout, with what it holds."""
    return write_each(tmp_path_factory, WRITERS)


def _source(root: Path, **task_args: object) -> TieredImageNetSource:
    return TieredImageNetSource(Config(task="tieredimagenet", data_dir=str(root), task_args=task_args))


@pytest.mark.parametrize("layout", WRITERS)
def test_each_layout_is_detected_and_read_back(copies: dict[str, tuple[Path, Written]], layout: str) -> None:
    root, written = copies[layout]
    assert [len(c) for c in written.values()] == list(SPLIT.values()) == [351, 97, 160]
    source = _source(root)
    assert source.layout.name == layout
    reads(source, written)


def test_the_npz_beside_ren_et_als_labels_file(tmp_path: Path) -> None:
    written = write_npz(tmp_path, labels_key="label_specific")
    assert list(written["val"])[:2] == WNIDS[351:353]  # named by label_specific_str
    reads(_source(tmp_path), written)


def test_the_npz_channel_order_is_the_task_args(copies: dict[str, tuple[Path, Written]], tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    root = copy_without_cache(copies["npz"][0], tmp_path / "tiered", "tieredimagenet")
    written = copies["npz"][1]
    stored = {p: {n: x[..., ::-1] for n, x in classes.items()} for p, classes in written.items()}
    reads(_source(root, channel_order="rgb"), stored)  # taken as they lie: the BGR arrays
    reads(_source(root), written)  # the default, flipped: a cache of its own
    assert len(list(root.glob("tieredimagenet-train-*.npy"))) == 2
    reads(_source(copies["png-pkl"][0], channel_order="rgb"), copies["png-pkl"][1])  # PNGs are RGB
    argv = ["data", str(root), "--task", "tieredimagenet", "--task-args", '{"channel_order": "RGB"}']
    assert cli_error(argv, capsys) == "tieredimagenet: channel_order must be one of ('bgr', 'rgb'), got 'RGB'"


def test_pngs_are_decoded_only_as_asked(copies: dict[str, tuple[Path, Written]],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[int] = []
    decode = tieredimagenet.decode_png
    def counted(item: object, path: Path, index: int) -> np.ndarray:
        decoded.append(index)
        return decode(item, path, index)

    monkeypatch.setattr(tieredimagenet, "decode_png", counted)
    root, written = copies["png-pkl"]
    part = tieredimagenet.PngPickleLayout().read(root, "val", 84)
    assert decoded == []
    rows = np.flatnonzero(part.labels == 1)[::-1]
    assert np.array_equal(part.images(rows), written["val"][list(written["val"])[1]][::-1])
    assert decoded == rows.tolist()


@pytest.mark.parametrize("form", ["array", "bytes", "python 2 str"])
def test_a_png_in_each_form_the_pickles_hold(tmp_path: Path, form: str) -> None:
    image = blocks(1, 4)[0]
    (tmp_path / "item.pkl").write_bytes(py2_pickle(png(image).tobytes()))
    as_read = load_pickle(tmp_path / "item.pkl")  # a Python 2 str comes back as latin1 text
    item = {"array": png(image), "bytes": png(image).tobytes(), "python 2 str": as_read}[form]
    assert isinstance(as_read, str)
    assert np.array_equal(tieredimagenet.decode_png(item, tmp_path / "x.pkl", 0), image)


def test_the_npz_is_memory_mapped_unless_compressed(tmp_path: Path) -> None:
    images = blocks(5, 0)
    cases = [("stored", np.savez, np.memmap), ("compressed", np.savez_compressed, np.ndarray)]
    for name, save, kind in cases:
        save(tmp_path / name, labels=np.arange(5), images=images)
        got = npz_images(tmp_path / f"{name}.npz")
        assert type(got) is kind and np.array_equal(got, images)
    np.savez(tmp_path / "fortran", images=np.asfortranarray(images))
    assert np.array_equal(npz_images(tmp_path / "fortran.npz"), images)


def _edit_pickle(name: str, change: Callable[[object], object]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        (root / name).write_bytes(py2_pickle(change(load_pickle(root / name))))

    return edit


def _edit_item(index: int, item: object) -> Callable[[Path], None]:
    return _edit_pickle("train_images_png.pkl", lambda items: [*items[:index], item, *items[index + 1:]])


def _labels(name: str, change: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    return _edit_pickle(name, lambda o: {**o, "label_specific": change(o["label_specific"])})


def _cut(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


NOT_A_ZIP = "not an npz, a zip of .npy arrays (File is not a zip file); download it again"


def _npz(name: str, **arrays: np.ndarray) -> Callable[[Path], None]:
    return lambda root: np.savez(root / name, **arrays)


PNG_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "not a png": (_edit_item(5, np.frombuffer(b"GIF89a junk", np.uint8)),
                  "train_images_png.pkl: image 5 does not decode (not an image file)"),
    "truncated png": (_edit_item(6, png(blocks(1, 9)[0])[:400]),
                      "train_images_png.pkl: image 6 does not decode (image file is truncated)"),
    "size": (_edit_item(7, png(blocks(1, 9)[0][:70])),
             "train_images_png.pkl: image 7 is 84 x 70, expected 84 x 84"),
    "not bytes": (_edit_item(3, 17),
                  "train_images_png.pkl: image 3 is int, expected the bytes of a PNG file"),
    "count": (_edit_pickle("train_images_png.pkl", lambda items: items[:-1]),
              "train_images_png.pkl: 701 images, but train_labels.pkl labels 702"),
    "not a list": (_edit_pickle("train_images_png.pkl", lambda items: {"images": items}),
                   "train_images_png.pkl: expected a list of PNG-encoded images, found dict"),
    "labels key": (_edit_pickle("train_labels.pkl", lambda o: {"labels": o["label_specific"]}),
                   "train_labels.pkl: expected a dict with the key 'label_specific', found ['labels']"),
    "labels type": (_labels("train_labels.pkl", lambda labels: labels * 0.5),
                    "train_labels.pkl: 'label_specific' is float64 (702,), expected one integer per image"),
    "html": (lambda root: (root / "train_labels.pkl").write_text("<html><body>Quota exceeded</body></html>"),
             "train_labels.pkl: an HTML page, not a pickle (a failed Google Drive download?); download the "
             "file again"),
    "classes": (_labels("val_labels.pkl", lambda labels: labels.clip(0, 95)),
                "ROOT (png-pkl layout): val has 96 classes, tieredimagenet's val split has 97"),
}
NPZ_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "html": (lambda root: (root / "train_images.npz").write_text("<html><body>Quota exceeded</body></html>"),
             f"train_images.npz: {NOT_A_ZIP}"),
    "truncated": (lambda root: _cut(root / "train_images.npz", 9999), f"train_images.npz: {NOT_A_ZIP}"),
    "key": (_npz("train_images.npz", data=blocks(702, 0)),
            "train_images.npz: expected the key 'images', found ['data']"),
    "dtype": (_npz("train_images.npz", images=blocks(702, 0).astype(np.int16)),
              "train_images.npz: 'images' is int16 (702, 84, 84, 3), expected uint8 (N, 84, 84, 3)"),
    "objects": (_npz("train_images.npz", images=np.array([b"x"] * 702, dtype=object)),
                "train_images.npz: images.npy holds Python objects, expected uint8 pixels"),
    "count": (_npz("train_images.npz", images=blocks(700, 0)),
              "train_images.npz: 700 images, but train_labels.pkl labels 702"),
    "labels key": (_edit_pickle("train_labels.pkl", lambda o: {"label": o["labels"]}),
                   "train_labels.pkl: expected a dict with the key 'labels' or 'label_specific', found "
                   "['label']"),
}
DAMAGE = {**{("png-pkl", k): v for k, v in PNG_DAMAGE.items()},
          **{("npz", k): v for k, v in NPZ_DAMAGE.items()}}


@pytest.mark.parametrize(("layout", "damage"), DAMAGE)
def test_damaged_files_are_one_line_errors(copies: dict[str, tuple[Path, Written]], tmp_path: Path,
                                           capsys: pytest.CaptureFixture, layout: str, damage: str) -> None:
    change, message = DAMAGE[layout, damage]
    root = copy_without_cache(copies[layout][0], tmp_path / "tiered", "tieredimagenet")
    change(root)
    expected = message.replace("ROOT", str(root)) if message.startswith("ROOT") else f"{root}/{message}"
    assert cli_error(["data", str(root), "--task", "tieredimagenet"], capsys) == expected


def test_an_image_in_val_and_test_is_refused(copies: dict[str, tuple[Path, Written]], tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    root = copy_without_cache(copies["npz"][0], tmp_path / "tiered", "tieredimagenet")
    with np.load(root / "val_images.npz") as z:
        val = z["images"]
    with np.load(root / "test_images.npz") as z:
        test = z["images"].copy()
    test[[3, 8]] = val[[0, 1]]
    np.savez(root / "test_images.npz", images=test)
    assert cli_error(["data", str(root), "--task", "tieredimagenet"], capsys) == (
        f"{root} (npz layout): 2 images of val are also in test; the parts must not share images "
        '(task_args {"duplicates": "warn"} lets them)')


def test_the_data_command_reports_either_layout(copies: dict[str, tuple[Path, Written]],
                                                capsys: pytest.CaptureFixture) -> None:
    root = copies["png-pkl"][0]
    assert cli.main(["data", str(root), "--task", "tieredimagenet"]) == 0
    out = capsys.readouterr().out
    files = tieredimagenet.PngPickleLayout.files
    assert out.startswith(f"tieredimagenet in {root}: png-pkl layout ({files})")
    assert "  train   351 classes      702 images (2 per class)" in out
    assert "  test    160 classes      320 images (2 per class)" in out
